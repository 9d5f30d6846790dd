"""``python -m compute_workers.fleet``: many simulated hosts in one process, each task run by the host
whose queue it came from; in-process parts, then the fleet as a process on the real Redis."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.app.task import Context

from compute_workers import contract
from compute_workers.app import celery_settings
from compute_workers.fleet import Fleet, create_fleet_app, host_names
from compute_workers.heartbeat import SpreadHeartbeat
from compute_workers.operations import Build
from compute_workers.reporter import ListReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeDriver
from testbed.broker import redis_url

from .conftest import ConductorQueue, SpecFactory, forget_queues, make_config

REPO = Path(__file__).resolve().parents[2]
# Not DB 15: test_worker_process's worker clears that broker's conductor queue.
BROKER = BACKEND = redis_url(14)


def test_host_names_sort_as_numbers() -> None:
    assert host_names("fake-", 5) == ["fake-1", "fake-2", "fake-3", "fake-4", "fake-5"]
    names = host_names("fake-", 1000)
    assert names[0] == "fake-0001" and names[-1] == "fake-1000" and names == sorted(names)
    with pytest.raises(ValueError):
        host_names("bad prefix-", 2)


def make_fleet(tmp_path: Path, count: int = 3) -> tuple[Fleet, ListReporter]:
    reporter = ListReporter()
    fleet = Fleet(make_config(tmp_path), host_names("fake-", count), reporter,
                  lambda config: FakeDriver(instances_path=config.instances_path))
    fleet.init_hosts()
    return fleet, reporter


def delivered(queue: str | None) -> Context:
    return Context(id="t-1", delivery_info={"exchange": queue, "routing_key": queue})


def test_a_task_runs_on_the_host_of_its_queue(tmp_path: Path, make_spec: SpecFactory) -> None:
    fleet, reporter = make_fleet(tmp_path)
    assert fleet.queues == ["compute.fake-1", "compute.fake-2", "compute.fake-3"]
    assert fleet.managers["fake-2"].config.instances_path == tmp_path / "fake-2"  # journals per host
    assert fleet.for_task(delivered("compute.fake-2")) is fleet.managers["fake-2"]
    # Another queue: a spawn's spec names its host; a task with only a uuid runs nowhere.
    assert fleet.for_task(delivered("compute.elsewhere"), "fake-3") is fleet.managers["fake-3"]
    assert fleet.for_task(delivered("compute.elsewhere")) is None
    assert fleet.for_task(Context(), "nowhere") is None

    app = create_fleet_app(fleet.config)
    register_tasks(app, fleet)
    app.finalize()
    spawn, terminate = app.tasks[contract.COMPUTE_SPAWN], app.tasks[contract.COMPUTE_TERMINATE]
    console = app.tasks[contract.COMPUTE_CONSOLE_OUTPUT]
    # The same instance on two hosts; a terminate (a uuid only) removes it where its queue says.
    spec = make_spec(host="fake-1")
    uuid = spec["instance_uuid"]
    for host in ("fake-1", "fake-3"):
        spawn.push_request(delivery_info={"routing_key": f"compute.{host}"})
        spawn.run(spec={**spec, "host": host})
        spawn.pop_request()
    terminate.push_request(delivery_info={"routing_key": "compute.fake-3"})
    terminate.run(instance_uuid=uuid)
    terminate.pop_request()
    assert reporter.named(contract.CONDUCTOR_INSTANCE_DESTROYED) == [
        {"instance_uuid": uuid, "host": "fake-3"}]
    assert {host: m.driver.list_instances() for host, m in fleet.managers.items()} == {
        "fake-1": {uuid: "running"}, "fake-2": {}, "fake-3": {}}
    console.push_request(delivery_info={"routing_key": "compute.unknown"})
    assert console.run(instance_uuid=uuid)["error"] == "ConsoleUnavailable"
    console.pop_request()
    fleet.close()


def test_the_fleet_app_reads_only_the_priority_0_lists(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    conf = create_fleet_app(config).conf
    expected = celery_settings(config)
    assert conf.broker_transport_options == {**expected.pop("broker_transport_options"),
                                             "priority_steps": [0]}
    assert {key: conf[key] for key in expected} == expected


def test_one_thread_reports_the_lifecycle_events_of_every_host(tmp_path: Path,
                                                               make_spec: SpecFactory) -> None:
    fleet, reporter = make_fleet(tmp_path)
    fleet.watch_power_states()
    try:
        spec = make_spec(host="fake-2")
        fleet.managers["fake-2"].family(Build).spawn(spec)
        fleet.managers["fake-2"].driver.guest_power_off(spec["instance_uuid"])  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5
        while not any(u["power_state"] == "shutdown" for u in reporter.named(
                contract.CONDUCTOR_POWER_STATE_UPDATE)) and time.monotonic() < deadline:
            time.sleep(0.01)
        updates = reporter.named(contract.CONDUCTOR_POWER_STATE_UPDATE)
        assert {(u["host"], u["power_state"]) for u in updates} >= {("fake-2", "shutdown")}
        assert {u["host"] for u in updates} == {"fake-2"}
        assert [t.name for t in threading.enumerate()].count("power-state-events") == 1
    finally:
        fleet.close()
    assert "power-state-events" not in [t.name for t in threading.enumerate()]


def test_heartbeats_are_spread_over_the_interval() -> None:
    calls: list[tuple[int, float]] = []

    def beat(index: int) -> None:
        calls.append((index, time.monotonic()))
        if index == 1:
            raise ConnectionError("broker away")  # logged; the others still beat

    heartbeat = SpreadHeartbeat([lambda i=i: beat(i) for i in range(4)], interval=0.4)
    heartbeat.start()
    deadline = time.monotonic() + 10  # eight beats take 0.7 s; a busy machine may need longer
    while len(calls) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    heartbeat.stop()
    assert not heartbeat.is_alive()
    indices = [index for index, _ in calls]
    assert indices[:8] == [0, 1, 2, 3, 0, 1, 2, 3]
    # Beat k is due 0.1 s after beat k - 1 (never before: not all at once), whatever the load.
    first = calls[0][1]
    offsets = [when - first for _, when in calls[:8]]
    assert all(k * 0.1 - 0.05 <= offset <= k * 0.1 + 1.0 for k, offset in enumerate(offsets)), offsets


def test_a_prefix_no_queue_can_be_named_after_stops_the_fleet_at_start() -> None:
    argv = [sys.executable, "-m", "compute_workers.fleet", "--hosts", "2", "--prefix", "a b"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid --prefix" in result.stderr


@pytest.fixture
def fleet_process() -> Iterator[tuple[str, subprocess.Popen[str], ConductorQueue]]:
    prefix = f"pytest{secrets.token_hex(3)}-"
    conductor = ConductorQueue(BROKER)
    env = {**os.environ, "CELERY_BROKER_URL": BROKER, "CELERY_RPC_BACKEND": BACKEND, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "compute_workers.fleet", "--hosts", "5", "--prefix", prefix, "--vcpus", "6",
            "--memory-mb", "6144", "--disk-gb", "60", "--concurrency", "2", "--heartbeat-interval", "0.5"]
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        yield prefix, process, conductor
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=15)
        conductor.close()
        queues = [contract.compute_queue(host) for host in host_names(prefix, 5)]
        forget_queues(redis.Redis.from_url(BROKER), queues)


def test_fleet_serves_each_host_from_its_queue_and_stops_on_sigterm(
        fleet_process: tuple[str, subprocess.Popen[str], ConductorQueue], make_spec: SpecFactory) -> None:
    prefix, process, conductor = fleet_process
    hosts = [f"{prefix}{i}" for i in range(1, 6)]
    for host in hosts:
        init = conductor.wait_for(contract.CONDUCTOR_HOST_INIT, host=host)
        assert init["resources"]["instances"] == {}
    for host in hosts:
        beat = conductor.wait_for(contract.CONDUCTOR_HOST_HEARTBEAT, host=host)
        resources = beat["resources"]
        assert set(resources) == set(contract.HEARTBEAT_RESOURCE_KEYS)
        assert (resources["vcpus"], resources["memory_mb"], resources["disk_gb"]) == (6, 6144, 60)
        assert abs(resources["observed_at"] - time.time()) < 20

    client = Celery("test-client", broker=BROKER, backend=BACKEND, fixups=[])
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    third, fourth = hosts[2], hosts[3]
    # One instance uuid on two hosts: only the queue tells a terminate which one to remove.
    spec = make_spec(host=third)
    uuid = spec["instance_uuid"]
    running = {"vm_state": "active", "task_state": None, "power_state": "running"}
    for host in (third, fourth):
        client.send_task(contract.COMPUTE_SPAWN, kwargs={"spec": {**spec, "host": host}},
                         queue=contract.compute_queue(host))
        update = conductor.wait_for(contract.CONDUCTOR_INSTANCE_UPDATE, instance_uuid=uuid, host=host)
        assert update["values"] == running
    console = client.send_task(contract.COMPUTE_CONSOLE_OUTPUT, kwargs={"instance_uuid": uuid, "lines": 1},
                               queue=contract.compute_queue(fourth))
    assert console.get(timeout=20) == {"output": "cloudctl-guest: ready\n"}

    client.send_task(contract.COMPUTE_TERMINATE, kwargs={"instance_uuid": uuid},
                     queue=contract.compute_queue(third))
    assert conductor.wait_for(contract.CONDUCTOR_INSTANCE_DESTROYED, instance_uuid=uuid) == {
        "instance_uuid": uuid, "host": third}
    terminated = time.time()
    deadline = time.monotonic() + 20
    seen: dict[str, dict[str, str]] = {}
    while set(seen) != set(hosts) and time.monotonic() < deadline:
        beat = conductor.wait_for(contract.CONDUCTOR_HOST_HEARTBEAT)
        if beat["resources"]["observed_at"] > terminated:  # listed after the terminate
            seen[beat["host"]] = beat["resources"]["instances"]
    assert seen == {host: ({uuid: "running"} if host == fourth else {}) for host in hosts}

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    assert time.monotonic() - started < 10
    assert process.returncode == 0, output
    assert f"fleet@{prefix} ready" in output and "Warm shutdown" in output
    assert "ERROR" not in output and "Traceback" not in output, output
