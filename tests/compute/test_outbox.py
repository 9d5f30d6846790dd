"""Reports survive a broker outage: kept on the host's disk (the outbox), in order, and sent again,
signed anew, once the broker answers; a restarted worker finds and sends what its last run kept."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu.exceptions import OperationalError

from compute_workers import contract, credentials
from compute_workers.manager import ComputeManager
from compute_workers.operations.build import Build
from compute_workers.outbox import OUTBOX_DIR, Outbox
from compute_workers.reporter import CeleryReporter, one_host_key
from compute_workers.virt.fake import FakeDriver
from tests.compute.conftest import HOST, make_config
from tests.compute_support import SpecFactory


class Broker:
    """Stands for the Celery app: ``send_task`` raises as kombu does while ``down``, else records."""

    def __init__(self) -> None:
        self.down = False
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.attempts = 0
        self._lock = threading.Lock()
        self.delivered = threading.Condition(self._lock)

    def send_task(self, name: str, **options: Any) -> None:
        with self._lock:
            self.attempts += 1
            assert options["retry"] is True and options["retry_policy"] == CeleryReporter.RETRY_POLICY
            if self.down:
                raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            self.sent.append((name, options))
            self.delivered.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self._lock:
            return self.delivered.wait_for(lambda: len(self.sent) >= count, timeout)

    def kwargs(self) -> list[dict[str, Any]]:
        return [options["kwargs"] for _, options in self.sent]


KEY = "k1"


def reporter_on(broker: Broker, instances_path: Path) -> CeleryReporter:
    outbox = Outbox.under(instances_path, HOST)
    return CeleryReporter(broker, one_host_key(HOST, KEY), outbox)  # type: ignore[arg-type]


def update(n: int, instance: str = "11111111-1111-4111-8111-111111111111") -> dict[str, Any]:
    return {"instance_uuid": instance, "host": HOST, "expected_task_state": "spawning", "values": {},
            "event": {"name": "step", "result": "success", "message": f"step {n}"}, "fault": None,
            "action_id": None}


def test_reports_the_broker_refuses_are_kept_in_order_and_sent_once_when_it_answers(tmp_path: Path) -> None:
    broker = Broker()
    reporter = reporter_on(broker, tmp_path)
    broker.down = True
    for n in range(3):
        reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, **update(n))
    reporter.report(contract.CONDUCTOR_POWER_STATE_UPDATE, host=HOST, instance_uuid="u",
                    power_state="running", observed_at=1234.5)
    # A heartbeat is not kept: it fails, and the next one goes.
    with pytest.raises(OperationalError):
        reporter.report(contract.CONDUCTOR_HOST_HEARTBEAT, host=HOST, resources={})
    files = sorted((tmp_path / OUTBOX_DIR / HOST).iterdir())
    assert [path.name for path in files] == [f"{n:012d}.json" for n in (1, 2, 3, 4)]
    assert json.loads(files[0].read_text())["kwargs"] == update(0)
    assert broker.sent == []
    # While the outbox holds reports, a new one queues behind them without trying the broker.
    attempts = broker.attempts
    reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, **update(3))
    assert broker.attempts == attempts and len(reporter.outbox or []) == 5

    broker.down = False
    back = time.time()
    assert reporter.flush() == 5
    assert [name for name, _ in broker.sent] == [contract.CONDUCTOR_INSTANCE_UPDATE] * 3 + [
        contract.CONDUCTOR_POWER_STATE_UPDATE, contract.CONDUCTOR_INSTANCE_UPDATE]
    assert [kwargs.get("event", {}).get("message") for kwargs in broker.kwargs()] == [
        "step 0", "step 1", "step 2", None, "step 3"]
    assert broker.kwargs()[3]["observed_at"] == 1234.5  # the time observed stays the original one
    for name, options in broker.sent:  # signed when sent: a late report passes REPORT_MAX_SKEW
        assert float(options["headers"][credentials.TIMESTAMP_HEADER]) >= back - 0.01
        assert credentials.verify(options["headers"], name, options["kwargs"], {HOST: KEY}.get,
                                  max_skew=5) == HOST
    assert reporter.outbox is not None and reporter.outbox.empty()
    assert reporter.flush() == 0 and len(broker.sent) == 5  # nothing sent twice
    # The outbox empty, reports go straight to the broker again.
    reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, **update(4))
    assert len(broker.sent) == 6 and reporter.outbox.empty()


def test_a_flush_stops_at_the_first_report_the_broker_refuses_and_keeps_the_rest(tmp_path: Path) -> None:
    broker = Broker()
    reporter = reporter_on(broker, tmp_path)
    broker.down = True
    for n in range(3):
        reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, **update(n))
    with pytest.raises(OperationalError):
        reporter.flush()
    assert len(reporter.outbox or []) == 3
    broker.down = False
    assert reporter.flush() == 3
    assert [kwargs["event"]["message"] for kwargs in broker.kwargs()] == ["step 0", "step 1", "step 2"]


def test_a_restarted_worker_finds_its_outbox_and_sends_it(tmp_path: Path) -> None:
    broker = Broker()
    broker.down = True
    first = reporter_on(broker, tmp_path)
    first.report(contract.CONDUCTOR_INSTANCE_UPDATE, **update(0))
    first.report(contract.CONDUCTOR_INSTANCE_DESTROYED, instance_uuid="u2", host=HOST)
    del first  # the worker died; the broker is still away when it starts again

    second = reporter_on(broker, tmp_path)
    second.report(contract.CONDUCTOR_INSTANCE_UPDATE, **update(1))  # behind the earlier run's reports
    assert [path.name for path in sorted((tmp_path / OUTBOX_DIR / HOST).iterdir())] == [
        f"{n:012d}.json" for n in (1, 2, 3)]
    broker.down = False
    assert second.flush() == 3
    assert [(name, kwargs.get("event", {}).get("message")) for name, kwargs in
            ((name, options["kwargs"]) for name, options in broker.sent)] == [
        (contract.CONDUCTOR_INSTANCE_UPDATE, "step 0"), (contract.CONDUCTOR_INSTANCE_DESTROYED, None),
        (contract.CONDUCTOR_INSTANCE_UPDATE, "step 1")]


def test_the_sender_thread_resends_with_backoff_and_at_once_after_a_heartbeat(tmp_path: Path) -> None:
    broker = Broker()
    reporter = reporter_on(broker, tmp_path)
    assert reporter.sender is not None
    reporter.sender.min_delay = reporter.sender.max_delay = 30.0  # only a wake can send in this test
    broker.down = True
    reporter.start()
    try:
        reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, **update(0))
        deadline = time.monotonic() + 5
        while not reporter.sender.failing and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reporter.sender.failing  # tried once, now waits out its backoff
        reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, **update(1))  # no retry storm per report
        time.sleep(0.3)
        assert broker.sent == [] and len(reporter.outbox or []) == 2
        broker.down = False
        reporter.report(contract.CONDUCTOR_HOST_HEARTBEAT, host=HOST, resources={})  # it gets through
        assert broker.wait_for(3)
        assert [kwargs.get("event", {}).get("message") for kwargs in broker.kwargs()] == [
            None, "step 0", "step 1"]
        deadline = time.monotonic() + 5
        while not (reporter.outbox and reporter.outbox.empty()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reporter.outbox is not None and reporter.outbox.empty()
    finally:
        reporter.stop()
    assert not reporter.sender.is_alive()


def test_the_sender_thread_retries_on_its_own(tmp_path: Path) -> None:
    broker = Broker()
    reporter = reporter_on(broker, tmp_path)
    assert reporter.sender is not None
    reporter.sender.min_delay, reporter.sender.max_delay = 0.05, 0.1
    broker.down = True
    reporter.start()
    try:
        for n in range(5):
            reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, **update(n))
        time.sleep(0.3)
        broker.down = False
        assert broker.wait_for(5)
    finally:
        reporter.stop()
    assert [kwargs["event"]["message"] for kwargs in broker.kwargs()] == [f"step {n}" for n in range(5)]


def test_a_file_that_is_not_a_report_is_set_aside(tmp_path: Path) -> None:
    outbox = Outbox.under(tmp_path, HOST)
    outbox.append(contract.CONDUCTOR_INSTANCE_DESTROYED, {"instance_uuid": "u", "host": HOST})
    (outbox.directory / "000000000000.json").write_text("{not json")
    (outbox.directory / ".000000000009.json.tmp").write_text("{cut short")  # a crash mid-write
    pending = outbox.pending()
    assert [(report.sequence, report.task) for report in pending] == [
        (1, contract.CONDUCTOR_INSTANCE_DESTROYED)]
    assert (outbox.directory / "000000000000.json.bad").exists()
    with pytest.raises(TypeError):  # not JSON: could never be sent, so never kept
        outbox.append(contract.CONDUCTOR_INSTANCE_DESTROYED, {"host": HOST, "when": object()})
    assert len(outbox) == 1


def test_a_spawn_during_a_broker_outage_reaches_the_conductor_after_it(tmp_path: Path,
                                                                     make_spec: SpecFactory) -> None:
    broker = Broker()
    reporter = reporter_on(broker, tmp_path)
    manager = ComputeManager(make_config(tmp_path, COMPUTE_DRIVER="fake"), FakeDriver(), reporter)
    manager.init_host()
    spec = make_spec()
    broker.down = True
    manager.family(Build).spawn(spec)  # the task ends normally: its reports are on disk
    assert broker.sent == [] and len(reporter.outbox or []) >= 1
    broker.down = False
    reporter.flush()
    final = broker.kwargs()[-1]
    assert final["instance_uuid"] == spec["instance_uuid"] and final["expected_task_state"] == "spawning"
    assert final["values"] == {"vm_state": "active", "task_state": None, "power_state": "running"}


def test_the_heartbeat_names_the_instances_an_operation_runs_on(tmp_path: Path) -> None:
    manager = ComputeManager(make_config(tmp_path, COMPUTE_DRIVER="fake"), FakeDriver(), reporter_on(
        Broker(), tmp_path))
    uuid = "22222222-2222-4222-8222-222222222222"
    assert manager.resources()["busy"] == []
    with manager.instance_locks.hold(uuid):
        assert manager.resources()["busy"] == [uuid]
    assert manager.resources()["busy"] == []


def test_a_real_broker_that_refuses_connections_sends_the_report_to_the_outbox(tmp_path: Path) -> None:
    """kombu's own error, after Celery's publish retries (about a second), on a port nobody serves."""
    app = Celery("outbox-test", broker="redis://127.0.0.1:9/0", set_as_current=False, fixups=[])
    reporter = CeleryReporter(app, one_host_key(HOST, KEY), Outbox.under(tmp_path, HOST))
    started = time.monotonic()
    reporter.report(contract.CONDUCTOR_INSTANCE_DESTROYED, instance_uuid="u", host=HOST)
    assert time.monotonic() - started < 10
    (pending,) = Outbox.under(tmp_path, HOST).pending()
    assert (pending.task, pending.kwargs) == (contract.CONDUCTOR_INSTANCE_DESTROYED,
                                             {"instance_uuid": "u", "host": HOST})
