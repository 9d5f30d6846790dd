"""COMPUTE_TEST_DUPLICATE_DELIVERY: every task a worker runs is run twice per delivery (same task id,
same arguments), and each compute task changes nothing the second time.

The tasks are run as the worker runs them (Celery's tracer: ``apply`` pushes the request with its id),
on the fake driver and libvirt's test:///default driver."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from compute_workers import contract
from compute_workers.app import create_app
from compute_workers.config import ComputeConfig, ConfigError
from compute_workers.manager import ComputeManager
from compute_workers.redelivery import AFTER, CONCURRENT, DeliveredTwice
from compute_workers.reporter import ListReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import SpecFactory, make_manager


def test_the_setting_takes_0_1_after_and_concurrent() -> None:
    def mode(text: str) -> str:
        config = ComputeConfig.from_env(environ={"COMPUTE_TEST_DUPLICATE_DELIVERY": text})
        return config.test_duplicate_delivery

    assert ComputeConfig.from_env(environ={}).test_duplicate_delivery == "0"
    assert (mode("0"), mode("1"), mode("after"), mode("concurrent")) == ("0", AFTER, AFTER, CONCURRENT)
    with pytest.raises(ConfigError, match="COMPUTE_TEST_DUPLICATE_DELIVERY"):
        mode("yes")


Worker = tuple[Celery, ComputeManager, ListReporter]


@pytest.fixture(params=[("fake", AFTER), ("fake", CONCURRENT), ("libvirt-test", AFTER)],
                ids=["fake-after", "fake-concurrent", "libvirt-test-after"])
def doubled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Worker]:
    """The tasks of a worker whose setting is on, on the driver and in the mode of the param."""
    driver_name, mode = request.param
    instances = tmp_path / "instances"
    overrides = {"COMPUTE_TEST_DUPLICATE_DELIVERY": mode, "COMPUTE_CLEAN_SHUTDOWN_TIMEOUT": "5"}
    if driver_name == "fake":
        manager, reporter = make_manager(FakeDriver(), instances, **overrides)
    else:
        manager, reporter = make_manager(LibvirtTestDriver("test:///default", instances), instances,
                                         COMPUTE_LIBVIRT_URI="test:///default", **overrides)
    app = create_app(manager.config)
    register_tasks(app, manager)
    yield app, manager, reporter
    for instance_uuid in manager.driver.list_instances():
        manager.driver.destroy(instance_uuid)
    manager.close()


def deliver(app: Celery, name: str, **kwargs: Any) -> Any:
    """Run task ``name`` as a worker runs a delivered message (request pushed, with a task id)."""
    result = app.tasks[name].apply(kwargs=kwargs)
    assert result.successful(), result.traceback
    return result.result


def test_every_task_gets_the_base_when_on_and_none_when_off(tmp_path: Path) -> None:
    on, _ = make_manager(FakeDriver(), tmp_path / "on", COMPUTE_TEST_DUPLICATE_DELIVERY="concurrent")
    off, _ = make_manager(FakeDriver(), tmp_path / "off")
    app_on, app_off = create_app(on.config), create_app(off.config)
    register_tasks(app_on, on)
    register_tasks(app_off, off)
    names = [name for name, _, _ in on.config.time_limits()]
    for name in names:
        assert isinstance(app_on.tasks[name], DeliveredTwice), name
        assert app_on.tasks[name].duplicate_delivery == CONCURRENT
        assert not isinstance(app_off.tasks[name], DeliveredTwice), name


def test_a_delivery_runs_the_body_twice_with_the_same_request_and_a_direct_call_once(
        tmp_path: Path) -> None:
    manager, _ = make_manager(FakeDriver(), tmp_path / "i", COMPUTE_TEST_DUPLICATE_DELIVERY="concurrent")
    app = create_app(manager.config)
    runs: list[tuple[str | None, str, dict[str, Any]]] = []
    both_running = threading.Barrier(2, timeout=5)

    @app.task(name="probe", bind=True, shared=False, base=DeliveredTwice, duplicate_delivery=CONCURRENT)
    def probe(self: Any, value: int) -> int:
        runs.append((self.request.id, threading.current_thread().name, {"value": value}))
        both_running.wait()  # the second delivery starts while the first one still runs
        return value * 2

    result = probe.apply(kwargs={"value": 21}, task_id="the-task-id")
    assert result.result == 42
    assert [(task_id, kwargs) for task_id, _, kwargs in runs] == [("the-task-id", {"value": 21})] * 2
    assert len({thread for _, thread, _ in runs}) == 2
    runs.clear()
    both_running = threading.Barrier(1)
    assert probe(value=1) == 2  # a direct call is no delivery
    assert len(runs) == 1


def test_a_second_run_that_raises_is_logged_and_the_first_outcome_stands(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager, _ = make_manager(FakeDriver(), tmp_path / "i", COMPUTE_TEST_DUPLICATE_DELIVERY="1")
    app = create_app(manager.config)
    calls = []

    @app.task(name="flaky", bind=True, shared=False, base=DeliveredTwice, duplicate_delivery=AFTER)
    def flaky(self: Any) -> str:
        calls.append(self.request.id)
        if len(calls) == 2:
            raise RuntimeError("second run broke")
        return "first"

    with caplog.at_level(logging.INFO, logger="compute_workers.redelivery"):
        result = flaky.apply()
    assert result.result == "first" and len(calls) == 2 and calls[0] == calls[1]
    assert "the second run of flaky" in caplog.text and "second run broke" in caplog.text


def instance_reports(reporter: ListReporter, instance_uuid: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, kwargs) for name, kwargs in reporter.reports
            if kwargs.get("instance_uuid") == instance_uuid]


def test_spawn_lifecycle_and_terminate_delivered_twice_change_nothing_the_second_time(
        doubled: Worker, make_spec: SpecFactory) -> None:
    app, manager, reporter = doubled
    spec = make_spec()
    instance_uuid = spec["instance_uuid"]

    deliver(app, contract.COMPUTE_SPAWN, spec=spec)
    assert manager.driver.list_instances() == {instance_uuid: "running"}
    spawned = [kwargs for name, kwargs in instance_reports(reporter, instance_uuid)
               if name == contract.CONDUCTOR_INSTANCE_UPDATE and kwargs["values"].get("vm_state") == "active"]
    # Both deliveries say the same thing; the second one built nothing.
    assert len(spawned) == 2 and "redelivered spawn ignored" in spawned[1]["event"]["message"]
    assert not reporter.named(contract.CONDUCTOR_BUILD_FAILED)

    for name, action_id, extra, target in (
            (contract.COMPUTE_REBOOT, 11, {"reboot_type": "HARD", "spec": spec}, "running"),
            (contract.COMPUTE_PAUSE, 12, {}, "paused"),
            (contract.COMPUTE_UNPAUSE, 13, {}, "running"),
            (contract.COMPUTE_SUSPEND, 14, {}, "suspended"),
            (contract.COMPUTE_RESUME, 15, {}, "running"),
            (contract.COMPUTE_POWER_OFF, 16, {"timeout": 0}, "shutdown"),
            (contract.COMPUTE_POWER_ON, 17, {"spec": spec}, "running")):
        reporter.reports.clear()
        deliver(app, name, instance_uuid=instance_uuid, action_id=action_id, **extra)
        updates = [kwargs for task, kwargs in instance_reports(reporter, instance_uuid)
                   if task == contract.CONDUCTOR_INSTANCE_UPDATE]
        # One start and one end of the action: the second delivery found it in the journal.
        results = [update["event"]["result"] for update in updates
                   if not update["event"]["name"].startswith("fallback")]
        assert results == ["start", "success"], (name, updates)
        assert manager.driver.list_instances() == {instance_uuid: target}, name

    reporter.reports.clear()
    deliver(app, contract.COMPUTE_TERMINATE, instance_uuid=instance_uuid)
    assert manager.driver.list_instances() == {}
    assert [name for name, _ in instance_reports(reporter, instance_uuid)] == [
        contract.CONDUCTOR_INSTANCE_DESTROYED] * 2


def test_a_concurrent_second_spawn_waits_for_the_first_and_builds_nothing(
        tmp_path: Path, make_spec: SpecFactory) -> None:
    """The second delivery starts while the first is inside the driver's spawn: the instance's lock
    holds it until the first ended, and it then finds the domain."""
    driver = FakeDriver(spawn_delay=0.5)
    manager, reporter = make_manager(driver, tmp_path / "i", COMPUTE_TEST_DUPLICATE_DELIVERY="concurrent")
    app = create_app(manager.config)
    register_tasks(app, manager)
    spec = make_spec()
    started = time.monotonic()
    deliver(app, contract.COMPUTE_SPAWN, spec=spec)
    assert time.monotonic() - started >= 0.5
    assert driver.list_instances() == {spec["instance_uuid"]: "running"}
    messages = [kwargs["event"]["message"] for kwargs in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
                if kwargs["event"]["name"] == "compute_spawn"]
    assert len(messages) == 2 and sum("redelivered spawn ignored" in message for message in messages) == 1
    manager.close()
