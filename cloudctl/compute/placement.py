"""Placement: the database side of choosing a host, one path for new servers and migrations alike.

``scheduler/`` judges plain snapshots (filters, weighers, selection) and imports no Django. This
module feeds it: it reads the hosts as HostStates and an instance as a RequestSpec, runs the
enabled filters and weighers from the settings (:func:`candidate_hosts`), and claims the chosen
host's resources atomically (:func:`claim` for a new server, :func:`claim_move` for a migration).

A claim re-reads the chosen host's usage under a row lock (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite serialises writers with ``BEGIN IMMEDIATE``) and re-checks capacity before it
inserts the Allocation, so two concurrent decisions never overcommit a host: the loser moves on to
its next candidate.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Sum
from django.utils import timezone

from cloudctl.compute.models import Aggregate, Allocation, Host, Instance, ServerGroup
from cloudctl.compute.ports import server_ports_bind
from cloudctl.compute.states import TaskState, VmState
from scheduler.filters import CLAIM_FILTERS, BaseHostFilter, load_filters
from scheduler.host_state import HostState, RequestSpec
from scheduler.selection import select_hosts
from scheduler.weighers import BaseWeigher, load_weighers


def enabled_filters() -> list[BaseHostFilter]:
    return load_filters(settings.SCHEDULER_ENABLED_FILTERS)


def enabled_weighers() -> list[tuple[BaseWeigher, float]]:
    return load_weighers(settings.SCHEDULER_WEIGHERS, {
        "RAMWeigher": settings.SCHEDULER_RAM_WEIGHT_MULTIPLIER,
        "CPUWeigher": settings.SCHEDULER_CPU_WEIGHT_MULTIPLIER,
        "DiskWeigher": settings.SCHEDULER_DISK_WEIGHT_MULTIPLIER,
        "ServerGroupSoftAffinityWeigher": settings.SCHEDULER_SOFT_AFFINITY_WEIGHT_MULTIPLIER,
        "ServerGroupSoftAntiAffinityWeigher":
            settings.SCHEDULER_SOFT_ANTI_AFFINITY_WEIGHT_MULTIPLIER,
    })


# The Host columns a HostState needs; reading only these as plain rows (not model instances, and
# not the large reported_instances column) is what keeps a decision fast with 1,000 hosts.
_HOST_COLUMNS = ("id", "name", "availability_zone", "enabled", "disabled_reason", "last_heartbeat",
                 "forced_down", "vcpus", "memory_mb", "memory_mb_reserved", "disk_gb", "disk_gb_reserved",
                 "hypervisor_type", "hypervisor_version", "virt_type", "cpu_info",
                 "cpu_allocation_ratio", "ram_allocation_ratio", "disk_allocation_ratio")


def host_state_of(row: dict[str, Any], usage: dict[str, Any],
                  aggregate_metadata: dict[str, Any] | None = None, *,
                  up_since: datetime | None = None) -> HostState:
    """A HostState from a Host row (``_HOST_COLUMNS``) and its usage sums."""
    if up_since is None:
        up_since = timezone.now() - timedelta(seconds=settings.SERVICE_DOWN_TIME)
    heartbeat = row["last_heartbeat"]
    return HostState(
        name=row["name"],
        availability_zone=row["availability_zone"] or settings.DEFAULT_AVAILABILITY_ZONE,
        enabled=row["enabled"], is_up=(heartbeat is not None and heartbeat > up_since
                                               and not row["forced_down"]),
        vcpus=row["vcpus"], memory_mb=row["memory_mb"], disk_gb=row["disk_gb"],
        memory_mb_reserved=row["memory_mb_reserved"], disk_gb_reserved=row["disk_gb_reserved"],
        vcpus_used=usage.get("vcpus_used") or 0, memory_mb_used=usage.get("memory_mb_used") or 0,
        disk_gb_used=usage.get("disk_gb_used") or 0, num_instances=usage.get("n") or 0,
        hypervisor_type=row["hypervisor_type"], hypervisor_version=row["hypervisor_version"],
        virt_type=row["virt_type"], cpu_info=row["cpu_info"] or {},
        disabled_reason=row["disabled_reason"], aggregate_metadata=aggregate_metadata or {},
        cpu_allocation_ratio=row["cpu_allocation_ratio"] or settings.CPU_ALLOCATION_RATIO,
        ram_allocation_ratio=row["ram_allocation_ratio"] or settings.RAM_ALLOCATION_RATIO,
        disk_allocation_ratio=row["disk_allocation_ratio"] or settings.DISK_ALLOCATION_RATIO,
    )


def _aggregate_metadata() -> dict[int, dict[str, Any]]:
    """Each host's aggregates' metadata merged (capabilities the flavor may ask for)."""
    merged: dict[int, dict[str, Any]] = {}
    for aggregate in Aggregate.objects.prefetch_related("hosts"):
        for host in aggregate.hosts.all():
            merged.setdefault(host.pk, {}).update(aggregate.metadata)
    return merged


def load_host_states() -> list[HostState]:
    usage = {
        row["host_id"]: row for row in Allocation.objects.values("host_id").annotate(
            vcpus_used=Sum("vcpus"), memory_mb_used=Sum("memory_mb"),
            disk_gb_used=Sum("disk_gb"), n=Count("id"))
    }
    metadata = _aggregate_metadata()
    up_since = timezone.now() - timedelta(seconds=settings.SERVICE_DOWN_TIME)
    return [host_state_of(row, usage.get(row["id"], {}), metadata.get(row["id"]),
                          up_since=up_since)
            for row in Host.objects.values(*_HOST_COLUMNS)]


def _hosts_of(server_ids: list[str]) -> frozenset[str]:
    return frozenset(Instance.objects.filter(uuid__in=server_ids, host__isnull=False)
                     .exclude(vm_state=VmState.DELETED).values_list("host__name", flat=True))


def group_hosts(group_id: Any, exclude: str) -> dict[str, int]:
    """How many live members of the group each host runs (the instance being placed excluded)."""
    rows = (Instance.objects.filter(server_group_id=group_id, host__isnull=False)
            .exclude(vm_state=VmState.DELETED).exclude(uuid=exclude)
            .values("host__name").annotate(n=Count("uuid")))
    return {row["host__name"]: row["n"] for row in rows}


def request_spec_of(instance: Instance) -> RequestSpec:
    hints = instance.scheduler_hints or {}
    group = instance.server_group
    return RequestSpec(
        instance_uuid=str(instance.uuid), vcpus=instance.vcpus, memory_mb=instance.memory_mb,
        root_gb=instance.root_gb, availability_zone=instance.availability_zone,
        project_id=instance.project_id, ignore_hosts=tuple(instance.retry_hosts),
        image_properties=dict(instance.image.properties) if instance.image else {},
        flavor_extra_specs=dict(instance.flavor.extra_specs),
        same_host=_hosts_of(hints["same_host"]) if hints.get("same_host") else None,
        different_host=_hosts_of(hints.get("different_host") or []),
        group_policy=group.policy if group else None,
        group_hosts=group_hosts(group.pk, str(instance.uuid)) if group else {},
        force_host=instance.requested_host,
    )


def candidate_hosts(spec: RequestSpec, *, subset_size: int) -> list[HostState]:
    """Every host through the enabled filters then weighers: the candidates, best first.
    Raises :class:`scheduler.selection.NoValidHost` with the per-filter breakdown."""
    return select_hosts(load_host_states(), spec, enabled_filters(), enabled_weighers(),
                        subset_size=subset_size)


class InstanceGone(Exception):
    """The instance left ``scheduling`` (deleted meanwhile): stop, claim nothing."""


def _locked_host_if_it_fits(instance_uuid: str, host_name: str, spec: RequestSpec) -> Host | None:
    """Within the caller's transaction: lock the instance's server group and the host, re-read the
    host's usage and re-check the claim filters. The host (row locked) if ``spec`` still fits."""
    group_id = (Instance.objects.filter(uuid=instance_uuid)
                .values_list("server_group_id", flat=True).first())
    if group_id is not None:
        # Members of one group are placed one at a time: lock the group, then re-read where
        # its members are, so two concurrent anti-affinity members cannot share a host.
        list(ServerGroup.objects.select_for_update().filter(pk=group_id))
        spec = replace(spec, group_hosts=group_hosts(group_id, instance_uuid))
    host = Host.objects.select_for_update().get(name=host_name)
    usage = Allocation.objects.filter(host=host).aggregate(
        vcpus_used=Sum("vcpus"), memory_mb_used=Sum("memory_mb"),
        disk_gb_used=Sum("disk_gb"), n=Count("id"))
    fresh = host_state_of({column: getattr(host, column) for column in _HOST_COLUMNS}, usage)
    if not all(f.host_passes(fresh, spec) for f in CLAIM_FILTERS):
        return None
    return host


def claim_move(instance_uuid: str, host_name: str, spec: RequestSpec, migration_id: int) -> bool:
    """Claim ``spec`` on ``host_name`` for a migration of the instance, within the caller's
    transaction: the instance's current allocation is handed to the migration (held until the move
    is confirmed or reverted) and a new one is made on the destination. False if it does not fit."""
    host = _locked_host_if_it_fits(instance_uuid, host_name, spec)
    if host is None:
        return False
    Allocation.objects.filter(instance_id=instance_uuid, migration__isnull=True).update(
        migration_id=migration_id)
    Allocation.objects.create(instance_id=instance_uuid, host=host, vcpus=spec.vcpus,
                              memory_mb=spec.memory_mb, disk_gb=spec.root_gb)
    return True


def claim(instance_uuid: str, host_name: str, spec: RequestSpec) -> bool:
    """Claim ``spec``'s resources on ``host_name`` for the instance being scheduled, and move it
    from ``scheduling`` to ``spawning``, in one transaction. False if the resources are gone;
    :class:`InstanceGone` if the instance left ``scheduling``."""
    with transaction.atomic():
        host = _locked_host_if_it_fits(instance_uuid, host_name, spec)
        if host is None:
            return False
        moved = Instance.objects.filter(uuid=instance_uuid, task_state=TaskState.SCHEDULING).change(
            host=host, task_state=TaskState.SPAWNING, attempts=F("attempts") + 1,
            availability_zone=host.zone)
        if moved != 1:
            raise InstanceGone(instance_uuid)
        Allocation.objects.create(instance_id=instance_uuid, host=host, vcpus=spec.vcpus,
                                  memory_mb=spec.memory_mb, disk_gb=spec.root_gb)
        # The server's ports are bound to the host it is claimed on (BUILD until it runs there).
        server_ports_bind(instance_uuid, host.name, host.zone)
    return True
