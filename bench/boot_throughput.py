"""End-to-end boot throughput over HTTP with simulated hosts (the fake driver).

Starts web, two scheduler workers, the conductor and a fleet of fake hosts (``python -m
compute_workers.fleet``) on a database of their own, then keeps ``--concurrency`` clients each
doing create -> wait ACTIVE -> delete -> wait gone, until ``--cycles`` cycles are done.

    .venv/bin/python bench/boot_throughput.py [--hosts 1000] [--concurrency 50] [--cycles 300]

Prints the median and p95 time from POST to ACTIVE and boot+delete cycles per minute, with
Nova's published figure for the same shape (1,000 fake hosts, 50 concurrent: median 6.2 s per
boot, about 326 boot+delete per minute) as the ratio. Needs Redis (tools/services.sh start);
uses PostgreSQL when DATABASE_URL is set, else SQLite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.stack import run_stack  # noqa: E402  (the same launcher the e2e tests use)

NOVA_MEDIAN_BOOT_S = 6.2
NOVA_CYCLES_PER_MIN = 326


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=300)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="cloudctl-boot-bench-"))
    image = state / "bench.qcow2"
    import subprocess

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    procfile = state / "Procfile"
    procfile.write_text(
        "web: gunicorn cloudctl.wsgi --bind $CLOUDCTL_BIND --workers 3 --threads 8\n"
        "scheduler1: celery -A cloudctl worker -Q scheduler -n s1@%h -c 2 --loglevel WARNING\n"
        "scheduler2: celery -A cloudctl worker -Q scheduler -n s2@%h -c 2 --loglevel WARNING\n"
        "conductor: celery -A cloudctl worker -Q conductor,conductor.status -n c@%h -c 4 --loglevel WARNING\n"
        f"fleet: python -m compute_workers.fleet --hosts {args.hosts} --prefix bench- "
        "--concurrency 32 --loglevel warning\n")
    width = len(str(args.hosts))
    hosts = [f"bench-{i:0{width}d}" for i in (1, args.hosts)]
    with run_stack(image, state, procfile=procfile, hosts=hosts, redis_dbs=(9, 8),
                   extra_env={"SCHEDULER_HOST_SUBSET_SIZE": "10",
                              "CLOUDCTL_LOG_LEVEL": "WARNING",
                              # --concurrency servers of one project at once: no quota in the way.
                              "QUOTA_INSTANCES": "-1", "QUOTA_CORES": "-1", "QUOTA_RAM": "-1"}) as stack:
        boot_times: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        remaining = [args.cycles]

        def take() -> bool:
            with lock:
                if remaining[0] <= 0:
                    return False
                remaining[0] -= 1
                return True

        def client() -> None:
            while take():
                started = time.monotonic()
                answer = stack.api("POST", "/api/v1/servers/",
                                   json={"name": "bench", "flavor": "m1.nano", "image": "tiny"})
                server_id = answer.json()["id"]
                while True:
                    body = stack.api("GET", f"/api/v1/servers/{server_id}/").json()
                    if body["status"] in ("ACTIVE", "ERROR"):
                        break
                    time.sleep(0.25)
                with lock:
                    if body["status"] == "ACTIVE":
                        boot_times.append(time.monotonic() - started)
                    else:
                        errors.append(str(body["fault"]))
                stack.api("DELETE", f"/api/v1/servers/{server_id}/")
                while stack.api("GET", f"/api/v1/servers/{server_id}/").status_code != 404:
                    time.sleep(0.25)

        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started

    median = statistics.median(boot_times)
    p95 = statistics.quantiles(boot_times, n=20)[18]
    per_minute = len(boot_times) / elapsed * 60
    print(f"{args.hosts} fake hosts, {args.concurrency} concurrent clients, "
          f"{len(boot_times)} boots ({len(errors)} errors) in {elapsed:.1f} s")
    print(f"POST -> ACTIVE: median {median:.2f} s, p95 {p95:.2f} s "
          f"(Nova: median {NOVA_MEDIAN_BOOT_S} s; x{NOVA_MEDIAN_BOOT_S / median:.1f} faster)")
    print(f"boot+delete cycles per minute: {per_minute:.0f} "
          f"(Nova: {NOVA_CYCLES_PER_MIN}; x{per_minute / NOVA_CYCLES_PER_MIN:.2f})")
    if errors:
        print("first error:", errors[0])


if __name__ == "__main__":
    main()
