"""Reads: what each user may see, and the views of servers, hosts, zones and migrations that the API,
the admin and the dashboard show. Nothing here writes (writes are services); every interface reads
through these, so a rule such as "members see their project's servers only" is written once."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db.models import Count, Q, QuerySet, Sum

from cloudctl.compute.models import (
    MIGRATION_IN_PROGRESS,
    Aggregate,
    Flavor,
    Host,
    Instance,
    InstanceAction,
    InstanceActionEvent,
    Migration,
    ServerGroup,
)
from cloudctl.compute.states import VmState, states_for_status
from cloudctl.identity.services import is_admin, project_id_of
from compute_workers.contract import ActionResult

# --- servers ----------------------------------------------------------------------------------------


def servers_visible_to(user: Any) -> QuerySet[Instance]:
    """Live (not deleted) servers: all for admins, the user's project's for members."""
    servers = Instance.objects.exclude(vm_state=VmState.DELETED).select_related(
        "flavor", "image", "host", "project")
    if is_admin(user):
        return servers
    return servers.filter(project_id=project_id_of(user))


def servers_with_status(servers: QuerySet[Instance], status: str) -> QuerySet[Instance]:
    """The servers of ``servers`` whose API status is ``status`` (BUILD, ACTIVE, SHUTOFF, ...)."""
    match = Q(pk__in=[])
    for vm_state, task_states in states_for_status(status).items():
        idle = Q(task_state__isnull=True) if None in task_states else Q(pk__in=[])
        busy = [task for task in task_states if task is not None]
        match |= Q(vm_state=vm_state) & (idle | Q(task_state__in=busy))
    return servers.filter(match)


def servers_live() -> QuerySet[Instance]:
    """Every server not deleted, with its host (the dashboard's census)."""
    return Instance.objects.exclude(vm_state=VmState.DELETED).select_related("host")


def servers_on_host(*, host: Host) -> QuerySet[Instance]:
    return host.instances.exclude(vm_state=VmState.DELETED)


def host_status(instance: Instance) -> str:
    """Nova's host_status: UP, DOWN, MAINTENANCE (host disabled), or "" for a server on no host."""
    if instance.host is None:
        return ""
    if not instance.host.is_up:
        return "DOWN"
    return "UP" if instance.host.enabled else "MAINTENANCE"


def server_actions(*, instance: Instance) -> QuerySet[InstanceAction]:
    """The server's actions, newest first, each with its user, project and events."""
    return (InstanceAction.objects.filter(instance=instance)
            .select_related("user", "project").prefetch_related("events"))


def scheduling_failures_recent(*, limit: int = 10) -> QuerySet[InstanceActionEvent]:
    """The last scheduling decisions that found no host, newest first."""
    return (InstanceActionEvent.objects.filter(event="schedule", result=ActionResult.ERROR)
            .select_related("action__instance").order_by("-start_time")[:limit])


# --- flavors and server groups ---------------------------------------------------------------------


def flavors_visible_to(user: Any) -> QuerySet[Flavor]:
    flavors = Flavor.objects.filter(disabled=False)
    return flavors if is_admin(user) else flavors.filter(is_public=True)


def server_groups_visible_to(user: Any) -> QuerySet[ServerGroup]:
    groups = ServerGroup.objects.select_related("project")
    return groups if is_admin(user) else groups.filter(project_id=project_id_of(user))


def server_group_members(*, group: ServerGroup) -> QuerySet[Instance]:
    return group.members.exclude(vm_state=VmState.DELETED).select_related("host")


# --- hosts and zones -------------------------------------------------------------------------------


def hosts_with_usage() -> QuerySet[Host]:
    return Host.objects.annotate(
        vcpus_used=Sum("allocations__vcpus", default=0),
        memory_mb_used=Sum("allocations__memory_mb", default=0),
        disk_gb_used=Sum("allocations__disk_gb", default=0),
        instance_count=Count("allocations", distinct=True),
    )


def availability_zones() -> dict[str, list[Host]]:
    """Every zone with its hosts; the default zone is listed even before any host is in it."""
    zones: dict[str, list[Host]] = {settings.DEFAULT_AVAILABILITY_ZONE: []}
    for zone in Aggregate.objects.exclude(availability_zone="").values_list(
            "availability_zone", flat=True):
        zones.setdefault(zone, [])
    for host in Host.objects.all():
        zones.setdefault(host.zone, []).append(host)
    return zones


# --- migrations ------------------------------------------------------------------------------------


def migrations_visible_to(user: Any) -> QuerySet[Migration]:
    migrations = Migration.objects.select_related("instance", "source_host", "dest_host", "old_flavor",
                                                  "new_flavor")
    if is_admin(user):
        return migrations
    return migrations.filter(instance__project_id=project_id_of(user))


def migrations_list(*, user: Any, status: str | None = None, migration_type: str | None = None,
                    host: str | None = None, server: uuid.UUID | None = None,
                    in_progress: bool = False) -> QuerySet[Migration]:
    """The migrations ``user`` may see, narrowed by whichever filters are given (``host``: the source
    or the destination)."""
    found = migrations_visible_to(user)
    if status is not None:
        found = found.filter(status=status)
    if migration_type is not None:
        found = found.filter(migration_type=migration_type)
    if host is not None:
        found = found.filter(Q(source_host__name=host) | Q(dest_host__name=host))
    if server is not None:
        found = found.filter(instance_id=server)
    if in_progress:
        found = found.filter(status__in=[str(s) for s in MIGRATION_IN_PROGRESS])
    return found


def migrations_in_progress() -> QuerySet[Migration]:
    """Migrations not finished yet, oldest first (the dashboard's)."""
    return (Migration.objects.filter(status__in=[str(s) for s in MIGRATION_IN_PROGRESS])
            .select_related("instance", "source_host", "dest_host").order_by("created"))
