"""tools/services.sh and Redis: a password generated once (0600), never on a command line, set on a Redis
that runs without one, and a Redis with another password refused; the queues kept across a kill -9 and a
restart (AOF). Run against a Redis of the test's own (another port, its own state dir), never the shared
one on 6379."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "tools" / "services.sh"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(port: int, *args: str, password: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    if password:
        env["REDISCLI_AUTH"] = password
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], env=env,
                          capture_output=True, text=True, timeout=10).stdout.strip()


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    yield port
    for password in ("", *(p.read_text().strip() for p in tmp_path.glob("*/redis.password"))):
        cli(port, "shutdown", "nosave", password=password)


def services(port: int, state: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "REDIS_PASSWORD"}
    environ.update(REDIS_PORT=str(port), CLOUDCTL_STATE_DIR=str(state),
                   CLOUDCTL_LOG_DIR=str(state.parent / "log"), **env)
    return subprocess.run(["bash", str(SERVICES), *args], env=environ, capture_output=True, text=True,
                          timeout=60)


def test_redis_starts_with_a_password_generated_once_and_never_on_a_command_line(tmp_path: Path,
                                                                                 redis_port: int) -> None:
    state = tmp_path / "state"
    started = services(redis_port, state, "start", "--redis-only")
    assert started.returncode == 0, started.stderr
    password_file = state / "redis.password"
    password = password_file.read_text().strip()
    assert len(password) >= 32 and password_file.stat().st_mode & 0o777 == 0o600
    assert "NOAUTH" in cli(redis_port, "ping")
    assert cli(redis_port, "ping", password=password) == "PONG"
    commands = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert f":{redis_port}" in commands and password not in commands
    again = services(redis_port, state, "start", "--redis-only")
    assert again.returncode == 0 and password_file.read_text().strip() == password
    assert "up (password required)" in services(redis_port, state, "status").stdout


def test_a_redis_without_a_password_gets_it_and_one_with_another_is_refused(tmp_path: Path,
                                                                             redis_port: int) -> None:
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(redis_port),
                    "--save", "", "--dir", str(tmp_path), "--logfile", str(tmp_path / "open.log")],
                   check=True)
    for _ in range(50):
        if cli(redis_port, "ping") == "PONG":
            break
        subprocess.run(["sleep", "0.1"], check=True)
    assert "WITHOUT a password" in services(redis_port, tmp_path / "a", "status").stdout
    started = services(redis_port, tmp_path / "a", "start", "--redis-only")
    assert started.returncode == 0 and "CONFIG SET requirepass" in started.stdout
    # Not started by services.sh: left without persistence, and said so.
    assert "keeps its queues with appendonly no, appendfsync everysec" in started.stderr
    password = (tmp_path / "a" / "redis.password").read_text().strip()
    assert "NOAUTH" in cli(redis_port, "ping") and cli(redis_port, "ping", password=password) == "PONG"
    # Another state dir, another password: refused, with what to do.
    other = services(redis_port, tmp_path / "b", "start", "--redis-only")
    assert other.returncode == 1 and "requires a password that is not the one of" in other.stderr
    wrong = services(redis_port, tmp_path / "b", "start", "--redis-only", REDIS_PASSWORD="not-it-4242")
    assert wrong.returncode == 1 and "the one of REDIS_PASSWORD" in wrong.stderr
    assert "not-it-4242" not in wrong.stdout + wrong.stderr
    # REDIS_PASSWORD wins over the file.
    assert services(redis_port, tmp_path / "b", "start", "--redis-only",
                    REDIS_PASSWORD=password).returncode == 0


def test_the_broker_keeps_its_queues_across_a_kill_9_and_a_restart(tmp_path: Path, redis_port: int) -> None:
    state = tmp_path / "state"
    assert services(redis_port, state, "start", "--redis-only").returncode == 0
    password = (state / "redis.password").read_text().strip()
    data_dir = state / "redis"
    assert data_dir.stat().st_mode & 0o777 == 0o700
    redis_dir = cli(redis_port, "config", "get", "dir", password=password).splitlines()[1]
    assert redis_dir == str(data_dir.resolve())
    status = services(redis_port, state, "status").stdout
    assert "redis persistence: appendonly yes, appendfsync everysec" in status
    # A task waiting in a queue, put there as Celery puts it (kombu's Redis transport: a list).
    url = f"redis://:{password}@127.0.0.1:{redis_port}/0"
    with Connection(url) as connection:
        connection.SimpleQueue("scheduler").put({"task": "scheduler.schedule_instance", "id": 42})
    info = cli(redis_port, "info", "server", password=password)
    pid = int(next(line for line in info.splitlines() if line.startswith("process_id:")).split(":")[1])
    os.kill(pid, 9)  # no shutdown, no save: a crash
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)
    assert cli(redis_port, "ping", password=password) != "PONG"
    assert services(redis_port, state, "start", "--redis-only").returncode == 0
    aof_files = list((data_dir / "appendonlydir").iterdir())
    assert aof_files and all(path.stat().st_mode & 0o777 == 0o600 for path in aof_files)
    with Connection(url) as connection:
        message = connection.SimpleQueue("scheduler").get(timeout=5)
        assert message.payload == {"task": "scheduler.schedule_instance", "id": 42}
        message.ack()


def test_redis_data_is_not_kept_where_a_symlink_points(tmp_path: Path, redis_port: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (state / "redis").symlink_to(tmp_path / "elsewhere")
    refused = services(redis_port, state, "start", "--redis-only")
    assert refused.returncode == 1 and "is a symlink or not" in refused.stderr
    assert "NOAUTH" not in cli(redis_port, "ping")  # nothing was started
