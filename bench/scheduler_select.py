"""How long one placement decision takes (filters + weighers, no database) as hosts grow.

Run: .venv/bin/python bench/scheduler_select.py
Prints microseconds per decision for 10, 100 and 1000 hosts and the growth ratio per 10x hosts
(1.0 would be constant time; 10.0 linear).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.filters import load_filters
from scheduler.host_state import HostState, RequestSpec
from scheduler.selection import select_hosts
from scheduler.weighers import CPUWeigher, DiskWeigher, RAMWeigher

FILTERS = load_filters(["RetryFilter", "AvailabilityZoneFilter", "ComputeFilter", "RamFilter",
                        "DiskFilter", "CoreFilter"])
WEIGHERS = [(RAMWeigher(), 1.0), (CPUWeigher(), 1.0), (DiskWeigher(), 1.0)]


def hosts(count: int, rng: random.Random) -> list[HostState]:
    return [HostState(name=f"host-{i}", availability_zone="nova", enabled=rng.random() > 0.02,
                      is_up=rng.random() > 0.02, vcpus=rng.choice([16, 32, 64]),
                      memory_mb=rng.choice([65536, 131072, 262144]), disk_gb=2000,
                      vcpus_used=rng.randint(0, 200), memory_mb_used=rng.randint(0, 60000),
                      disk_gb_used=rng.randint(0, 1500))
            for i in range(count)]


def per_decision_us(count: int, rounds: int) -> float:
    rng = random.Random(count)
    states = hosts(count, rng)
    spec = RequestSpec(instance_uuid="bench", vcpus=2, memory_mb=4096, root_gb=40)
    start = time.perf_counter()
    for _ in range(rounds):
        select_hosts(states, spec, FILTERS, WEIGHERS)
    return (time.perf_counter() - start) / rounds * 1e6


def main() -> None:
    results = {n: per_decision_us(n, max(20, 20000 // n)) for n in (10, 100, 1000)}
    for count, micros in results.items():
        print(f"select_hosts over {count:5d} hosts: {micros:10.1f} us/decision")
    print(f"growth 10 -> 100 hosts:   x{results[100] / results[10]:.1f}")
    print(f"growth 100 -> 1000 hosts: x{results[1000] / results[100]:.1f}")


if __name__ == "__main__":
    main()
