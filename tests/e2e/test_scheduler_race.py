"""60 concurrent creates against simulated hosts with room for exactly 20, two scheduler workers:
exactly 20 ACTIVE, 40 ERROR with the capacity fault, no host past its allocation ratio."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed.stack import Stack, run_stack

pytestmark = pytest.mark.e2e

HOSTS = 5
# 342 MiB x RAM ratio 1.5 = 513 MiB with nothing reserved: four m1.nano (128 MiB) per host.
MEMORY_MB = 342
PER_HOST = 4


@pytest.fixture(scope="module")
def fleet_stack(tiny_image_path: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Stack]:
    prefix = f"race{secrets.token_hex(2)}-"
    state = tmp_path_factory.mktemp("race")
    procfile = state / "Procfile"
    procfile.write_text(
        "web: gunicorn cloudctl.wsgi --bind $CLOUDCTL_BIND --workers 2 --threads 8\n"
        "scheduler1: celery -A cloudctl worker -Q scheduler -n scheduler1@%h --concurrency 2 "
        "--loglevel WARNING\n"
        "scheduler2: celery -A cloudctl worker -Q scheduler -n scheduler2@%h --concurrency 2 "
        "--loglevel WARNING\n"
        "conductor: celery -A cloudctl worker -Q conductor,conductor.status -n conductor@%h --concurrency 2 "
        "--loglevel WARNING\n"
        f"fleet: python -m compute_workers.fleet --hosts {HOSTS} --prefix {prefix} --vcpus 4 "
        f"--memory-mb {MEMORY_MB} --disk-gb 100 --heartbeat-interval 2 --loglevel warning\n")
    hosts = [f"{prefix}{i}" for i in range(1, HOSTS + 1)]
    with run_stack(tiny_image_path, state, procfile=procfile, hosts=hosts, redis_dbs=(11, 10),
                   # 60 servers of one project: the host capacity is what this test measures, not quotas.
                   extra_env={"COMPUTE_RESERVED_HOST_MEMORY_MB": "0", "QUOTA_INSTANCES": "-1",
                              "QUOTA_CORES": "-1"}) as running:
        yield running


def test_sixty_concurrent_creates_fill_exactly_the_room_there_is(fleet_stack: Stack) -> None:
    stack = fleet_stack

    def create(i: int) -> str:
        answer = stack.api("POST", "/api/v1/servers/",
                           json={"name": f"race-{i}", "flavor": "m1.nano", "image": "tiny"})
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    with ThreadPoolExecutor(max_workers=60) as pool:
        ids = list(pool.map(create, range(60)))
    assert len(set(ids)) == 60

    def settled() -> list[dict] | None:
        servers = [s for s in stack.api("GET", "/api/v1/servers/").json() if s["id"] in ids]
        done = [s for s in servers if s["task_state"] is None]
        return servers if len(done) == 60 else None

    servers = stack.wait_for("all 60 servers settle", settled, 180, interval=0.5)
    by_status: dict[str, list[dict]] = {}
    for server in servers:
        by_status.setdefault(server["status"], []).append(server)
    assert {k: len(v) for k, v in by_status.items()} == {"ACTIVE": 20, "ERROR": 40}
    for failed in by_status["ERROR"]:
        assert failed["fault"]["message"].startswith("No valid host was found"), failed["fault"]
    placed: dict[str, int] = {}
    for server in by_status["ACTIVE"]:
        placed[server["host"]] = placed.get(server["host"], 0) + 1
    assert sorted(placed.values()) == [PER_HOST] * HOSTS
    for host in stack.api("GET", "/api/v1/hosts/").json():
        assert host["memory_mb_used"] <= host["memory_mb"] * 1.5 - host["memory_mb_reserved"]
        assert host["instance_count"] == PER_HOST
