"""Host filters with Nova's names. Each is a small class: ``host_passes(host_state, spec)``.

``explain(spec, rejected)`` turns the hosts a filter removed into one sentence for the fault, naming
them (for administrators); ``explain_for_tenant`` says the same without a host name (tenants are not
told the names of the hypervisors), with the figures: "no host has 16384 MiB free; the most free is
9216 MiB".
Enabled filters and their order come from settings; :func:`load_filters` fails on an unknown name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scheduler.host_state import HostState, RequestSpec


class UnknownPluginError(ValueError):
    """A filter or weigher name in the settings does not exist."""


class BaseHostFilter:
    name = "BaseHostFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        raise NotImplementedError

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return f"{len(rejected)} host(s) rejected by {self.name}"

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        """:meth:`explain` without host names (a filter whose ``explain`` names hosts says it
        again without them)."""
        return f"{len(rejected)} host(s) rejected by {self.name}"


class RetryFilter(BaseHostFilter):
    """Skip hosts this instance's build already failed on."""

    name = "RetryFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        return host_state.name not in spec.ignore_hosts

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return f"already tried and failed on {', '.join(h.name for h in rejected)}"

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return f"the build already failed on the {len(rejected)} host(s) left"


class AvailabilityZoneFilter(BaseHostFilter):
    name = "AvailabilityZoneFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        return not spec.availability_zone or host_state.availability_zone == spec.availability_zone

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return f"{len(rejected)} host(s) are not in availability zone {spec.availability_zone}"

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return f"no host is in availability zone {spec.availability_zone}"


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

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return "no host is up and enabled"


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

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        best = max(self.free(h) for h in rejected)
        return (f"no host has {self.wanted(spec)} {self.unit} free; the most free is "
                f"{max(best, 0):g} {self.unit}")


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


def _lookup(capabilities: dict[str, Any], path: list[str]) -> Any:
    value: Any = capabilities
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def extra_spec_matches(actual: Any, requirement: str) -> bool:
    """Nova's extra-spec operators: ``s== x``, ``== n``, ``>= n``, ``<= n``, ``<in> x`` (substring
    or list member), ``<or> a <or> b``; anything else is a case-insensitive equality."""
    requirement = str(requirement).strip()
    if actual is None:
        return False
    if requirement.startswith("<or>"):
        options = [o.strip() for o in requirement.split("<or>") if o.strip()]
        return any(str(actual).lower() == o.lower() for o in options)
    if requirement.startswith("<in>"):
        wanted = requirement[4:].strip()
        if isinstance(actual, list | tuple | set):
            return wanted in {str(a) for a in actual}
        return wanted in str(actual)
    if requirement.startswith("s=="):
        return str(actual) == requirement[3:].strip()
    for op in (">=", "<=", "=="):
        if requirement.startswith(op):
            have, want = _number(actual), _number(requirement[len(op):])
            if have is None or want is None:
                return False
            return {">=": have >= want, "<=": have <= want, "==": have == want}[op]
    return str(actual).lower() == requirement.lower()


class ComputeCapabilitiesFilter(BaseHostFilter):
    """Flavor extra specs against host capabilities: ``capabilities:cpu_info:arch``,
    ``capabilities:hypervisor_type`` or unscoped keys such as ``hypervisor_type``; keys of other
    scopes (``hw:``, ``quota:``, ...) are for other components and ignored here."""

    name = "ComputeCapabilitiesFilter"

    @staticmethod
    def requirements(spec: RequestSpec) -> list[tuple[list[str], str]]:
        wanted = []
        for key, value in spec.flavor_extra_specs.items():
            scope, _, rest = key.partition(":")
            if rest and scope == "capabilities":
                wanted.append((rest.split(":"), str(value)))
            elif not rest:
                wanted.append(([key], str(value)))
        return wanted

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        capabilities = host_state.capabilities()
        return all(extra_spec_matches(_lookup(capabilities, path), value)
                   for path, value in self.requirements(spec))

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        wanted = ", ".join(f"{':'.join(p)} {v}" for p, v in self.requirements(spec))
        return f"{len(rejected)} host(s) lack the flavor's required capabilities ({wanted})"

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        wanted = ", ".join(f"{':'.join(p)} {v}" for p, v in self.requirements(spec))
        return f"no host has the flavor's required capabilities ({wanted})"


class ImagePropertiesFilter(BaseHostFilter):
    """The image's ``architecture`` and ``hypervisor_type`` properties must match the host."""

    name = "ImagePropertiesFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        arch = spec.image_properties.get("architecture")
        if arch and str(arch).lower() != str(host_state.cpu_info.get("arch", "")).lower():
            return False
        hypervisor = spec.image_properties.get("hypervisor_type")
        if hypervisor:
            offered = {host_state.hypervisor_type.lower(), host_state.virt_type.lower()}
            if str(hypervisor).lower() not in offered:
                return False
        return True

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        wanted = {k: spec.image_properties[k] for k in ("architecture", "hypervisor_type")
                  if spec.image_properties.get(k)}
        return f"{len(rejected)} host(s) do not match the image's {wanted}"

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        wanted = {k: spec.image_properties[k] for k in ("architecture", "hypervisor_type")
                  if spec.image_properties.get(k)}
        return f"no host matches the image's {wanted}"


class ServerGroupAffinityFilter(BaseHostFilter):
    """Hard affinity: once a member of the group is placed, the others go to its host."""

    name = "ServerGroupAffinityFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        if spec.group_policy != "affinity" or not spec.group_hosts:
            return True
        return host_state.name in spec.group_hosts

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return (f"the server group's affinity policy requires host "
                f"{', '.join(sorted(spec.group_hosts))}, which cannot take it")

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return ("the server group's affinity policy requires the host of its other members, "
                "which cannot take it")


class ServerGroupAntiAffinityFilter(BaseHostFilter):
    """Hard anti-affinity: no two members of the group on one host."""

    name = "ServerGroupAntiAffinityFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        if spec.group_policy != "anti-affinity":
            return True
        return host_state.name not in spec.group_hosts

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return (f"{len(rejected)} host(s) already run a member of the server group "
                "(anti-affinity)")

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return "every host left already runs a member of the server group (anti-affinity)"


class SameHostFilter(BaseHostFilter):
    name = "SameHostFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        return spec.same_host is None or host_state.name in spec.same_host

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return (f"the same_host hint allows only {', '.join(sorted(spec.same_host or ())) or 'none'}"
                f"; {len(rejected)} host(s) excluded")

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return "the hosts of the same_host hint's servers cannot take it"


class DifferentHostFilter(BaseHostFilter):
    name = "DifferentHostFilter"

    def host_passes(self, host_state: HostState, spec: RequestSpec) -> bool:
        return host_state.name not in spec.different_host

    def explain(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return f"the different_host hint excludes {', '.join(h.name for h in rejected)}"

    def explain_for_tenant(self, spec: RequestSpec, rejected: Sequence[HostState]) -> str:
        return "the different_host hint excludes every host left"


ALL_FILTERS: dict[str, type[BaseHostFilter]] = {
    cls.name: cls
    for cls in (RetryFilter, AvailabilityZoneFilter, ComputeFilter, RamFilter, DiskFilter,
                CoreFilter, ComputeCapabilitiesFilter, ImagePropertiesFilter,
                ServerGroupAffinityFilter, ServerGroupAntiAffinityFilter, SameHostFilter,
                DifferentHostFilter)
}

# Filters the claim re-runs on freshly locked data: capacity, and the group rules that two
# concurrent members of one group could otherwise both satisfy on stale data.
CLAIM_FILTERS: tuple[BaseHostFilter, ...] = (RamFilter(), DiskFilter(), CoreFilter(),
                                             ServerGroupAffinityFilter(),
                                             ServerGroupAntiAffinityFilter())



def load_filters(names: Sequence[str]) -> list[BaseHostFilter]:
    unknown = [name for name in names if name not in ALL_FILTERS]
    if unknown:
        raise UnknownPluginError(f"unknown scheduler filter(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(ALL_FILTERS))}")
    return [ALL_FILTERS[name]() for name in names]
