"""``python -m compute_workers`` as a process: options, configuration errors, and a fake-driver worker
on the real Redis answering spawn / console / terminate, heartbeating, and stopping on SIGTERM.

The worker runs with ``COMPUTE_TEST_DUPLICATE_DELIVERY=concurrent``: every task it consumes is run a
second time while the first run goes on, as a redelivery after a worker restart would; the per-instance
locks and the journals make the second runs change nothing (one domain, one action's reports)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from compute_workers import contract
from testbed.broker import redis_url

from .conftest import ConductorQueue, SpecFactory, forget_queues

REPO = Path(__file__).resolve().parents[2]
BROKER = redis_url(15)
BACKEND = redis_url(14)


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compute_workers", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)


def test_help_lists_the_options() -> None:
    result = run_module("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--host", "--libvirt-uri", "--driver", "--vcpus", "--memory-mb", "--disk-gb",
                   "--concurrency", "--loglevel"):
        assert option in result.stdout


def test_a_malformed_setting_stops_the_worker_at_start() -> None:
    env = {**os.environ, "COMPUTE_HEARTBEAT_INTERVAL": "soon"}
    result = run_module("--host", "x", "--driver", "fake", env=env)
    assert result.returncode == 2
    assert "COMPUTE_HEARTBEAT_INTERVAL" in result.stderr and "'soon'" in result.stderr


def test_an_unreachable_hypervisor_stops_the_worker_at_start(tmp_path: Path) -> None:
    env = {**os.environ, "INSTANCES_PATH": str(tmp_path)}
    result = run_module("--host", "x", "--libvirt-uri", "qemu+unix:///system?socket=/nonexistent", env=env)
    assert result.returncode == 1
    assert "cannot connect to libvirt" in result.stderr


@pytest.fixture
def worker() -> Iterator[tuple[str, subprocess.Popen[str], ConductorQueue]]:
    host = f"pytest-{secrets.token_hex(4)}"
    conductor = ConductorQueue(BROKER)
    env = {**os.environ, "CELERY_BROKER_URL": BROKER, "CELERY_RPC_BACKEND": BACKEND,
           "COMPUTE_HEARTBEAT_INTERVAL": "1", "PYTHONUNBUFFERED": "1",
           "COMPUTE_TEST_DUPLICATE_DELIVERY": "concurrent"}
    argv = [sys.executable, "-m", "compute_workers", "--host", host, "--driver", "fake", "--vcpus", "6",
            "--memory-mb", "6144", "--disk-gb", "60", "--concurrency", "2"]
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        yield host, process, conductor
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=15)
        conductor.close()
        client = redis.Redis.from_url(BROKER)
        forget_queues(client, [contract.compute_queue(host)])


def test_worker_serves_its_queue_heartbeats_and_stops_on_sigterm(
        worker: tuple[str, subprocess.Popen[str], ConductorQueue], make_spec: SpecFactory) -> None:
    host, process, conductor = worker
    init = conductor.wait_for(contract.CONDUCTOR_HOST_INIT, host=host)
    assert set(init["resources"]) == set(contract.HEARTBEAT_RESOURCE_KEYS)
    assert init["resources"]["instances"] == {}
    beat = conductor.wait_for(contract.CONDUCTOR_HOST_HEARTBEAT, host=host)
    assert set(beat["resources"]) == set(contract.HEARTBEAT_RESOURCE_KEYS)
    assert (beat["resources"]["vcpus"], beat["resources"]["memory_mb"], beat["resources"]["disk_gb"]) == (
        6, 6144, 60)
    assert beat["resources"]["driver"] == "fake"

    client = Celery("test-client", broker=BROKER, backend=BACKEND, fixups=[])
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    spec = make_spec(host=host)
    queue = contract.compute_queue(host)
    client.send_task(contract.COMPUTE_SPAWN, kwargs={"spec": spec}, queue=queue)
    active = {"vm_state": "active", "task_state": None, "power_state": "running"}
    update = conductor.wait_for(contract.CONDUCTOR_INSTANCE_UPDATE, instance_uuid=spec["instance_uuid"])
    assert update["host"] == host and update["expected_task_state"] == "spawning"
    assert update["values"] == active
    # The second delivery waited for the first (the instance's lock), found its spawn journaled and
    # reported what is true again (the conductor drops it as stale); one domain.
    again = conductor.wait_for(contract.CONDUCTOR_INSTANCE_UPDATE, instance_uuid=spec["instance_uuid"])
    assert again["values"] == active
    assert ["redelivered spawn ignored" in u["event"]["message"] for u in (update, again)] == [False, True]

    console = client.send_task(contract.COMPUTE_CONSOLE_OUTPUT,
                               kwargs={"instance_uuid": spec["instance_uuid"], "lines": 5}, queue=queue)
    assert "cloudctl-guest: ready" in console.get(timeout=20)["output"]
    elsewhere = make_spec()["instance_uuid"]
    missing = client.send_task(contract.COMPUTE_CONSOLE_OUTPUT,
                               kwargs={"instance_uuid": elsewhere, "lines": 5}, queue=queue)
    assert missing.get(timeout=20)["error"] == "InstanceNotFound"

    beat = conductor.wait_for(contract.CONDUCTOR_HOST_HEARTBEAT, host=host)
    assert beat["resources"]["instances"] == {spec["instance_uuid"]: "running"}
    # Nothing more of the spawn: no third report, no build failure.
    assert [name for name, _ in conductor.unclaimed if name in (
        contract.CONDUCTOR_INSTANCE_UPDATE, contract.CONDUCTOR_BUILD_FAILED)] == []

    client.send_task(contract.COMPUTE_PAUSE, kwargs={"instance_uuid": spec["instance_uuid"], "action_id": 12},
                     queue=queue)
    paused = {"vm_state": "paused", "task_state": None, "power_state": "paused"}
    update = conductor.wait_for(contract.CONDUCTOR_INSTANCE_UPDATE, instance_uuid=spec["instance_uuid"],
                                values=paused)
    assert update["action_id"] == 12 and update["event"]["name"] == "compute_pause_instance"
    event = conductor.wait_for(contract.CONDUCTOR_POWER_STATE_UPDATE, instance_uuid=spec["instance_uuid"],
                               power_state="paused")
    assert event["host"] == host and abs(event["observed_at"] - time.time()) < 20

    client.send_task(contract.COMPUTE_TERMINATE, kwargs={"instance_uuid": spec["instance_uuid"]}, queue=queue)
    for _ in range(2):  # each delivery: the second found nothing to destroy, which is a success
        assert conductor.wait_for(contract.CONDUCTOR_INSTANCE_DESTROYED, instance_uuid=spec["instance_uuid"]
                                  ) == {"instance_uuid": spec["instance_uuid"], "host": host}
    # The pause reported its start and its end once: the second delivery found it journaled.
    pause_reports = [kwargs for name, kwargs in conductor.unclaimed
                     if name == contract.CONDUCTOR_INSTANCE_UPDATE and kwargs.get("action_id") == 12]
    assert [r["event"]["result"] for r in pause_reports] == ["start"], pause_reports

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    assert time.monotonic() - started < 15
    assert process.returncode == 0, output
    assert f"compute@{host} ready" in output
    assert "Warm shutdown" in output
    assert "COMPUTE_TEST_DUPLICATE_DELIVERY=concurrent: every compute and network task is run twice" in output
    for task in (contract.COMPUTE_SPAWN, contract.COMPUTE_CONSOLE_OUTPUT, contract.COMPUTE_PAUSE,
                 contract.COMPUTE_TERMINATE):
        assert f"duplicate delivery: running {task}[" in output, task
    assert "already done on this host; redelivered task ignored (compute_pause_instance" in output
    assert "the second run of" not in output
