"""A real compute worker process (fake driver) whose broker is killed (SIGKILL) while its spawns finish
and started again a few seconds later: the spawn reports, which the broker could not take, were kept
in the host's outbox and reach the conductor's queue after the restart, each once, signed at resend
time, and the worker stays up.

Runs against a Redis of its own (a free port, its own directory, AOF on so that the queues outlive the
restart as the product's broker does), never the shared one on 6379.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from kombu.exceptions import OperationalError

from compute_workers import contract, credentials
from compute_workers.outbox import OUTBOX_DIR
from testbed.broker import OwnRedis
from tests.compute_support import new_spec

REPO = Path(__file__).resolve().parents[2]
SPAWN_SECONDS = 4.0

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[OwnRedis]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = OwnRedis(directory, appendfsync="always")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Conductor:
    """A plain consumer of the conductor's queues: every report with its signature headers."""

    def __init__(self, url: str) -> None:
        self.url = url
        # (task, kwargs, headers, time received, queue)
        self.seen: list[tuple[str, dict[str, Any], dict[str, Any], float, str]] = []

    def drain(self, seconds: float) -> None:
        """Read whatever arrives for ``seconds`` (reconnecting: the broker may just have restarted)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with Connection(self.url) as connection:
                    names = (contract.CONDUCTOR_QUEUE, contract.CONDUCTOR_STATUS_QUEUE)
                    queues = [connection.SimpleQueue(name) for name in names]
                    while time.monotonic() < deadline:
                        got = False
                        for name, queue in zip(names, queues, strict=True):
                            try:
                                message = queue.get(block=True, timeout=0.1)
                            except queue.Empty:
                                continue
                            message.ack()
                            _args, kwargs, _embed = message.decode()
                            self.seen.append((message.headers["task"], dict(kwargs), dict(message.headers),
                                              time.time(), name))
                            got = True
                        if not got and self.done():
                            return
            except (OSError, redis.exceptions.RedisError, OperationalError):
                time.sleep(0.2)

    def done(self) -> bool:
        return False

    def named(self, task_name: str, **match: Any) -> list[tuple[dict[str, Any], dict[str, Any], float]]:
        return [(kwargs, headers, at) for name, kwargs, headers, at, _ in self.seen
                if name == task_name and all(kwargs.get(k) == v for k, v in match.items())]


class Host:
    """``python -m compute_workers`` of one host (fake driver, spawns of SPAWN_SECONDS), on ``broker``."""

    def __init__(self, tmp_path: Path, broker: OwnRedis) -> None:
        self.name = f"pytest-{secrets.token_hex(4)}"
        self.key = secrets.token_hex(16)
        self.instances = tmp_path / "instances"
        self.outbox = self.instances / OUTBOX_DIR / self.name
        self.log_path = tmp_path / "worker.log"
        self.env = {**os.environ, "CELERY_BROKER_URL": broker.url(0), "CELERY_RPC_BACKEND": broker.url(1),
                    "INSTANCES_PATH": str(self.instances), "COMPUTE_HEARTBEAT_INTERVAL": "1",
                    "COMPUTE_FAKE_SPAWN_DELAY": str(SPAWN_SECONDS), "COMPUTE_HOST_KEY": self.key,
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("REDIS_PASSWORD", None)  # the URLs name this Redis's own password
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "compute_workers", "--host", self.name, "--driver", "fake",
                 "--concurrency", "3"], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self.process

    def log(self) -> str:
        return self.log_path.read_text()

    def kept(self) -> int:
        return len(list(self.outbox.glob("*.json")))

    def kept_reports(self) -> list[tuple[str, dict[str, Any]]]:
        """(task, kwargs) of every report in the outbox, in order."""
        reports = []
        for path in sorted(self.outbox.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            reports.append((record["task"], record["kwargs"]))
        return reports

    def kept_spawns(self) -> set[str]:
        """The instances whose spawn report (active) is in the outbox."""
        return {kwargs["instance_uuid"] for task, kwargs in self.kept_reports()
                if task == contract.CONDUCTOR_INSTANCE_UPDATE and
                kwargs["values"].get("vm_state") == "active"}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def host(tmp_path: Path, broker: OwnRedis) -> Iterator[Host]:
    worker = Host(tmp_path, broker)
    try:
        yield worker
    finally:
        worker.stop()


def spawns_caught_by_an_outage(host: Host, broker: OwnRedis, conductor: Conductor) -> list[dict[str, Any]]:
    """Three spawns taken by the worker, then Redis killed (SIGKILL) before they end; returns their
    specs once their reports are in the host's outbox."""
    conductor.done = lambda: bool(conductor.named(contract.CONDUCTOR_HOST_INIT))  # type: ignore[method-assign]
    conductor.drain(30)
    assert conductor.named(contract.CONDUCTOR_HOST_INIT, host=host.name), host.log()

    client = Celery("test-client", broker=broker.url(0), set_as_current=False, fixups=[])
    client.conf.update(task_serializer="json", accept_content=["json"])
    queue = contract.compute_queue(host.name)
    specs = [new_spec(host=host.name) for _ in range(3)]
    for spec in specs:
        client.send_task(contract.COMPUTE_SPAWN, kwargs={"spec": spec}, queue=queue)
    client.close()
    # Every spawn taken by the worker (three threads, one task each), none finished yet: kill Redis.
    raw = redis.Redis(host="127.0.0.1", port=broker.port, password=broker.password)
    deadline = time.monotonic() + 10
    while raw.llen(queue) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raw.llen(queue) == 0
    broker.kill()
    killed = time.monotonic()

    # The spawns end while the broker is away: their reports go to the host's outbox.
    uuids = {spec["instance_uuid"] for spec in specs}
    deadline = killed + SPAWN_SECONDS + 10
    while time.monotonic() < deadline and host.kept_spawns() != uuids:
        time.sleep(0.1)
    assert host.kept_spawns() == uuids, host.log()
    return specs


def test_spawn_reports_lost_to_a_broker_restart_reach_the_conductor_after_it(host: Host,
                                                                           broker: OwnRedis) -> None:
    worker = host.start()
    conductor = Conductor(broker.url(0))
    try:
        specs = spawns_caught_by_an_outage(host, broker, conductor)
        assert worker.poll() is None

        broker.start()
        restarted = time.time()
        uuids = {spec["instance_uuid"] for spec in specs}
        active = {"vm_state": "active", "task_state": None, "power_state": "running"}

        def all_reported() -> bool:
            return {kwargs["instance_uuid"] for kwargs, _, _ in
                    conductor.named(contract.CONDUCTOR_INSTANCE_UPDATE, values=active)} >= uuids
        conductor.done = all_reported  # type: ignore[method-assign]
        conductor.drain(30)
        reports = conductor.named(contract.CONDUCTOR_INSTANCE_UPDATE, values=active)
        assert all_reported(), host.log()
        # Within seconds of the restart, not at a deadline.
        assert max(at for _, _, at in reports) - restarted < 15
        # Each once (a spawn task Redis delivers again may report its domain again, "already exists":
        # the conductor drops that one as stale), from the host it names, signed at resend time.
        spawned = [kwargs["instance_uuid"] for kwargs, _, _ in reports
                   if "already exists" not in kwargs["event"]["message"]]
        assert sorted(spawned) == sorted(uuids)
        for kwargs, headers, _ in reports:
            assert kwargs["host"] == host.name and kwargs["expected_task_state"] == "spawning"
            assert float(headers[credentials.TIMESTAMP_HEADER]) >= restarted - 1
            assert credentials.verify(headers, contract.CONDUCTOR_INSTANCE_UPDATE, kwargs,
                                      {host.name: host.key}.get, max_skew=30) == host.name
        deadline = time.monotonic() + 10
        while host.kept() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert host.kept() == 0
        assert worker.poll() is None, host.log()
        # And the heartbeats go again, listing the three domains running.
        conductor.done = lambda: any(  # type: ignore[method-assign]
            set(kwargs["resources"]["instances"]) >= uuids
            for kwargs, _, _ in conductor.named(contract.CONDUCTOR_HOST_HEARTBEAT, host=host.name))
        conductor.drain(15)
        assert conductor.done()
    finally:
        host.stop()


def test_a_worker_killed_with_reports_in_its_outbox_sends_them_before_its_host_init(
        host: Host, broker: OwnRedis) -> None:
    worker = host.start()
    conductor = Conductor(broker.url(0))
    specs = spawns_caught_by_an_outage(host, broker, conductor)
    worker.kill()  # the host's worker dies too; its outbox stays on disk
    worker.wait(10)
    kept = [(task, kwargs) for task, kwargs in host.kept_reports()
            if contract.conductor_queue(task) == contract.CONDUCTOR_QUEUE]
    assert len(kept) >= 3
    broker.start()
    conductor.seen.clear()
    host.start()
    conductor.done = lambda: bool(conductor.named(contract.CONDUCTOR_HOST_INIT))  # type: ignore[method-assign]
    conductor.drain(30)
    # The conductor queue in order (one queue is FIFO): everything the outbox kept came first, then
    # host_init; the conductor's restart handling (which ends an interrupted build in ERROR) sees the
    # spawns that did finish.
    received = [(name, kwargs) for name, kwargs, _, _, queue in conductor.seen
                if queue == contract.CONDUCTOR_QUEUE and kwargs.get("host") == host.name]
    assert [name for name, _ in received][len(kept):len(kept) + 1] == [contract.CONDUCTOR_HOST_INIT], (
        received, host.log())
    assert received[:len(kept)] == kept
    assert {kwargs["instance_uuid"] for name, kwargs in kept
            if name == contract.CONDUCTOR_INSTANCE_UPDATE} == {spec["instance_uuid"] for spec in specs}
    assert host.kept() == 0
