"""Quota limits (defaults from the settings, per-project overrides) and their enforcement.

Enforcement counts (as Nova's counting quotas): the usage is read from the resources themselves in
the transaction that creates the new one, after the project's row is locked (``SELECT ... FOR NO
KEY UPDATE`` on PostgreSQL; SQLite's IMMEDIATE transactions serialise writers anyway). Two creations
in one project therefore take turns between the count and the commit, and concurrency cannot take a
project over a limit; nothing stores a usage figure, so deleting a resource frees its quota and
nothing can drift. The lock is "no key": rows that merely reference the project (a server's insert)
do not wait for it.

Lock order: the project's row first, then the rows a creation locks itself (a network, a security
group), so that two creations never wait for each other in a circle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.db import connection, transaction

from cloudctl.errors import InvalidRequest, QuotaExceeded
from cloudctl.identity.models import Project
from cloudctl.quotas import registry
from cloudctl.quotas.models import ProjectQuota
from cloudctl.quotas.resources import BY_NAME, NAMES, RESOURCES, UNLIMITED

# The largest limit the database keeps (a signed 64-bit column).
MAX_LIMIT = 2**63 - 1


def _project_id(project: Project | int) -> int:
    return project if isinstance(project, int) else int(project.pk)


def quota_limits(project: Project | int) -> dict[str, int]:
    """Every resource's limit for the project: its override, else the settings' default."""
    overrides = dict(ProjectQuota.objects.filter(project_id=_project_id(project))
                     .values_list("resource", "limit"))
    return {r.name: int(overrides.get(r.name, r.default)) for r in RESOURCES}


def quota_usage(project: Project | int) -> dict[str, dict[str, int]]:
    """``{resource: {"limit", "in_use"}}`` for every resource of the project."""
    pid = _project_id(project)
    limits = quota_limits(pid)
    counted = registry.count(pid, NAMES)
    return {name: {"limit": limits[name], "in_use": counted[name]} for name in NAMES}


def _lock_project(project_id: int) -> None:
    if not connection.in_atomic_block:
        raise RuntimeError("quota_enforce runs inside the creating transaction")
    list(Project.objects.select_for_update(no_key=True).filter(pk=project_id).values_list("pk", flat=True))


def quota_enforce(*, project: Project | int, requested: Mapping[str, int],
                  counted_by: Mapping[str, Callable[[], int]] | None = None) -> None:
    """Refuse (:class:`~cloudctl.errors.QuotaExceeded`, 403) a creation that would take the project
    over a limit. Must run in the transaction that creates the resources, before they are inserted.

    ``requested``: how much of each resource the creation adds (0 or less: nothing to check).
    ``counted_by``: how to count a resource whose limit is per owner (the members of one server
    group, the key pairs of one user), called after the lock."""
    pid = _project_id(project)
    wanted = {name: int(amount) for name, amount in requested.items() if amount > 0}
    for name in wanted:
        if name not in BY_NAME:
            raise ValueError(f"no quota resource {name!r}")
    if not wanted:
        return
    _lock_project(pid)
    limits = quota_limits(pid)
    limited = [name for name in NAMES if name in wanted and limits[name] != UNLIMITED]
    if not limited:
        return
    custom = counted_by or {}
    counted = registry.count(pid, [name for name in limited if name not in custom])
    for name in limited:
        in_use = custom[name]() if name in custom else counted[name]
        if in_use + wanted[name] > limits[name]:
            raise QuotaExceeded(resource=name, requested=wanted[name], in_use=in_use,
                                limit=limits[name], owner=BY_NAME[name].per.replace("_", " "))


def quota_update(*, project: Project, limits: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Set some of the project's limits (administrators). 400 naming the field for an unknown
    resource or a limit that is not an integer >= -1. A limit at the default keeps an override row
    (it stays put when the default changes); lowering a limit under the usage is allowed, as in
    Nova: nothing is deleted, new creations are refused, and ``quota_audit`` lists the project."""
    if not isinstance(limits, Mapping) or not limits:
        raise InvalidRequest("non_field_errors", "give at least one resource and its limit, e.g. "
                                                 '{"instances": 20}')
    for name, value in limits.items():
        if name not in BY_NAME:
            raise InvalidRequest(name, f"no quota resource {name!r}; known: {', '.join(NAMES)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(name, "a limit is an integer (-1: unlimited)")
        if value < UNLIMITED:
            raise InvalidRequest(name, f"a limit is -1 (unlimited) or more, not {value}")
        if value > MAX_LIMIT:
            raise InvalidRequest(name, f"a limit is at most {MAX_LIMIT} (-1: unlimited)")
    with transaction.atomic():
        _lock_project(int(project.pk))
        for name, value in limits.items():
            ProjectQuota.objects.update_or_create(project=project, resource=name,
                                                  defaults={"limit": value})
    return quota_usage(project)


def nova_limits(usage: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Nova's ``limits.absolute`` from :func:`quota_usage`'s answer."""
    absolute: dict[str, int] = {}
    for resource in RESOURCES:
        if resource.nova_max:
            absolute[resource.nova_max] = usage[resource.name]["limit"]
        if resource.nova_used:
            absolute[resource.nova_used] = usage[resource.name]["in_use"]
    return absolute


def quota_audit() -> tuple[list[str], list[str]]:
    """(projects over a limit, drift found by the apps' checks): one line each."""
    over: list[str] = []
    for project in Project.objects.order_by("name"):
        for name, entry in quota_usage(project).items():
            if entry["limit"] != UNLIMITED and entry["in_use"] > entry["limit"]:
                over.append(f"project {project.name}: {name} {entry['in_use']} in use over its limit "
                            f"{entry['limit']}")
    drift: list[str] = []
    for check_name, check in sorted(registry.drift_checks().items()):
        drift.extend(f"{check_name}: {line}" for line in check())
    return over, drift
