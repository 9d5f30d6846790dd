"""Chaos bench: faults a real cloud sees, injected into a running cloudctl under a workload (issue 19).

Starts web, scheduler, conductor and beat from the Procfile, two fake compute workers whose domains
outlive them (COMPUTE_FAKE_STATE_DIR) and a fleet of ``--hosts`` more fake hosts, all under
tools/supervise.py (what ``make run`` uses: a killed process is restarted), with short deadlines
(testbed.chaos.chaos_env: build 25 s, tasks 15 s, reaper every 2 s). Then, per scenario, clients
create, delete, reboot, stop/start and snapshot servers while the fault hits; the workload stops,
and the bench waits until no task is in flight and the invariants of testbed.invariants hold.

    .venv/bin/python bench/chaos.py [--hosts 30] [--scenarios kill9-web,broker-restart,...] [--seed N]

Scenarios (default: every one that can run here):

  kill9-web, kill9-scheduler, kill9-conductor, kill9-beat   SIGKILL of that process (its whole group)
  kill9-compute-spawn, kill9-compute-delete                 SIGKILL of a compute worker while one of
                                                            its servers spawns / is being deleted
  broker-restart        SIGKILL of the bench's own redis-server (AOF on), started again 2 s later
                        (always its own: the shared Redis of other users is never touched)
  database-restart      runs --db-stop-command, waits 5 s, runs --db-start-command; only with both
                        given, and they must act on a PostgreSQL of the bench's own (DATABASE_URL):
                        never stop a cluster that other people's processes use
  dead-host             a compute worker frozen (SIGSTOP), seen down, forced down by the admin, its
                        servers evacuated; then it comes back and must remove its stale domains

Prints per scenario: operations attempted, accepted, refused (409: state), failed with the fault
(connection lost, 5xx), stuck past deadline, leaked/doubled/missing claims, orphan and missing
domains, unfinished actions (all of these must be 0) and the seconds from the workload's end until
the invariants held. Needs Redis and redis-server (tools/services.sh start); PostgreSQL when
DATABASE_URL is set, else SQLite. ``--real`` is not implemented: the demo guest on libvirt runs in
tests/e2e; the invariants read libvirt with testbed.invariants.libvirt_domains.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed import chaos as bed  # noqa: E402  (the same harness the kill -9 test uses)
from testbed.broker import OwnRedis, redis_password  # noqa: E402
from testbed.stack import Stack, run_stack  # noqa: E402

HOSTS = ["chaos-1", "chaos-2"]
COLUMNS = ("attempted", "accepted", "refused", "failed", "stuck", "leaked", "doubled", "unclaimed",
           "orphan_domains", "missing_domains", "unfinished_actions")


# --- scenarios: each injects its fault into a stack that runs a workload ----------------------------

Scenario = Callable[[Stack, bed.Workload, random.Random, argparse.Namespace], None]


def kill9(target: str) -> Scenario:
    def scenario(stack: Stack, workload: bed.Workload, rng: random.Random, args: argparse.Namespace) -> None:
        bed.kill(stack, workload, target, rng, HOSTS)
    return scenario


def scenario_broker_restart(stack: Stack, workload: bed.Workload, rng: random.Random,
                            args: argparse.Namespace) -> None:
    time.sleep(rng.uniform(0.5, 2.0))
    args.redis.kill()
    time.sleep(2)
    args.redis.start()


def scenario_database_restart(stack: Stack, workload: bed.Workload, rng: random.Random,
                              args: argparse.Namespace) -> None:
    time.sleep(rng.uniform(0.5, 2.0))
    subprocess.run(shlex.split(args.db_stop_command), check=True)
    time.sleep(5)
    subprocess.run(shlex.split(args.db_start_command), check=True)


def _servers_on(workload: bed.Workload, host: str) -> list[dict[str, Any]]:
    return [server for server in workload.servers() if server.get("host") == host]


def scenario_dead_host(stack: Stack, workload: bed.Workload, rng: random.Random,
                       args: argparse.Namespace) -> None:
    """A host dies under the workload (issue 19, fault 4): its compute worker is frozen (SIGSTOP: no
    heartbeat, its domains still "run", as a hung or cut-off host), seen down after SERVICE_DOWN_TIME,
    fenced by the admin (force-down), and every server on it evacuated (``POST /hosts/{name}/evacuate/``
    with allow_data_loss: fake hosts share no storage). Prints the seconds from the failure to the
    host seen down and to all its evacuated servers running elsewhere. Then the host comes back (its
    worker SIGKILLed, so the supervisor starts it again, as after a reboot): its stale domains must go
    (the invariants count orphans), and its force-down is cleared."""
    victim = HOSTS[1]
    # The clients pause while the host is dead: their deletes of its servers would otherwise race the
    # evacuation being measured (a server being deleted is not evacuated); they resume once it is back.
    workload.finish()
    # Three servers placed there on purpose (the workload's may or may not be), running before it dies.
    for _ in range(3):
        answer = stack.api("POST", "/api/v1/servers/", json={
            "name": f"victim-{rng.randrange(10**6)}", "flavor": "m1.nano", "image": "tiny", "host": victim})
        assert answer.status_code == 202, answer.text
    stack.wait_for(f"servers on {victim} running", lambda: sum(
        server["status"] == "ACTIVE" for server in _servers_on(workload, victim)) >= 3, 60)
    before = _servers_on(workload, victim)
    failed = time.monotonic()
    group = stack.kill(victim, signal.SIGSTOP)

    def state() -> str:
        return str(stack.api("GET", f"/api/v1/hosts/{victim}/").json()["state"])

    stack.wait_for(f"{victim} down", lambda: state() == "down", 120)
    down = time.monotonic() - failed
    if args.auto_evacuate:
        # HOST_FENCE_COMMAND fences it (the bench's command stands for an IPMI power-off that
        # succeeded), then AUTO_EVACUATE moves its servers: nobody calls the API.
        stack.wait_for(f"{victim} fenced", lambda: bool(
            stack.api("GET", f"/api/v1/hosts/{victim}/").json()["forced_down"]), 120)
        moved = [str(server["id"]) for server in before if server["status"] in ("ACTIVE", "SHUTOFF")]
        refused = [f"{server['id']} was {server['status']}" for server in before
                   if server["status"] not in ("ACTIVE", "SHUTOFF")]
    else:
        answer = stack.api("POST", f"/api/v1/hosts/{victim}/force-down/",
                           json={"forced_down": True, "reason": "chaos bench: dead host"})
        assert answer.status_code == 200, answer.text
        answer = stack.api("POST", f"/api/v1/hosts/{victim}/evacuate/", json={"allow_data_loss": True})
        assert answer.status_code in (200, 202), answer.text
        results = answer.json()["servers"]
        moved = [str(row["server"]) for row in results if row.get("accepted")]
        refused = [str(row.get("refused", "")) for row in results if not row.get("accepted")]

    def elsewhere() -> bool:
        for server_id in moved:
            body = stack.api("GET", f"/api/v1/servers/{server_id}/")
            if body.status_code == 404:
                continue  # the workload deleted it meanwhile
            server = body.json()
            if server["host"] == victim or server["status"] not in ("ACTIVE", "SHUTOFF", "ERROR"):
                return False
        return True

    stack.wait_for("evacuated servers running elsewhere", elsewhere, 120)
    running = time.monotonic() - failed
    args.evacuation_seconds.append(running)
    how = "fenced and evacuated automatically" if args.auto_evacuate else "forced down and evacuated by hand"
    print(f"dead-host ({how}): {victim} seen down after {down:.1f} s (SERVICE_DOWN_TIME "
          f"{bed.chaos_env()['SERVICE_DOWN_TIME']} s); {len(moved)} server(s) evacuated, running elsewhere "
          f"{running:.1f} s after the failure; {len(refused)} refused: {sorted(set(refused))[:3]}",
          flush=True)
    os.killpg(group, signal.SIGKILL)  # the host reboots: the supervisor starts its worker again
    stack.wait_for(f"{victim} worker restarted", lambda: stack.process_group(victim) != group, 30)
    answer = stack.api("POST", f"/api/v1/hosts/{victim}/force-down/", json={"forced_down": False})
    assert answer.status_code == 200, answer.text
    workload.start(args.clients)


SCENARIOS: dict[str, Scenario] = {
    **{f"kill9-{name}": kill9(name) for name in ("web", "scheduler", "conductor", "beat")},
    "kill9-compute-spawn": kill9("spawn"),
    "kill9-compute-delete": kill9("delete"),
    "broker-restart": scenario_broker_restart,
    "database-restart": scenario_database_restart,
    "dead-host": scenario_dead_host,
}


def run_scenario(name: str, stack: Stack, fake_state: Path, rng: random.Random,
                 args: argparse.Namespace) -> dict[str, object]:
    workload = bed.Workload(stack, rng, servers=args.servers)
    workload.start(args.clients)
    try:
        time.sleep(args.warmup)
        SCENARIOS[name](stack, workload, rng, args)
        time.sleep(args.after)
    finally:
        workload.finish()
    report, seconds = bed.wait_recovered(stack, fake_state, args.recovery_timeout)
    row: dict[str, object] = {**workload.summary(), **report.counts(), "recover_s": seconds}
    if not report.ok or seconds is None:
        print(f"--- {name}: not recovered\n{report.describe()}\nin flight: {report.in_flight}",
              file=sys.stderr)
    return row


@contextmanager
def bench_stack(args: argparse.Namespace, state: Path) -> Iterator[tuple[Stack, Path]]:
    image = state / "bench.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    fake_state = state / "hypervisors"
    secret = secrets.token_hex(32)
    processes = bed.chaos_processes(secret, fake_state, HOSTS, fleet=args.hosts,
                                    fleet_prefix="chaosfleet-")
    # Its URLs carry no password: the stack's processes add REDIS_PASSWORD to every Redis URL.
    args.redis = OwnRedis(state / "redis", redis_password())
    args.redis.start()
    url = f"redis://127.0.0.1:{args.redis.port}"
    env = {**bed.chaos_env(), "CLOUDCTL_HOST_KEY_SECRET": secret, "CLOUDCTL_LOG_LEVEL": "WARNING",
           "CELERY_BROKER_URL": f"{url}/0", "CELERY_RPC_BACKEND": f"{url}/1"}
    if args.auto_evacuate:
        env.update({"AUTO_EVACUATE": "1", "AUTO_EVACUATE_ALLOW_DATA_LOSS": "1", "HOST_FENCE_COMMAND": "true",
                    "HOST_FENCE_INTERVAL": "2"})
    width = len(str(args.hosts))
    fleet = [f"chaosfleet-{1:0{width}d}", f"chaosfleet-{args.hosts:0{width}d}"] if args.hosts else []
    hosts = [*HOSTS, *fleet]
    try:
        with run_stack(image, state, procfile=processes, hosts=hosts, redis_dbs=(6, 7), extra_env=env,
                       supervised=True) as stack:
            yield stack, fake_state
    finally:
        args.redis.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=30, help="fake hosts of the fleet, beside the two "
                        "compute workers the kill scenarios hit (default 30)")
    parser.add_argument("--scenarios", default="",
                        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all that can run)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed; replays a run)")
    parser.add_argument("--servers", type=int, default=8, help="servers the workload keeps (default 8)")
    parser.add_argument("--clients", type=int, default=2, help="concurrent API clients (default 2)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of workload before the fault")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of workload after the fault")
    parser.add_argument("--recovery-timeout", type=float, default=bed.BUILD_TIMEOUT + 60.0,
                        help="seconds to wait for the invariants after the workload stops")
    parser.add_argument("--db-stop-command", default="", help="stops the bench's own PostgreSQL "
                        "(database-restart runs only with both commands)")
    parser.add_argument("--db-start-command", default="", help="starts it again")
    parser.add_argument("--trials", type=int, default=1,
                        help="dead-host: how many times (the median and p95 of failure -> running elsewhere)")
    parser.add_argument("--auto-evacuate", action="store_true",
                        help="dead-host: AUTO_EVACUATE (with data loss allowed) and a HOST_FENCE_COMMAND "
                             "that succeeds (`true`, standing for an IPMI power-off) every 2 s, instead of "
                             "the admin's force-down and POST /hosts/{name}/evacuate/")
    parser.add_argument("--real", action="store_true", help="not implemented (see above)")
    args = parser.parse_args()
    args.evacuation_seconds = []
    if args.real:
        parser.error("--real is not implemented: the demo guest's faults run in tests/e2e")
    can_restart_db = bool(args.db_stop_command and args.db_start_command)
    wanted = [name for name in args.scenarios.split(",") if name] or [
        name for name in SCENARIOS if name != "database-restart" or can_restart_db]
    unknown = [name for name in wanted if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    if "database-restart" in wanted and not can_restart_db:
        parser.error("database-restart needs --db-stop-command and --db-start-command")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    database = "PostgreSQL" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "SQLite"
    print(f"chaos bench: seed {seed}, {args.hosts} fleet hosts + {len(HOSTS)} killable, database {database}")
    rng = random.Random(seed)
    state = Path(tempfile.mkdtemp(prefix="cloudctl-chaos-"))
    rows: dict[str, dict[str, object]] = {}
    started = time.monotonic()
    with bench_stack(args, state) as (stack, fake_state):
        print(f"stack up in {time.monotonic() - started:.0f} s (log: {stack.log_path})")
        for name in wanted:
            for trial in range(args.trials if name == "dead-host" else 1):
                label = f"{name}#{trial + 1}" if name == "dead-host" and args.trials > 1 else name
                rows[label] = run_scenario(name, stack, fake_state, rng, args)
                print(f"{label}: {rows[label]}", flush=True)
    header = f"{'scenario':22}" + "".join(f"{c[:10]:>11}" for c in COLUMNS) + f"{'recover s':>11}"
    print("\n" + header)
    failed = False
    for name, row in rows.items():
        seconds = row["recover_s"]
        print(f"{name:22}" + "".join(f"{row[c]!s:>11}" for c in COLUMNS)
              + f"{'never' if seconds is None else f'{seconds:.1f}':>11}")
        failed |= seconds is None
    if args.evacuation_seconds:
        times = sorted(args.evacuation_seconds)
        p95 = times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)]
        print(f"\ndead-host: failure -> servers running elsewhere over {len(times)} trial(s): "
              f"median {statistics.median(times):.1f} s, p95 {p95:.1f} s, max {times[-1]:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
