"""Scheduler benchmark: 1,000 simulated hosts in the database, real filters, weighers and claims.

Run (SQLite in a temporary file, or PostgreSQL when DATABASE_URL is set; a database of its own
named ``cloudctl_bench`` is created next to the one DATABASE_URL names):

    .venv/bin/python bench/scheduler.py [--hosts 1000] [--decisions 300] [--placements 600]

Prints p50/p95/p99 of one scheduling decision (load host states + filters + weighers + claim, as
``cloudctl.compute.scheduling.schedule_instance`` does it) and sustained placements per second with 1, 2
and 4 scheduler processes working the same queue of servers, with the ratio to one process.
Compute messages are not sent (the hosts are rows, not workers): this measures the scheduler.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _prepare_database() -> None:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith("postgres"):
        import psycopg2

        parsed = urlparse(url)
        admin = psycopg2.connect(dbname=parsed.path.lstrip("/"), user=parsed.username,
                                 password=parsed.password, host=parsed.hostname,
                                 port=parsed.port or 5432)
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute('DROP DATABASE IF EXISTS "cloudctl_bench" WITH (FORCE)')
            cursor.execute('CREATE DATABASE "cloudctl_bench"')
        admin.close()
        os.environ["DATABASE_URL"] = urlunparse(parsed._replace(path="/cloudctl_bench"))
    else:
        state = tempfile.mkdtemp(prefix="cloudctl-bench-")
        os.environ["DATABASE_URL"] = f"sqlite:///{state}/bench.sqlite3"
        os.environ.setdefault("CLOUDCTL_STATE_DIR", state)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cloudctl.settings")
    os.environ.setdefault("CLOUDCTL_LOG_LEVEL", "WARNING")


def _setup_django() -> None:
    import django

    django.setup()
    from cloudctl.compute import rpc

    rpc.cast = lambda *args, **kwargs: None  # hosts are simulated rows: nothing to send to


def _seed(hosts: int) -> None:
    import random
    import subprocess

    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.utils import timezone

    from cloudctl.compute.models import Host
    from cloudctl.compute.services import flavors_seed
    from cloudctl.identity.models import Project
    from cloudctl.identity.services import role_assign
    from cloudctl.images.services import image_import
    from cloudctl.quotas.services import quota_update

    call_command("migrate", verbosity=0)
    rng = random.Random(7)
    now = timezone.now()
    Host.objects.bulk_create([
        Host(name=f"fake-{i:04d}", vcpus=rng.choice([16, 32, 64]),
             memory_mb=rng.choice([65536, 131072, 262144]), disk_gb=2000, last_heartbeat=now,
             hypervisor_type="QEMU", virt_type="qemu", driver="fake", cpu_info={"arch": "x86_64"})
        for i in range(hosts)])
    project = Project.objects.create(name="bench")
    # Hundreds of pending servers in one project: the scheduler is measured, not the quotas.
    quota_update(project=project, limits={"instances": -1, "cores": -1, "ram": -1})
    user = get_user_model().objects.create_user(username="bench", password="bench")
    role_assign(user=user, project=project)
    flavors_seed()
    disk = Path(tempfile.mkdtemp()) / "bench.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    image_import(name="bench", source=disk, disk_format="qcow2")


def _pending(count: int) -> list[str]:
    from django.contrib.auth import get_user_model

    from cloudctl.compute.models import Flavor
    from cloudctl.compute.services import server_create
    from cloudctl.identity.models import Project
    from cloudctl.images.models import Image

    user = get_user_model().objects.get(username="bench")
    project = Project.objects.get(name="bench")
    flavor = Flavor.objects.get(name="m1.small")
    image = Image.objects.get(name="bench")
    return [str(server_create(user=user, project=project, name=f"b{i}", flavor=flavor,
                              image=image).uuid) for i in range(count)]


def _work(uuids: list[str], results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    _setup_django()
    from cloudctl.compute.scheduling import schedule_instance

    placed = sum(1 for uuid in uuids if schedule_instance(uuid))
    results.put(placed)


def _throughput(processes: int, count: int) -> tuple[float, int]:
    uuids = _pending(count)
    from django.db import connections

    connections.close_all()
    results: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    slices = [uuids[i::processes] for i in range(processes)]
    workers = [multiprocessing.Process(target=_work, args=(s, results)) for s in slices]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    placed = sum(results.get() for _ in workers)
    for worker in workers:
        worker.join()
    return placed / (time.perf_counter() - started), placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=300)
    parser.add_argument("--placements", type=int, default=600)
    args = parser.parse_args()
    _prepare_database()
    _setup_django()
    _seed(args.hosts)
    from django.db import connection

    from cloudctl.compute.scheduling import schedule_instance

    print(f"database: {connection.vendor}; hosts: {args.hosts}")
    timings = []
    for uuid in _pending(args.decisions):
        started = time.perf_counter()
        assert schedule_instance(uuid), "a decision failed to place a server"
        timings.append((time.perf_counter() - started) * 1000)
    cuts = statistics.quantiles(timings, n=100)
    print(f"one decision (load {args.hosts} host states + filters + weighers + claim), "
          f"{len(timings)} runs: p50 {cuts[49]:.1f} ms  p95 {cuts[94]:.1f} ms  "
          f"p99 {cuts[98]:.1f} ms")
    connection.close()
    base = None
    for processes in (1, 2, 4):
        rate, placed = _throughput(processes, args.placements)
        base = base or rate
        print(f"{processes} scheduler process(es): {rate:7.1f} placements/s "
              f"({placed} placed; x{rate / base:.2f} of one process)")


if __name__ == "__main__":
    main()
