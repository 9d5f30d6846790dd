"""The test bed's Redis: every URL the tests, the benchmarks and the stacks they start use, made from
the one password cloudctl uses (:func:`compute_workers.credentials.redis_password`: REDIS_PASSWORD,
else the state dir's ``redis.password`` that ``tools/services.sh`` generates)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from compute_workers import credentials
from testbed import REPO

REDIS = "127.0.0.1:6379"


def redis_password() -> str:
    state_dir = Path(os.environ.get("CLOUDCTL_STATE_DIR") or REPO / "var")
    return credentials.redis_password(os.environ, state_dir)


def redis_url(db: int) -> str:
    """``redis://:<password>@127.0.0.1:6379/<db>`` (no password part when Redis has none)."""
    return credentials.redis_url(f"redis://{REDIS}/{db}", redis_password())


def redis_cli_env() -> dict[str, str]:
    """The environment of a ``redis-cli`` run: the password in REDISCLI_AUTH, not on its command line."""
    password = redis_password()
    return {**os.environ, "REDISCLI_AUTH": password} if password else dict(os.environ)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A redis-server of a test's or a bench's own, never the shared one on 6379: a free port, its data
    in ``directory``, AOF persistence as tools/services.sh runs the real broker (``appendfsync``
    ``everysec``; ``always`` where a test must not lose the last second), a password (generated unless
    given) in its config file, never on a command line. :meth:`kill` is a SIGKILL; :meth:`start`
    again brings it back on the same port with what its AOF kept."""

    def __init__(self, directory: Path, password: str | None = None, appendfsync: str = "everysec") -> None:
        self.directory = directory
        self.port = free_port()
        self.password = password or secrets.token_hex(16)
        self.config = directory / "redis.conf"
        directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\n"
                               f"dir {directory}\nappendonly yes\nappendfsync {appendfsync}\nsave \"\"\n"
                               f"logfile {directory / 'redis.log'}\n")
        self.config.chmod(0o600)
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10) -> None:
        self.process = subprocess.Popen(["redis-server", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server on port {self.port} did not start within {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL (a crash: no final AOF rewrite, no goodbye to the clients)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    stop = kill
