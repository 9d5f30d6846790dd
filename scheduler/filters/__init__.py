"""Host filters with Nova's names. Each is a small class: ``host_passes(host_state, spec)``.

``explain(spec, rejected)`` turns the hosts a filter removed into one sentence for the fault.
Enabled filters and their order come from settings; :func:`load_filters` fails on an unknown name.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.host_state import HostState, RequestSpec


class UnknownPluginError(ValueError):
    """A filter or weigher name in the settings does not exist."""


class BaseHostFilter:
    name = "BaseHostFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        raise NotImplementedError

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return f"{len(rejected)} host(s) rejected by {self.name}"


class RetryFilter(BaseHostFilter):
    """Skip hosts this instance's build already failed on."""

    name = "RetryFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        return host_state.name not in spec.ignore_hosts

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return f"already tried and failed on {', '.join(h.name for h in rejected)}"


class AvailabilityZoneFilter(BaseHostFilter):
    name = "AvailabilityZoneFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        return not spec.availability_zone or host_state.availability_zone == spec.availability_zone

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return f"{len(rejected)} host(s) are not in availability zone {spec.availability_zone}"


class ComputeFilter(BaseHostFilter):
    """Only enabled hosts whose compute worker is up (recent heartbeat)."""

    name = "ComputeFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        return host_state.enabled and host_state.is_up

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        down = [h.name for h in rejected if not h.is_up]
        disabled = [h.name for h in rejected if h.is_up and not h.enabled]
        parts = []
        if down:
            parts.append(f"{len(down)} host(s) down ({', '.join(down[:5])})")
        if disabled:
            parts.append(f"{len(disabled)} host(s) disabled ({', '.join(disabled[:5])})")
        return "; ".join(parts)


class _ResourceFilter(BaseHostFilter):
    unit = ""
    resource = ""

    def free(self, host_state: HostState) -> float:
        raise NotImplementedError

    def wanted(self, spec: RequestSpec) -> int:
        raise NotImplementedError

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        return self.free(host_state) >= self.wanted(spec)

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        best = max(rejected, key=self.free)
        return (f"{len(rejected)} host(s) lack {self.wanted(spec)} {self.unit} {self.resource} "
                f"free; the most free is {self.free(best):g} {self.unit} on {best.name}")


class RamFilter(_ResourceFilter):
    name, unit, resource = "RamFilter", "MiB", "RAM"

    def free(self, host_state: HostState) -> float:
        return host_state.free_ram_mb

    def wanted(self, spec: RequestSpec) -> int:
        return spec.memory_mb


class DiskFilter(_ResourceFilter):
    name, unit, resource = "DiskFilter", "GiB", "disk"

    def free(self, host_state: HostState) -> float:
        return host_state.free_disk_gb

    def wanted(self, spec: RequestSpec) -> int:
        return spec.root_gb


class CoreFilter(_ResourceFilter):
    name, unit, resource = "CoreFilter", "vCPU", "(after allocation ratio)"

    def free(self, host_state: HostState) -> float:
        return host_state.free_vcpus

    def wanted(self, spec: RequestSpec) -> int:
        return spec.vcpus


ALL_FILTERS: dict[str, type[BaseHostFilter]] = {
    cls.name: cls
    for cls in (RetryFilter, AvailabilityZoneFilter, ComputeFilter, RamFilter, DiskFilter,
                CoreFilter)
}

# Filters that check capacity; the claim re-runs them on freshly locked usage.
RESOURCE_FILTERS: tuple[BaseHostFilter, ...] = (RamFilter(), DiskFilter(), CoreFilter())


def load_filters(names: Sequence[str]) -> list[BaseHostFilter]:
    unknown = [name for name in names if name not in ALL_FILTERS]
    if unknown:
        raise UnknownPluginError(f"unknown scheduler filter(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(ALL_FILTERS))}")
    return [ALL_FILTERS[name]() for name in names]
