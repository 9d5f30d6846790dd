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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import chaos as bed
from testbed.stack import Stack, run_stack

HOSTS = ["chaos-1", "chaos-2"]
SEED = int(os.environ.get("CHAOS_SEED") or secrets.randbelow(2**31))


@pytest.fixture(scope="module")
def chaos(tiny_image_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    print(f"\nkill -9 chaos seed: CHAOS_SEED={SEED}")
    state = tmp_path_factory.mktemp("chaos")
    fake_state = state / "hypervisors"
    secret = secrets.token_hex(32)
    processes = bed.chaos_processes(secret, fake_state, HOSTS)
    with run_stack(tiny_image_path, state, procfile=processes, hosts=HOSTS, redis_dbs=(6, 7),
                   extra_env={**bed.chaos_env(), "CLOUDCTL_HOST_KEY_SECRET": secret},
                   supervised=True) as stack:
        yield stack, fake_state


def test_kill9_of_each_process_at_random_points_leaves_nothing_stuck_leaked_or_orphaned(chaos):
    stack, fake_state = chaos
    rng = random.Random(SEED)
    workload = bed.Workload(stack, rng)
    workload.start()
    kills: list[str] = []
    try:
        time.sleep(4)  # servers building and running
        targets = list(bed.KILL_TARGETS)
        rng.shuffle(targets)
        for target in targets:
            kills.append(f"{target}:{bed.kill(stack, workload, target, rng, HOSTS)}")
        time.sleep(3)
    finally:
        workload.finish()
    print(f"kills: {kills}; workload answers: {dict(workload.outcomes)}")
    summary = workload.summary()
    assert summary["accepted"] >= 10, workload.outcomes
    assert not [what for what in workload.outcomes if what.endswith(" 500")], workload.outcomes

    # Recovery: every task ends (reports, host_init, heartbeats, the reapers), then the invariants hold.
    report, seconds = bed.wait_recovered(stack, fake_state, bed.BUILD_TIMEOUT + 40)
    assert seconds is not None, (f"seed {SEED}, kills {kills}: after recovery\n{report.describe()}\n"
                                 f"in flight: {report.in_flight}\n--- log ---\n{stack.log_tail(150)}")
    print(f"recovered {seconds:.1f} s after the workload stopped")
    assert "Unrecoverable error" not in stack.log_path.read_text(errors="replace")
