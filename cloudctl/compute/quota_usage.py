"""Compute's part of the quotas: how its resources are counted, the checks its creations make, and
the drift check of ``manage.py quota_audit`` (placement claims against live servers).

A server counts from its create until it is DELETED (ERROR included, as Nova). Its cores and RAM are
the numbers it holds; while a resize is pending (in progress, or waiting for confirm/revert) it
counts the larger of its old and new flavor, so a concurrent create cannot take what the resize
already was granted.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Count, OuterRef, Subquery

from cloudctl.compute.models import (
    MIGRATION_IN_PROGRESS,
    Allocation,
    Flavor,
    Instance,
    Migration,
    MigrationType,
    ServerGroup,
)
from cloudctl.compute.states import VmState
from cloudctl.identity.models import Project
from cloudctl.quotas import registry
from cloudctl.quotas.services import quota_enforce

COMPUTE_RESOURCES = ("instances", "cores", "ram", "server_groups", "server_group_members")

# States in which a server on a host must hold a claim there (a build that failed for good leaves
# the server in ERROR on the host, its claim freed: not drift).
_HOLDS_A_CLAIM = (VmState.BUILDING, VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED, VmState.SUSPENDED,
                  VmState.RESIZED)


def _live_servers(project_id: int) -> Any:
    return Instance.objects.filter(project_id=project_id).exclude(vm_state=VmState.DELETED)


def count_compute(project_id: int) -> dict[str, int]:
    pending = (Migration.objects.filter(instance=OuterRef("pk"), migration_type=MigrationType.RESIZE,
                                        status__in=MIGRATION_IN_PROGRESS).order_by("-created"))
    rows = (_live_servers(project_id)
            .annotate(new_vcpus=Subquery(pending.values("new_flavor__vcpus")[:1]),
                      new_ram=Subquery(pending.values("new_flavor__memory_mb")[:1]))
            .values_list("vcpus", "memory_mb", "new_vcpus", "new_ram"))
    instances = cores = ram = 0
    for vcpus, memory_mb, new_vcpus, new_ram in rows:
        instances += 1
        cores += max(vcpus, new_vcpus or 0)
        ram += max(memory_mb, new_ram or 0)
    largest_group = (_live_servers(project_id).filter(server_group__isnull=False)
                     .values("server_group").annotate(n=Count("uuid")).order_by("-n")
                     .values_list("n", flat=True).first())
    return {"instances": instances, "cores": cores, "ram": ram,
            "server_groups": ServerGroup.objects.filter(project_id=project_id).count(),
            "server_group_members": largest_group or 0}


def _group_members(group: ServerGroup) -> int:
    return Instance.objects.filter(server_group=group).exclude(vm_state=VmState.DELETED).count()


def enforce_server_create(*, project: Project, flavor: Flavor, server_group: ServerGroup | None,
                          count: int = 1) -> None:
    """In the create's transaction: ``count`` servers of ``flavor`` fit the project's instances,
    cores and RAM, and the group's members."""
    requested = {"instances": count, "cores": flavor.vcpus * count, "ram": flavor.memory_mb * count}
    counted_by = {}
    if server_group is not None:
        requested["server_group_members"] = count
        counted_by["server_group_members"] = lambda: _group_members(server_group)
    quota_enforce(project=project, requested=requested, counted_by=counted_by)


def enforce_resize(*, instance: Instance, flavor: Flavor) -> None:
    """In the resize's transaction: the new flavor's cores and RAM above the old ones fit."""
    quota_enforce(project=instance.project_id, requested={
        "cores": flavor.vcpus - instance.vcpus, "ram": flavor.memory_mb - instance.memory_mb})


def enforce_server_group_create(*, project: Project) -> None:
    quota_enforce(project=project, requested={"server_groups": 1})


def enforce_snapshot(*, project: Project) -> None:
    """In the snapshot's transaction, before the server's row is touched: one more image fits."""
    quota_enforce(project=project, requested={"images": 1})


def placement_drift() -> list[str]:
    """Claims (Allocations) without a live server, source claims of migrations that ended, and
    servers running on a host without a claim there."""
    problems: list[str] = []
    for allocation in (Allocation.objects.filter(instance__vm_state=VmState.DELETED)
                       .select_related("host", "instance")):
        problems.append(f"claim {allocation.pk} on host {allocation.host.name} "
                        f"({allocation.vcpus} vCPU, {allocation.memory_mb} MiB) belongs to server "
                        f"{allocation.instance_id}, which is deleted")
    for allocation in (Allocation.objects.filter(migration__isnull=False)
                       .exclude(migration__status__in=MIGRATION_IN_PROGRESS)
                       .exclude(instance__vm_state=VmState.DELETED)
                       .select_related("host", "migration")):
        problems.append(f"claim {allocation.pk} on host {allocation.host.name} is held for migration "
                        f"{allocation.migration_id} of server {allocation.instance_id}, which ended "
                        f"{allocation.migration.status}")
    claimed = set(Allocation.objects.values_list("instance_id", "host_id"))
    for uuid, host_id, host_name, vm_state in (
            Instance.objects.filter(vm_state__in=_HOLDS_A_CLAIM, host__isnull=False)
            .values_list("uuid", "host_id", "host__name", "vm_state")):
        if (uuid, host_id) not in claimed:
            problems.append(f"server {uuid} ({vm_state}) runs on host {host_name} without a claim "
                            "there")
    return problems


def register() -> None:
    registry.register_counter(COMPUTE_RESOURCES, count_compute)
    registry.register_drift_check("placement", placement_drift)
