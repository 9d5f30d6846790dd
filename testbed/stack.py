"""An entire cloudctl, started from the real Procfile with honcho, on a database of its own: what the
end-to-end tests' ``stack`` fixture and the benchmarks run (``run_stack``)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import requests

from compute_workers import credentials
from testbed import REPO
from testbed.broker import REDIS, redis_cli_env, redis_password

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    url: str
    flower_url: str
    host: str
    instances_path: Path
    env: dict[str, str]
    log_path: Path
    token: str = ""
    # Logs of processes run beside honcho's (say compute workers on harness hosts), tailed with its own.
    extra_logs: list[Path] = field(default_factory=list)

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers.setdefault("Authorization", f"Token {self.token}")
        return requests.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    def host_key(self, host: str) -> str:
        """The COMPUTE_HOST_KEY of compute host ``host`` (its first key: what ``manage.py host_credentials``
        prints for a host that has not joined yet)."""
        return credentials.host_key(self.env["CLOUDCTL_HOST_KEY_SECRET"], host, credentials.FIRST_GENERATION)

    def process_group(self, name: str) -> int:
        """The process group of process ``name``'s current run under tools/supervise.py (``supervised``
        stacks): the pid its last ``<name> started (pid=N)`` line names."""
        marker = f" {name} started (pid="
        pids = [line.split(marker, 1)[1].split(")", 1)[0]
                for line in self.log_path.read_text(errors="replace").splitlines() if marker in line]
        if not pids:
            raise LookupError(f"process {name} never started")
        return int(pids[-1])

    def kill(self, name: str, signum: int = signal.SIGKILL) -> int:
        """Send ``signum`` (kill -9 by default) to every process of ``name``'s current run (its command,
        a Celery worker's pool, gunicorn's workers): the supervisor restarts it. Returns the group."""
        group = self.process_group(name)
        try:
            os.killpg(group, signum)
        except ProcessLookupError:
            pass  # it died already: the supervisor restarts it anyway
        return group

    def log_tail(self, lines: int = 80) -> str:
        def tail(path: Path) -> str:
            text = path.read_text(errors="replace") if path.exists() else ""
            return "\n".join(text.splitlines()[-lines:])

        if not self.extra_logs:
            return tail(self.log_path)
        return "\n".join(f"--- {path.name} ---\n{tail(path)}" for path in (self.log_path, *self.extra_logs))

    def wait_for(self, what: str, check: Any, timeout: float, interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"{what}: not reached within {timeout} s (last: {last!r})\n"
                             f"--- process log ---\n{self.log_tail()}")


def postgres_database(base_url: str, name: str) -> tuple[str, Any]:
    import psycopg2

    parsed = urlparse(base_url)
    admin = psycopg2.connect(dbname=parsed.path.lstrip("/") or "postgres", user=parsed.username,
                             password=parsed.password, host=parsed.hostname,
                             port=parsed.port or 5432)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cursor.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    return urlunparse(parsed._replace(path=f"/{name}")), drop


def procfile_processes(without: Iterable[str] = (), procfile: Path = REPO / "Procfile") -> dict[str, str]:
    """The processes (name -> command) of the real Procfile, less those named in ``without``."""
    processes = {}
    for line in procfile.read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and not line.startswith("#") and name.strip() not in without:
            processes[name.strip()] = command.strip()
    return processes


@contextmanager
def run_stack(tiny_image_path: Path, state: Path, *, procfile: Path | Mapping[str, str], hosts: list[str],
              redis_dbs: tuple[int, int], extra_env: dict[str, str] | None = None,
              companions: Callable[[Stack], AbstractContextManager[object]] | None = None,
              supervised: bool = False) -> Iterator[Stack]:
    """Start the processes of ``procfile`` (a file, or name -> command, written to ``state/Procfile``)
    with honcho on a database and Redis DBs of their own, and yield once the API answers and every host
    in ``hosts`` heartbeats.

    ``companions(stack)`` runs processes beside honcho's, e.g. compute workers that a test may SIGKILL
    (honcho stops every process when one dies): entered once honcho runs, before the wait for the
    hosts; exited before honcho stops. They read what they need (broker, token) from ``stack.env``.

    ``supervised``: the processes run under ``tools/supervise.py`` (what ``make run`` uses) instead of
    honcho, restarted within a second when they die: :meth:`Stack.kill` SIGKILLs one of them."""
    if isinstance(procfile, Mapping):
        lines = [f"{name}: {command}" for name, command in procfile.items()]
        procfile = state / "Procfile"
        procfile.write_text("\n".join(lines) + "\n")
    tag = secrets.token_hex(3)
    # QEMU runs as libvirt-qemu: instance files must live where it can traverse.
    instances = Path("/var/lib/cloudctl-test") / f"e2e-{tag}"
    instances.mkdir(parents=True)
    port, flower_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPUTE_", "CELERY_"))}
    drop_database = None
    if env.get("DATABASE_URL", "").startswith("postgres"):
        env["DATABASE_URL"], drop_database = postgres_database(env["DATABASE_URL"],
                                                               f"cloudctl_e2e_{tag}")
    else:
        env["DATABASE_URL"] = f"sqlite:///{state / 'cloudctl.sqlite3'}"
    broker_db, rpc_db = redis_dbs
    host_key_secret = secrets.token_hex(32)
    env.update({
        "PATH": f"{VENV_BIN}:{env.get('PATH', '')}",
        "CLOUDCTL_STATE_DIR": str(state),
        "CLOUDCTL_BIND": f"127.0.0.1:{port}",
        "CLOUDCTL_API_URL": f"http://127.0.0.1:{port}",
        "CLOUDCTL_SERVICE_TOKEN": secrets.token_hex(16),
        "CLOUDCTL_ADMIN_USER": "admin",
        "CLOUDCTL_ADMIN_PASSWORD": "e2e-password",
        # Every process adds REDIS_PASSWORD to these URLs (the state dir here is the stack's own).
        "CELERY_BROKER_URL": f"redis://{REDIS}/{broker_db}",
        "CELERY_RPC_BACKEND": f"redis://{REDIS}/{rpc_db}",
        "REDIS_PASSWORD": redis_password(),
        # Host keys: the Procfile's compute worker has hosts[0]'s; a fleet derives its hosts' keys from
        # the secret; Stack.host_key gives the others'. Every host of the stack joins enabled, and so do
        # the extra workers named after them (ExtraWorker: "<host>-b").
        "CLOUDCTL_HOST_KEY_SECRET": host_key_secret,
        "COMPUTE_HOST_KEY": credentials.host_key(host_key_secret, hosts[0], credentials.FIRST_GENERATION),
        "COMPUTE_TRUSTED_HOSTS": ",".join([*hosts, *(f"{host}-*" for host in hosts)]),
        "COMPUTE_HOST": hosts[0],
        "COMPUTE_LIBVIRT_URI": "qemu:///system",
        "COMPUTE_HEARTBEAT_INTERVAL": "2",
        "INSTANCES_PATH": str(instances),
        "FLOWER_PORT": str(flower_port),
        "FLOWER_BASIC_AUTH": "flower:e2e-flower",
        # Short deadlines and a fast reaper, so the test of a stuck task does not wait minutes.
        "TASK_DEADLINE_PAUSING": "8",
        "REAPER_INTERVAL": "2",
        "WEB_WORKERS": "2",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    })
    if "E2E_VIRT_TYPE" in os.environ:
        env["COMPUTE_VIRT_TYPE"] = os.environ["E2E_VIRT_TYPE"]
    for db in redis_dbs:
        subprocess.run(["redis-cli", "-n", str(db), "flushdb"], check=True, capture_output=True,
                       env=redis_cli_env())
    manage = [str(VENV_BIN / "python"), "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=REPO, env=env, check=True)
    subprocess.run([*manage, "collectstatic", "--noinput", "-v0"], cwd=REPO, env=env, check=True)
    subprocess.run([*manage, "bootstrap", "--image", str(tiny_image_path)], cwd=REPO, env=env,
                   check=True, capture_output=True)

    log_path = state / "honcho.log"
    launcher = ([str(VENV_BIN / "python"), str(REPO / "tools" / "supervise.py"), "-f", str(procfile), "-d",
                 str(REPO), "--backoff-initial", "0.5", "--backoff-max", "2", "--grace", "5"] if supervised
                else [str(VENV_BIN / "honcho"), "-f", str(procfile), "-d", str(REPO), "start"])
    with open(log_path, "wb") as log:
        honcho = subprocess.Popen(launcher,
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    stack = Stack(url=f"http://127.0.0.1:{port}", flower_url=f"http://127.0.0.1:{flower_port}",
                  host=hosts[0], instances_path=instances, env=env, log_path=log_path)
    beside = ExitStack()
    try:
        if companions is not None:
            beside.enter_context(companions(stack))

        def token() -> str:
            try:
                answer = requests.post(f"{stack.url}/api/v1/auth/token/", timeout=5,
                                       json={"username": "admin", "password": "e2e-password"})
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting
                return ""
            return answer.json().get("token", "") if answer.status_code == 200 else ""

        stack.token = stack.wait_for("web answers", token, 60)

        def all_up() -> bool:
            up = {h["name"] for h in stack.api("GET", "/api/v1/hosts/").json()
                  if h["state"] == "up"}
            return set(hosts) <= up

        stack.wait_for(f"{len(hosts)} host(s) heartbeat", all_up, 90)
        yield stack
    finally:
        try:
            beside.close()  # companions stop first: workers report host_stopping to a live conductor
        finally:
            honcho.send_signal(signal.SIGTERM)
            try:
                honcho.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait()
            remove_leftover_domains(instances)
            shutil.rmtree(instances, ignore_errors=True)
            if drop_database is not None:
                drop_database()


def remove_leftover_domains(instances: Path) -> None:
    """A failed test must not leave guests running: destroy domains whose files live here."""
    import libvirt

    from testbed.domains import remove_domains

    conn = libvirt.open("qemu:///system")
    try:
        remove_domains(conn, lambda domain: str(instances) in domain.XMLDesc())
    finally:
        conn.close()


class ExtraWorker:
    """A compute worker for a second host name, outside honcho, that a test may SIGKILL,
    SIGSTOP and restart (honcho would stop every process when one dies)."""

    def __init__(self, stack: Stack, name: str, instances: Path) -> None:
        self.stack, self.name, self.instances = stack, name, instances
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = instances.parent / f"{name}.log"

    def start(self) -> None:
        env = {**self.stack.env, "COMPUTE_HOST": self.name, "INSTANCES_PATH": str(self.instances),
               "COMPUTE_HOST_KEY": self.stack.host_key(self.name), "COMPUTE_VIRT_TYPE": "qemu"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "python"), "-m", "compute_workers", "--host", self.name],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
        if signum == signal.SIGKILL:
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
