"""Host weighers with Nova's names: ``weigh(host_state, spec)`` returns a raw number.

The handler normalises each weigher's numbers to 0..1 across the candidate hosts, multiplies by
the weigher's multiplier (negative to stack instead of spread) and sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from scheduler.filters import UnknownPluginError
from scheduler.host_state import HostState, RequestSpec


class BaseWeigher:
    name = "BaseWeigher"

    def weigh(self, host_state: HostState, spec: RequestSpec) -> float:
        raise NotImplementedError


class RAMWeigher(BaseWeigher):
    name = "RAMWeigher"

    def weigh(self, host_state: HostState, spec: RequestSpec) -> float:
        return host_state.free_ram_mb


class CPUWeigher(BaseWeigher):
    name = "CPUWeigher"

    def weigh(self, host_state: HostState, spec: RequestSpec) -> float:
        return host_state.free_vcpus


class DiskWeigher(BaseWeigher):
    name = "DiskWeigher"

    def weigh(self, host_state: HostState, spec: RequestSpec) -> float:
        return host_state.free_disk_gb


class ServerGroupSoftAffinityWeigher(BaseWeigher):
    """soft-affinity: prefer hosts already running members of the group."""

    name = "ServerGroupSoftAffinityWeigher"

    def weigh(self, host_state: HostState, spec: RequestSpec) -> float:
        if spec.group_policy != "soft-affinity":
            return 0.0
        return float(spec.group_hosts.get(host_state.name, 0))


class ServerGroupSoftAntiAffinityWeigher(BaseWeigher):
    """soft-anti-affinity: prefer hosts running fewer members of the group."""

    name = "ServerGroupSoftAntiAffinityWeigher"

    def weigh(self, host_state: HostState, spec: RequestSpec) -> float:
        if spec.group_policy != "soft-anti-affinity":
            return 0.0
        return -float(spec.group_hosts.get(host_state.name, 0))


ALL_WEIGHERS: dict[str, type[BaseWeigher]] = {
    cls.name: cls for cls in (RAMWeigher, CPUWeigher, DiskWeigher,
                              ServerGroupSoftAffinityWeigher, ServerGroupSoftAntiAffinityWeigher)
}


def load_weighers(names: Sequence[str], multipliers: Mapping[str, float]) -> list[
        tuple[BaseWeigher, float]]:
    unknown = [name for name in names if name not in ALL_WEIGHERS]
    if unknown:
        raise UnknownPluginError(f"unknown scheduler weigher(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(ALL_WEIGHERS))}")
    return [(ALL_WEIGHERS[name](), multipliers.get(name, 1.0)) for name in names]


def _normalise(values: Sequence[float]) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        return [0.0 for _ in values]
    return [(value - low) / (high - low) for value in values]


def weigh_hosts(hosts: Sequence[HostState], spec: RequestSpec,
                weighers: Sequence[tuple[BaseWeigher, float]]) -> list[tuple[HostState, float]]:
    """Hosts with their total weight, best first (ties broken by name, so results are stable)."""
    totals = [0.0] * len(hosts)
    for weigher, multiplier in weighers:
        if not hosts or multiplier == 0:
            continue
        normalised = _normalise([weigher.weigh(h, spec) for h in hosts])
        totals = [t + multiplier * n for t, n in zip(totals, normalised, strict=True)]
    ranked = sorted(zip(hosts, totals, strict=True), key=lambda pair: (-pair[1], pair[0].name))
    return ranked
