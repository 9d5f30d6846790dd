"""Live and cold migration of the demo guest through the REST API, between real libvirt hosts.

Starts the multi-host test harness (three libvirt hosts on this machine: host-a with private
storage, host-b and host-c sharing theirs), the whole cloudctl on them (web, scheduler, conductor,
beat, one compute worker per host), boots the demo guest and moves it round the hosts
``--rounds`` times: a→b (block migration), b→c (shared storage), c→a (block), then cold-migrates
it ``--cold`` times.

    .venv/bin/python bench/migration.py [--rounds 5] [--cold 3]

Prints, per kind, the time from POST to the migration completed (the server's host changed) and
libvirt's downtime (the guest paused for the switch-over), median and range. Needs root, Redis and
libvirtd (tools/services.sh start); uses PostgreSQL when DATABASE_URL is set, else SQLite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The same launcher and harness the multi-host tests use.
from testbed.cloud import host_workers  # noqa: E402
from testbed.hosts import NamespaceHosts, missing_capabilities  # noqa: E402
from testbed.images import tiny_image  # noqa: E402
from testbed.stack import Stack, procfile_processes, run_stack  # noqa: E402

ROUTE = (("host-b", "block"), ("host-c", "shared storage"), ("host-a", "block"))
# A request answers 202 "checking" at once; the pre-flight checks, then the steps, follow. A refusal
# by the checks ("refused") ends it too: the bench stops with its error instead of waiting it out.
ENDED = ("completed", "confirmed", "failed", "cancelled", "error", "refused")


def wait(what: str, check: Any, timeout: float = 120, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(interval)
    raise SystemExit(f"{what}: not within {timeout} s")


def migrate(stack: Stack, server_id: str, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    answer = stack.api("POST", f"/api/v1/servers/{server_id}/{path}/", json=body)
    if answer.status_code != 202:
        raise SystemExit(f"{path} refused: {answer.status_code} {answer.text}")
    migration_id = answer.json()["id"]

    def ended() -> dict[str, Any] | None:
        found = stack.api("GET", f"/api/v1/servers/{server_id}/migrations/{migration_id}/").json()
        server = stack.api("GET", f"/api/v1/servers/{server_id}/").json()
        return found if found["status"] in ENDED and server["task_state"] is None else None

    done = wait(f"migration {migration_id}", ended)
    seconds = time.monotonic() - started
    if done["status"] not in ("completed", "confirmed"):
        raise SystemExit(f"migration {migration_id} ended {done['status']}: {done['error']}")
    return seconds, done


def summary(label: str, values: list[float], unit: str) -> str:
    if not values:
        return f"{label}: no figures"
    return (f"{label}: median {statistics.median(values):.2f} {unit}, min {min(values):.2f}, "
            f"max {max(values):.2f} ({len(values)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cold", type=int, default=3)
    args = parser.parse_args()
    reason = missing_capabilities()
    if reason:
        raise SystemExit(f"cannot run the harness here: {reason}")
    image = tiny_image()  # built (tools/build-tiny-image.sh) when missing, as the tests do
    harness = NamespaceHosts(count=3, shared=(("host-b", "host-c"),))
    harness.start()
    try:
        workers: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as state, run_stack(
                image, Path(state), procfile=procfile_processes(without=("compute", "flower")),
                hosts=[host.name for host in harness.hosts], redis_dbs=(5, 4),
                extra_env={"COMPUTE_MIGRATION_UNSAFE": "1"},
                companions=lambda stack: host_workers(harness, stack, workers)) as stack:
            created = stack.api("POST", "/api/v1/servers/", json={
                "name": "bench", "flavor": "m1.nano", "image": "tiny", "host": "host-a"})
            server_id = created.json()["id"]

            def ready_on(host: str) -> None:
                """The guest finished booting (it would miss an ACPI shutdown request before)."""
                console = harness.host(host).local_instances / server_id / "console.log"
                wait(f"guest ready on {host}", lambda: console.exists() and "cloudctl-guest: ready" in
                     console.read_text(errors="replace"))

            ready_on("host-a")
            times: dict[str, list[float]] = {}
            downtimes: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for host, kind in ROUTE:
                    seconds, done = migrate(stack, server_id, "live-migrate", {"host": host})
                    times.setdefault(kind, []).append(seconds)
                    if done["downtime_ms"] is not None:  # libvirt's figure, from the destination
                        downtimes.setdefault(kind, []).append(float(done["downtime_ms"]))
            cold = []
            for _ in range(args.cold):
                where = stack.api("GET", f"/api/v1/servers/{server_id}/").json()["host"]
                dest = "host-b" if where == "host-a" else "host-a"
                seconds, _done = migrate(stack, server_id, "migrate", {"host": dest})
                cold.append(seconds)
                ready_on(dest)
            stack.api("DELETE", f"/api/v1/servers/{server_id}/")
            print("\nlive migration of the demo guest (128 MiB, TCG), POST -> completed:")
            for kind in times:
                print("  " + summary(kind, times[kind], "s"))
                print("  " + summary(f"{kind} downtime", downtimes.get(kind, []), "ms"))
            print("cold migration of the booted guest, POST -> confirmed (ACPI shutdown, disk copied, "
                  "started there):")
            print("  " + summary("cold", cold, "s"))
    finally:
        harness.stop()


if __name__ == "__main__":
    main()
