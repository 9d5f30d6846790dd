"""Plain snapshots that filters and weighers judge: no database, no Django.

A HostState is a host's capacity and usage at one moment; a RequestSpec is what one instance
needs. Free amounts apply the allocation ratios the way Nova does: ``total * ratio - reserved -
used``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class HostState:
    name: str
    availability_zone: str
    enabled: bool
    is_up: bool
    vcpus: int
    memory_mb: int
    disk_gb: int
    memory_mb_reserved: int = 0
    disk_gb_reserved: int = 0
    vcpus_used: int = 0
    memory_mb_used: int = 0
    disk_gb_used: int = 0
    num_instances: int = 0
    cpu_allocation_ratio: float = 16.0
    ram_allocation_ratio: float = 1.5
    disk_allocation_ratio: float = 1.0
    hypervisor_type: str = ""
    hypervisor_version: int = 0
    virt_type: str = ""
    cpu_info: dict[str, Any] = field(default_factory=dict)
    disabled_reason: str = ""
    aggregate_metadata: dict[str, Any] = field(default_factory=dict)

    def capabilities(self) -> dict[str, Any]:
        """What ComputeCapabilitiesFilter matches flavor extra specs against."""
        return {"hypervisor_type": self.hypervisor_type,
                "hypervisor_version": self.hypervisor_version, "virt_type": self.virt_type,
                "vcpus": self.vcpus, "memory_mb": self.memory_mb, "disk_gb": self.disk_gb,
                "cpu_info": self.cpu_info, **self.aggregate_metadata}

    @property
    def free_ram_mb(self) -> float:
        return self.memory_mb * self.ram_allocation_ratio - self.memory_mb_reserved \
            - self.memory_mb_used

    @property
    def free_vcpus(self) -> float:
        return self.vcpus * self.cpu_allocation_ratio - self.vcpus_used

    @property
    def free_disk_gb(self) -> float:
        return self.disk_gb * self.disk_allocation_ratio - self.disk_gb_reserved \
            - self.disk_gb_used

    def consume(self, spec: RequestSpec) -> None:
        """Account for an instance placed here (later choices in the same pass see it)."""
        self.vcpus_used += spec.vcpus
        self.memory_mb_used += spec.memory_mb
        self.disk_gb_used += spec.root_gb
        self.num_instances += 1


@dataclass(frozen=True)
class RequestSpec:
    instance_uuid: str
    vcpus: int
    memory_mb: int
    root_gb: int
    availability_zone: str = ""
    project_id: int | None = None
    ignore_hosts: tuple[str, ...] = ()
    image_properties: dict[str, Any] = field(default_factory=dict)
    flavor_extra_specs: dict[str, Any] = field(default_factory=dict)
    # Host names resolved from the same_host / different_host hints (server ids).
    same_host: frozenset[str] | None = None
    different_host: frozenset[str] = frozenset()
    # The server group's policy and how many of its members each host already runs.
    group_policy: str | None = None
    group_hosts: dict[str, int] = field(default_factory=dict)
    # An administrator's pinned host; the filters still check it.
    force_host: str = ""
