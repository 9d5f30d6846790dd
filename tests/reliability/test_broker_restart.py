"""A Celery worker survives its Redis broker being killed (-9) and started again.

Celery 5.7.0 does not: on a lost connection its consumer collects the connection (kombu detaches the
transport) and then closes it again; closing the default channel a second time makes kombu's Redis
channel read ``connection.client.hostname`` of the detached transport, an AttributeError that is not
a connection error, so the worker stops with ``Unrecoverable error: AttributeError("'NoneType' object
has no attribute 'hostname'")`` (and honcho then stops every process of `make run`). requirements.txt
pins celery 5.6.3, which only collects. Runs its own redis-server on a free port."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.broker import OwnRedis

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed")

HERE = Path(__file__).resolve().parent
KILLS = 5


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[OwnRedis]:
    broker = OwnRedis(tmp_path / "redis")
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_worker_survives_broker_restarts_and_consumes_after_them(broker: OwnRedis,
                                                                    tmp_path: Path) -> None:
    output, log = tmp_path / "done.txt", tmp_path / "worker.log"
    # No DJANGO_SETTINGS_MODULE: Celery would load its Django fix-up (and cloudctl) for it.
    env = {**{k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
           "BROKER_TEST_URL": broker.url(0),
           "BROKER_TEST_OUTPUT": str(output), "PYTHONPATH": str(HERE)}
    celery = [sys.executable, "-m", "celery", "-A", "broker_app"]
    with log.open("wb") as log_file:
        worker = subprocess.Popen([*celery, "worker", "-c", "2", "-P", "prefork", "--loglevel", "INFO",
                                   "--without-mingle", "--without-gossip"],
                                  env=env, cwd=HERE, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        sender = ("import sys, broker_app\n"
                  "for i in range(int(sys.argv[2])): broker_app.record.delay(f'{sys.argv[1]}-{i}')\n")
        for cycle in range(KILLS):
            # A stream of tasks in flight (received, running, acknowledging) when the broker dies.
            subprocess.run([sys.executable, "-c", sender, f"c{cycle}", "300"], env=env, cwd=HERE,
                           check=True, timeout=60)
            time.sleep(0.05)
            broker.kill()
            time.sleep(1.5)
            broker.start()
            time.sleep(2)
            assert worker.poll() is None, (
                f"the worker exited after broker restart {cycle + 1}:\n{log.read_text()[-3000:]}")
        subprocess.run([sys.executable, "-c", sender, "after", "20"], env=env, cwd=HERE, check=True,
                       timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(
                line.startswith("after-") for line in lines(output)) < 20:
            time.sleep(0.2)
        after = {line for line in lines(output) if line.startswith("after-")}
        assert after == {f"after-{i}" for i in range(20)}, log.read_text()[-3000:]
        assert "Unrecoverable error" not in log.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
