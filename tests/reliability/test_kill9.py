"""kill -9 of each process at random points (issue 19, fault 3), on a real stack.

Every process of the Procfile runs under tools/supervise.py (what ``make run`` uses), so a killed one is
restarted as it would be there; two compute workers run the fake driver with their domains in state
files (``COMPUTE_FAKE_STATE_DIR``: they outlive the worker as libvirt's do). While a workload of
creates, deletes, reboots, stops/starts and snapshots runs, SIGKILL hits the web (mid-request), the
scheduler (mid-claim), the conductor (mid-report), a compute worker mid-spawn and one mid-delete, and
beat; the moments are random, from a seed printed at the start (``CHAOS_SEED=<seed>`` replays it). Then,
with short deadlines, the invariants of :mod:`testbed.invariants` must hold: nothing stuck, no claim
leaked, doubled or missing, no domain without its server nor server without its domain, every action
finished.

Not covered: a kill mid-live-migration (the fake driver migrates only between drivers of one process,
and a fleet killed is every host at once) and mid-resize; the multi-host tests cover their recovery
with libvirt (tests/control/test_migrations.py, migrations_recover).
"""

from __future__ import annotations

import os
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from compute_workers import credentials
from testbed.invariants import Report, check_stack
from testbed.stack import Stack, procfile_processes, run_stack

HOSTS = ["chaos-1", "chaos-2"]
SPAWN_SECONDS = 1.5
DESTROY_SECONDS = 1.0
BUILD_TIMEOUT = 25
TASK_DEADLINE = 15
REAPER_INTERVAL = 2
SEED = int(os.environ.get("CHAOS_SEED") or secrets.randbelow(2**31))


def _env() -> dict[str, str]:
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
            "CLOUDCTL_LOG_LEVEL": "INFO", "SCHEDULER_CONCURRENCY": "2", "CONDUCTOR_CONCURRENCY": "2"}


@pytest.fixture(scope="module")
def chaos(tiny_image_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    print(f"\nkill -9 chaos seed: CHAOS_SEED={SEED}")
    state = tmp_path_factory.mktemp("chaos")
    fake_state = state / "hypervisors"
    secret = secrets.token_hex(32)
    processes = procfile_processes(without=("compute", "flower"))
    for host in HOSTS:
        key = credentials.host_key(secret, host, credentials.FIRST_GENERATION)
        processes[host] = (f"COMPUTE_HOST_KEY={key} COMPUTE_FAKE_STATE_DIR={fake_state} "
                           f"python -m compute_workers --host {host} --driver fake --concurrency 4")
    with run_stack(tiny_image_path, state, procfile=processes, hosts=HOSTS, redis_dbs=(6, 7),
                   extra_env={**_env(), "CLOUDCTL_HOST_KEY_SECRET": secret}, supervised=True) as stack:
        yield stack, fake_state


class Workload:
    """Clients doing random operations on their servers until stopped; what each answer was."""

    def __init__(self, stack: Stack, rng: random.Random, servers: int = 6) -> None:
        self.stack, self.rng, self.target = stack, rng, servers
        self.outcomes: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()

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
        answer = self.call("GET", "/api/v1/servers/?limit=200")
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

    def run(self) -> None:
        while not self.stop.is_set():
            self.step()
            time.sleep(self.rng.uniform(0.05, 0.4))


def _wait_task(workload: Workload, host: str, task: str, timeout: float = 20) -> bool:
    """Wait until a server on ``host`` is in ``task`` (the workload makes one, or this does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for server in workload.servers():
            if server.get("host") == host and server.get("task_state") == task:
                return True
        time.sleep(0.1)
    return False


def _restarted(stack: Stack, name: str, group: int, timeout: float = 30) -> None:
    def again() -> bool:
        try:
            return stack.process_group(name) != group
        except LookupError:
            return False

    stack.wait_for(f"{name} restarted by the supervisor", again, timeout)


def test_kill9_of_each_process_at_random_points_leaves_nothing_stuck_leaked_or_orphaned(chaos):
    stack, fake_state = chaos
    rng = random.Random(SEED)
    workload = Workload(stack, rng)
    clients = [threading.Thread(target=workload.run, daemon=True) for _ in range(2)]
    for client in clients:
        client.start()
    kills: list[str] = []
    try:
        time.sleep(4)  # servers building and running
        targets = ["web", "scheduler", "conductor", "beat", "spawn", "delete"]
        rng.shuffle(targets)
        for target in targets:
            if target == "spawn":
                host = rng.choice(HOSTS)
                if _wait_task(workload, host, "spawning"):
                    time.sleep(rng.uniform(0, SPAWN_SECONDS))
                name = host
            elif target == "delete":
                host = rng.choice(HOSTS)
                if _wait_task(workload, host, "deleting"):
                    time.sleep(rng.uniform(0, DESTROY_SECONDS))
                name = host
            else:
                time.sleep(rng.uniform(0.2, 2.0))
                name = target
            group = stack.kill(name)
            kills.append(f"{target}:{name}")
            _restarted(stack, name, group)
        time.sleep(3)
    finally:
        workload.stop.set()
        for client in clients:
            client.join(30)
    print(f"kills: {kills}; workload answers: {dict(workload.outcomes)}")
    assert sum(n for what, n in workload.outcomes.items() if what.endswith(" 202")) >= 10, workload.outcomes
    assert not [what for what in workload.outcomes if what.endswith(" 500")], workload.outcomes

    # Recovery: every task ends (reports, host_init, the reapers) and then the invariants hold.
    last: list[Report] = []

    def settled() -> bool:
        report = check_stack(stack, fake_state=fake_state, slack=2 * REAPER_INTERVAL + 2)
        last[:] = [report]
        return report.in_flight == 0 and report.ok

    try:
        stack.wait_for("every task ended and the invariants hold", settled, BUILD_TIMEOUT + 40, interval=2)
    except AssertionError:
        report = last[0] if last else None
        pytest.fail(f"seed {SEED}, kills {kills}: after recovery\n"
                    f"{report.describe() if report else 'no report'}\n"
                    f"in flight: {report.in_flight if report else '?'}\n--- log ---\n{stack.log_tail(150)}")
    supervisor_log = stack.log_path.read_text(errors="replace")
    assert "Unrecoverable error" not in supervisor_log
