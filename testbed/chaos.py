"""Faults on a running stack and the workload they hit: what ``tests/reliability/test_kill9.py`` and
``bench/chaos.py`` share.

- :func:`chaos_env` / :func:`chaos_processes`: a stack whose deadlines are short (so that recovery is
  seconds, not the production's minutes), with compute workers on the fake driver whose domains
  outlive them (``COMPUTE_FAKE_STATE_DIR``) and, for scale, a fleet of fake hosts beside them;
- :class:`Workload`: clients creating, deleting, rebooting, stopping/starting and snapshotting servers
  through the API, counting every answer;
- :func:`kill`: SIGKILL of one process at a random moment, aimed where it hurts (a compute worker
  while one of its servers spawns or is deleted);
- :func:`wait_recovered`: until no task is in flight and :mod:`testbed.invariants` hold, or a timeout.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from compute_workers import credentials
from testbed.invariants import Report, check_stack
from testbed.stack import Stack, procfile_processes

SPAWN_SECONDS = 1.5
DESTROY_SECONDS = 1.0
BUILD_TIMEOUT = 25
TASK_DEADLINE = 15
REAPER_INTERVAL = 2
# A compute worker is killed while one of its servers is in this task state (else at a random moment).
KILL_TARGETS = ("web", "scheduler", "conductor", "beat", "spawn", "delete")
_AIMED = {"spawn": "spawning", "delete": "deleting"}


def chaos_env() -> dict[str, str]:
    """Settings of a chaos stack: every deadline short, the reaper and heartbeats frequent."""
    deadlines = {f"TASK_DEADLINE_{task}": str(TASK_DEADLINE) for task in (
        "REBOOTING", "REBOOTING_HARD", "POWERING_OFF", "POWERING_ON", "DELETING", "IMAGE_SNAPSHOT",
        "IMAGE_UPLOADING", "PAUSING", "UNPAUSING", "SUSPENDING", "RESUMING")}
    return {**deadlines, "INSTANCE_BUILD_TIMEOUT": str(BUILD_TIMEOUT), "BUILD_REPORT_GRACE": "3",
            "REAPER_INTERVAL": str(REAPER_INTERVAL), "SERVICE_DOWN_TIME": "20",
            "MIGRATION_STEP_TIMEOUT": "10", "CLEAN_SHUTDOWN_TIMEOUT": "2",
            "COMPUTE_HEARTBEAT_INTERVAL": "2", "COMPUTE_DRIVER": "fake",
            "COMPUTE_FAKE_SPAWN_DELAY": str(SPAWN_SECONDS),
            "COMPUTE_FAKE_DESTROY_DELAY": str(DESTROY_SECONDS),
            "QUOTA_INSTANCES": "-1", "QUOTA_CORES": "-1", "QUOTA_RAM": "-1",
            "SCHEDULER_CONCURRENCY": "2", "CONDUCTOR_CONCURRENCY": "2"}


def chaos_processes(secret: str, fake_state: Path, hosts: list[str], *, fleet: int = 0,
                    fleet_prefix: str = "fleet-") -> dict[str, str]:
    """The Procfile's web, scheduler, conductor and beat, one fake compute worker per name of ``hosts``
    (each signing with its key from ``secret``, the stack's CLOUDCTL_HOST_KEY_SECRET) and, with
    ``fleet``, one ``compute_workers.fleet`` process simulating that many more hosts."""
    processes = procfile_processes(without=("compute", "flower"))
    for host in hosts:
        key = credentials.host_key(secret, host, credentials.FIRST_GENERATION)
        # Each its own INSTANCES_PATH: the fake driver keeps its disks in its process, so two fake
        # workers can share no storage (their evacuations rebuild from the image).
        processes[host] = (f"COMPUTE_HOST_KEY={key} COMPUTE_FAKE_STATE_DIR={fake_state} "
                           f"INSTANCES_PATH={fake_state / ('instances-' + host)} "
                           f"python -m compute_workers --host {host} --driver fake --concurrency 4")
    if fleet:
        processes["fleet"] = (f"python -m compute_workers.fleet --hosts {fleet} --prefix {fleet_prefix} "
                              f"--heartbeat-interval 2 --spawn-delay {SPAWN_SECONDS} "
                              f"--destroy-delay {DESTROY_SECONDS} --loglevel warning")
    return processes


class Workload:
    """Clients doing random operations on their servers (about ``servers`` of them) until stopped."""

    def __init__(self, stack: Stack, rng: random.Random, servers: int = 6) -> None:
        self.stack, self.rng, self.target = stack, rng, servers
        self.outcomes: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response | None:
        try:
            return self.stack.api(method, path, **kwargs)
        except requests.RequestException:  # the web process died under the request
            with self.lock:
                self.outcomes["connection lost"] += 1
            return None

    def note(self, what: str, answer: requests.Response | None) -> None:
        if answer is not None:
            with self.lock:
                self.outcomes[f"{what} {answer.status_code}"] += 1

    def servers(self) -> list[dict[str, Any]]:
        answer = self.call("GET", "/api/v1/servers/?limit=500")
        if answer is None or answer.status_code != 200:
            return []
        body = answer.json()
        return [s for s in (body["results"] if isinstance(body, dict) else body) if s["status"] != "DELETED"]

    def step(self) -> None:
        servers = self.servers()
        if len(servers) < self.target or not servers:
            self.note("create", self.call("POST", "/api/v1/servers/", json={
                "name": f"chaos-{self.rng.randrange(10**6)}", "flavor": "m1.nano", "image": "tiny"}))
            return
        server = self.rng.choice(servers)
        path = f"/api/v1/servers/{server['id']}/"
        roll = self.rng.random()
        if server["status"] not in ("ACTIVE", "SHUTOFF") and roll >= 0.25:
            return  # busy: an operation would only be refused (409)
        if roll < 0.25:
            self.note("delete", self.call("DELETE", path))
        elif roll < 0.45:
            kind = self.rng.choice(["SOFT", "HARD"])
            self.note("reboot", self.call("POST", f"{path}reboot/", json={"type": kind}))
        elif roll < 0.75:
            action = "start" if server["status"] == "SHUTOFF" else "stop"
            self.note(action, self.call("POST", f"{path}{action}/"))
        else:
            self.note("snapshot", self.call("POST", f"{path}snapshot/", json={"name": "chaos-snap"}))

    def _run(self) -> None:
        while not self.stop.is_set():
            self.step()
            time.sleep(self.rng.uniform(0.05, 0.4))

    def start(self, clients: int = 2) -> None:
        self.stop.clear()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def summary(self) -> dict[str, int]:
        """attempted (API calls that change something), accepted (2xx), refused (4xx: a state that
        does not allow it), failed with the fault (the connection lost, 5xx)."""
        counts = {"attempted": 0, "accepted": 0, "refused": 0, "failed": 0}
        for what, number in self.outcomes.items():
            counts["attempted"] += number
            code = what.rsplit(" ", 1)[-1]
            if code.startswith("2"):
                counts["accepted"] += number
            elif code.startswith("4"):
                counts["refused"] += number
            else:
                counts["failed"] += number
        return counts


def _wait_task(workload: Workload, hosts: list[str], task: str, timeout: float) -> str | None:
    """A host of ``hosts`` on which a server is in ``task`` within ``timeout`` s, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for server in workload.servers():
            if server.get("host") in hosts and server.get("task_state") == task:
                return str(server["host"])
        time.sleep(0.1)
    return None


def kill(stack: Stack, workload: Workload, target: str, rng: random.Random, hosts: list[str]) -> str:
    """SIGKILL ``target`` (a process name, or ``spawn``/``delete``: the compute worker of ``hosts`` on
    which a server is spawning/being deleted, within that operation) and wait for the supervisor to
    start it again. Returns the process killed."""
    if target in _AIMED:
        name = _wait_task(workload, hosts, _AIMED[target], 20) or rng.choice(hosts)
        time.sleep(rng.uniform(0, SPAWN_SECONDS if target == "spawn" else DESTROY_SECONDS))
    else:
        time.sleep(rng.uniform(0.2, 2.0))
        name = target
    group = stack.kill(name)

    def again() -> bool:
        try:
            return stack.process_group(name) != group
        except LookupError:
            return False

    stack.wait_for(f"{name} restarted by the supervisor", again, 30)
    return name


def wait_recovered(stack: Stack, fake_state: Path | None, timeout: float) -> tuple[Report, float | None]:
    """Check the invariants every 2 s until no task is in flight and they hold; returns the last report
    and the seconds it took (None: not within ``timeout``)."""
    started = time.monotonic()
    report = Report()
    while time.monotonic() - started < timeout:
        report = check_stack(stack, fake_state=fake_state, slack=2 * REAPER_INTERVAL + 2)
        if report.in_flight == 0 and report.ok:
            return report, time.monotonic() - started
        time.sleep(2)
    return report, None
