"""Moving servers between hosts: live migration and cold migration (admin), resize (owner).

The control plane orchestrates, the hosts do the work (see the migration part of
``compute_workers/contract.py``). A request is checked up front, before anything changes: the
scheduler's filters, the destination's and the source's pre-flight checks (CPU, image, storage,
disk space), and the claim on the destination. Only then does the server enter its task state, and
each step's report (``conductor.migration_update``) sends the next step. The record points at the
destination only once the destination says the domain runs there.

While a migration runs, the server holds resources on both hosts: its source allocation belongs to
the migration until the move is confirmed (or the allocation is given back to the server when the
move fails or is reverted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from cloudctl.compute import placement, rpc, states
from cloudctl.compute.conductor import record_event
from cloudctl.compute.models import (
    Allocation,
    Flavor,
    Host,
    Instance,
    InstanceAction,
    InstanceActionEvent,
    Migration,
    MigrationStatus,
    MigrationType,
)
from cloudctl.compute.services import (
    GIB,
    HostUnavailable,
    InstanceInvalidState,
    InvalidRequest,
    _require_host_up,
    action_start,
    finish_action,
    host_set_enabled,
    new_request_id,
    transition,
)
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import PowerState, TaskState, VmState
from cloudctl.identity.services import is_admin, project_id_of
from compute_workers import contract
from scheduler.host_state import RequestSpec
from scheduler.selection import NoValidHost

log = logging.getLogger(__name__)

S = MigrationStatus


class MigrationCheckFailed(Exception):
    """A pre-flight check refused the migration (HTTP 409); the server was not touched."""

    def __init__(self, instance: Instance, check: str, message: str) -> None:
        self.instance = instance
        self.check = check
        super().__init__(message)


class MigrationInvalidState(Exception):
    """The migration is not in a state the request applies to (HTTP 409)."""

    def __init__(self, migration: Migration, message: str) -> None:
        self.migration = migration
        super().__init__(message)


# A request refused with its reason, nothing changed: a batch (admin action, host evacuation) reports it
# for that server and goes on with the next.
REFUSED = (InstanceInvalidState, HostUnavailable, InvalidRequest, rpc.ComputeUnavailable,
           MigrationCheckFailed)


@dataclass(frozen=True)
class Evacuation:
    """One server of :func:`host_live_migrate_servers`: its migration, or why it stays."""

    server: Instance
    migration: Migration | None
    refused: str = ""

    @property
    def accepted(self) -> bool:
        return self.migration is not None


def _requester(user: Any) -> str:
    """Who asked, for an event's or a disable reason's text."""
    return getattr(user, "username", "") or "the system"


def _check_block_migration(block_migration: Any) -> None:
    if block_migration not in ("auto", True, False):
        raise InvalidRequest("block_migration", 'must be "auto", true or false')


def migrations_visible_to(user: Any) -> QuerySet[Migration]:
    migrations = Migration.objects.select_related("instance", "source_host", "dest_host", "old_flavor",
                                                  "new_flavor")
    if is_admin(user):
        return migrations
    return migrations.filter(instance__project_id=project_id_of(user))


# --- Requests -------------------------------------------------------------------------------------

def server_live_migrate(*, instance: Instance, user: Any, host: str | None = None,
                        block_migration: bool | str = "auto",
                        request_id: str | None = None) -> Migration:
    """Live-migrate a running (or paused) server to ``host`` or to a host the scheduler picks.

    ``block_migration`` "auto" copies the disk only when the two hosts do not share the instance
    storage (detected by the hosts, never assumed); True insists on copying it, False on sharing.
    """
    _check_block_migration(block_migration)
    source = _require_host_up(instance, "live-migrate")
    _require_idle(instance, states.LIVE_MIGRATE)

    def checks(dest: Host) -> dict[str, Any]:
        answer = _preflight(instance, dest, live=True)
        shared = bool(answer["shared_storage"])
        if block_migration is True and shared:
            raise InvalidRequest("block_migration", f"hosts {source.name} and {dest.name} share the "
                                                    "instance storage: a block migration would copy "
                                                    "the disk onto itself; use false or auto")
        if block_migration is False and not shared:
            raise MigrationCheckFailed(instance, "shared_storage",
                                       f"hosts {source.name} and {dest.name} do not share the instance "
                                       "storage: the disk must be copied (block_migration true or auto)")
        answer["block_migration"] = not shared
        if not shared:
            _check_disk_space(instance, dest, answer)
        return answer

    def start(migration: Migration, dest: Host, answer: dict[str, Any]) -> None:
        data_gib = instance.memory_mb / 1024 + (answer["disk_bytes"] / GIB if answer["block_migration"]
                                                else 0)
        migration.block_migration = answer["block_migration"]
        migration.shared_storage = bool(answer["shared_storage"])
        migration.migration_uri = answer["migration_uri"]
        migration.migration_data_uri = answer.get("migration_data_uri") or ""
        migration.completion_timeout = max(1, round(settings.LIVE_MIGRATION_COMPLETION_TIMEOUT
                                                    * max(data_gib, 1 / 1024)))
        migration.status = S.PREPARING
        migration.save()
        kwargs = {"instance_uuid": str(instance.uuid), "migration_id": migration.pk,
                  "spec": spawn_spec(instance, dest.name),
                  "block_migration": migration.block_migration,
                  "shared_storage": migration.shared_storage,
                  "shared_marker": answer.get("shared_marker") or ""}
        transaction.on_commit(lambda: rpc.cast(dest.name, contract.COMPUTE_PRE_LIVE_MIGRATION, **kwargs))

    return _begin(instance=instance, user=user, rule=states.LIVE_MIGRATE, kind=MigrationType.LIVE,
                  host=host, flavor=instance.flavor, checks=checks, start=start, request_id=request_id,
                  same_host=False)


def host_live_migrate_servers(*, host: Host, user: Any,
                              block_migration: bool | str = "auto") -> list[Evacuation]:
    """Empty a host for maintenance (Nova's host-evacuate-live): disable it first, so that nothing is
    scheduled onto it meanwhile (an operator's reason is kept), then live-migrate each of its servers to
    a host the scheduler picks, each through :func:`server_live_migrate` with its checks. A server
    refused (stopped: cold-migrate it; no destination fits; in a task) is reported with the reason and
    the others go on. One pre-flight call per server: the request takes as long as they do."""
    _check_block_migration(block_migration)
    if host.enabled:
        host_set_enabled(host=host, enabled=False, reason=f"live-migrating its servers away (requested by "
                                                          f"{_requester(user)})")
    results = []
    servers = (Instance.objects.filter(host=host).exclude(vm_state=VmState.DELETED)
               .select_related("host").order_by("created"))
    for server in servers:
        try:
            migration = server_live_migrate(instance=server, user=user, host=None,
                                            block_migration=block_migration)
        except REFUSED as refused:
            results.append(Evacuation(server, None, str(refused)))
        else:
            results.append(Evacuation(server, migration))
    return results


def server_migrate(*, instance: Instance, user: Any, host: str | None = None,
                   request_id: str | None = None) -> Migration:
    """Cold-migrate a server: stop it, copy its disk to another host, start it there (if it ran)."""
    _require_host_up(instance, "migrate")
    _require_idle(instance, states.COLD_MIGRATE)
    return _begin_cold(instance=instance, user=user, rule=states.COLD_MIGRATE, kind=MigrationType.COLD,
                       host=host, flavor=instance.flavor, request_id=request_id, same_host=False)


def server_resize(*, instance: Instance, user: Any, flavor: Flavor,
                  request_id: str | None = None) -> Migration:
    """Resize a server to ``flavor``: a cold migration that may stay on its host; it ends in
    VERIFY_RESIZE with the old disk kept until the resize is confirmed or reverted."""
    _require_host_up(instance, "resize")
    _require_idle(instance, states.RESIZE)
    if flavor.pk == instance.flavor_id:
        raise InvalidRequest("flavor", f"the server already has flavor {flavor.name}")
    if flavor.disabled:
        raise InvalidRequest("flavor", f"flavor {flavor.name} is disabled")
    if flavor.root_gb < instance.root_gb:
        raise InvalidRequest("flavor", f"flavor {flavor.name} has a {flavor.root_gb} GiB disk, smaller "
                                       f"than the server's {instance.root_gb} GiB: disks cannot shrink")
    image = instance.image
    if image is not None and flavor.memory_mb < image.min_ram:
        raise InvalidRequest("flavor", f"flavor {flavor.name} has {flavor.memory_mb} MiB RAM; image "
                                       f"{image.name} needs at least {image.min_ram} MiB")
    return _begin_cold(instance=instance, user=user, rule=states.RESIZE, kind=MigrationType.RESIZE,
                       host=None, flavor=flavor, request_id=request_id,
                       same_host=settings.ALLOW_RESIZE_TO_SAME_HOST)


def _begin_cold(*, instance: Instance, user: Any, rule: states.Transition, kind: str, host: str | None,
                flavor: Flavor, request_id: str | None, same_host: bool) -> Migration:
    def checks(dest: Host) -> dict[str, Any]:
        answer = _preflight(instance, dest, live=False)
        if not answer["shared_storage"] and dest.pk != instance.host_id:
            _check_disk_space(instance, dest, answer)
        return answer

    def start(migration: Migration, dest: Host, answer: dict[str, Any]) -> None:
        migration.shared_storage = bool(answer["shared_storage"]) or dest.pk == instance.host_id
        migration.migration_uri = answer["migration_uri"]
        migration.power_on = instance.vm_state == VmState.ACTIVE
        migration.status = S.PREPARING
        migration.save()
        kwargs = {"instance_uuid": str(instance.uuid), "migration_id": migration.pk,
                  "spec": spawn_spec(instance, dest.name, flavor),
                  "shared_marker": answer.get("shared_marker") or ""}
        transaction.on_commit(lambda: rpc.cast(dest.name, contract.COMPUTE_PREP_RESIZE, **kwargs))

    return _begin(instance=instance, user=user, rule=rule, kind=kind, host=host, flavor=flavor,
                  checks=checks, start=start, request_id=request_id, same_host=same_host)


def _require_idle(instance: Instance, rule: states.Transition) -> None:
    """Refuse early (409) what the transition would refuse, before asking any host anything."""
    if instance.vm_state not in rule.from_vm_states or instance.task_state not in rule.from_task_states:
        raise InstanceInvalidState(instance, rule.action)


def _candidates(instance: Instance, flavor: Flavor, host: str | None,
                same_host: bool) -> tuple[list[str], RequestSpec]:
    """Destination hosts to try, best first, and the request they were chosen for (the claim
    re-checks it): the scheduler's filters and weighers over every host (a host an admin named is
    still filtered). Raises InvalidRequest for a named host that does not pass, MigrationCheckFailed
    when no host does."""
    source = instance.host
    assert source is not None
    if host:
        if not Host.objects.filter(name=host).exists():
            raise InvalidRequest("host", f"no host {host!r}")
        if host == source.name and not same_host:
            raise InvalidRequest("host", f"the server already runs on host {host}")
    spec = replace(placement.request_spec_of(instance), vcpus=flavor.vcpus, memory_mb=flavor.memory_mb,
                   root_gb=flavor.root_gb, flavor_extra_specs=dict(flavor.extra_specs),
                   ignore_hosts=() if same_host else (source.name,), force_host=host or "")
    try:
        chosen = placement.candidate_hosts(spec, subset_size=1)
    except NoValidHost as no_host:
        if host:
            raise InvalidRequest("host", no_host.message) from None
        raise MigrationCheckFailed(instance, "scheduler", no_host.message) from None
    return [h.name for h in chosen][: settings.MIGRATION_MAX_ATTEMPTS], spec


def _begin(*, instance: Instance, user: Any, rule: states.Transition, kind: str, host: str | None,
           flavor: Flavor, checks: Callable[[Host], dict[str, Any]],
           start: Callable[[Migration, Host, dict[str, Any]], None], request_id: str | None,
           same_host: bool) -> Migration:
    """Pick a destination whose checks pass, then in one transaction: the state transition, the
    migration record, the claim on the destination, and the first step sent when it commits."""
    failures: list[str] = []
    last: Exception | None = None
    names, spec = _candidates(instance, flavor, host, same_host)
    for name in names:
        dest = Host.objects.get(name=name)
        try:
            answer = checks(dest)
        except MigrationCheckFailed as failed:
            failures.append(str(failed))
            last = failed
            continue
        with transaction.atomic():
            transition(instance, rule)
            action = action_start(instance=instance, action=rule.action, user=user,
                                  request_id=request_id or new_request_id())
            migration = Migration.objects.create(
                instance=instance, migration_type=kind, source_host=instance.host, dest_host=dest,
                old_flavor=instance.flavor, new_flavor=flavor, action=action,
                user=user if getattr(user, "pk", None) else None)
            if not placement.claim_move(str(instance.uuid), dest.name, spec, migration.pk):
                failed = MigrationCheckFailed(instance, "resources",
                                              f"host {dest.name} no longer has room for flavor "
                                              f"{flavor.name} (claimed concurrently)")
                transaction.set_rollback(True)
                failures.append(str(failed))
                last = failed
                instance.refresh_from_db()
                continue
            now = timezone.now()
            action.events.create(event="preflight_checks", result="Success", host=dest.name,
                                 start_time=now, finish_time=now, message=_checks_message(answer))
            start(migration, dest, answer)
        instance.refresh_from_db()
        return migration
    if isinstance(last, MigrationCheckFailed):
        if len(failures) > 1:
            raise MigrationCheckFailed(instance, last.check, "; ".join(failures))
        raise last
    raise MigrationCheckFailed(instance, "scheduler", "No valid host was found for the migration.")


def _checks_message(answer: dict[str, Any]) -> str:
    parts = [f"cpu {answer.get('cpu', 'skipped')}",
             "shared storage" if answer.get("shared_storage") else "no shared storage",
             f"image {'cached' if answer.get('image_cached') else 'fetchable'}"]
    if "block_migration" in answer:
        parts.append("block migration" if answer["block_migration"] else "memory only")
    return "pre-flight checks passed: " + ", ".join(parts)


def _preflight(instance: Instance, dest: Host, *, live: bool) -> dict[str, Any]:
    """The destination's then the source's checks (synchronous calls). Raises MigrationCheckFailed."""
    source = instance.host
    assert source is not None
    if not dest.is_up:
        raise MigrationCheckFailed(instance, "destination", f"host {dest.name} is down")
    if dest.pk == source.pk:  # a resize on its own host: the disk stays where it is
        return {"ok": True, "migration_uri": "", "shared_storage": True, "image_cached": True,
                "disk_bytes": 0, "disk_free_bytes": 0, "cpu": "skipped"}
    timeout = settings.MIGRATION_PRECHECK_TIMEOUT
    try:
        answer = rpc.call(dest.name, contract.COMPUTE_CHECK_MIGRATE_DESTINATION, timeout=timeout,
                          instance_uuid=str(instance.uuid), source_host=source.name,
                          source_cpu_info=source.cpu_info or {},
                          image=spawn_spec(instance, dest.name)["image"], live=live)
    except rpc.ComputeUnavailable as exc:
        raise MigrationCheckFailed(instance, "destination", str(exc)) from None
    if not answer.get("ok"):
        raise MigrationCheckFailed(instance, str(answer.get("check") or "destination"),
                                   f"destination {dest.name}: {answer.get('message', 'refused')}")
    try:
        source_answer = rpc.call(source.name, contract.COMPUTE_CHECK_MIGRATE_SOURCE, timeout=timeout,
                                 instance_uuid=str(instance.uuid),
                                 shared_marker=answer.get("shared_marker") or "")
    except rpc.ComputeUnavailable as exc:
        raise MigrationCheckFailed(instance, "source", str(exc)) from None
    if not source_answer.get("ok"):
        raise MigrationCheckFailed(instance, str(source_answer.get("check") or "source"),
                                   f"source {source.name}: {source_answer.get('message', 'refused')}")
    return {**answer, **source_answer}


def _check_disk_space(instance: Instance, dest: Host, answer: dict[str, Any]) -> None:
    image_bytes = 0 if answer.get("image_cached") or instance.image is None else (instance.image.size or 0)
    needed = int(answer.get("disk_bytes") or 0) + image_bytes
    free = int(answer.get("disk_free_bytes") or 0)
    if needed > free:
        raise MigrationCheckFailed(instance, "disk",
                                   f"host {dest.name} has {free / GIB:.2f} GiB free for instances; the "
                                   f"disk to copy needs {needed / GIB:.2f} GiB")


def migration_abort(*, migration: Migration, user: Any) -> Migration:
    """Abort a live migration in progress; the server stays on its source, running."""
    with transaction.atomic():
        locked = Migration.objects.select_for_update().get(pk=migration.pk)
        if locked.migration_type != MigrationType.LIVE:
            raise MigrationInvalidState(locked, f"migration {locked.pk} is a {locked.migration_type}: only "
                                                "live migrations can be aborted")
        if locked.status == S.RUNNING_POSTCOPY:
            raise MigrationInvalidState(locked, f"migration {locked.pk} is {locked.status}: the guest "
                                                f"already runs on {locked.dest_host.name} and fetches "
                                                "the rest of its memory from the source; it can no "
                                                "longer be aborted")
        if locked.status not in (S.PREPARING, S.QUEUED, S.RUNNING):
            raise MigrationInvalidState(locked, f"migration {locked.pk} is {locked.status}: it can be "
                                                "aborted while preparing, queued or running")
        locked.status = S.CANCELLING
        locked.save(update_fields=["status", "updated"])
        record_event(str(locked.instance_id), event="abort_live_migration", result="Start",
                     host=locked.source_host.name if locked.source_host else "",
                     message=f"abort requested by {_requester(user)}",
                     action_id=locked.action_id)
        _cast_abort(locked)
    return locked


def migration_force_complete(*, migration: Migration, user: Any) -> Migration:
    """Nova's force-complete: ask the source to switch a running live migration over now (to
    post-copy where the source host permits it, else by pausing the guest until the copy converges).
    The outcome comes back as the migration's status ("running (post-copy)") and events."""
    with transaction.atomic():
        locked = Migration.objects.select_for_update(of=("self",)).select_related("source_host").get(
            pk=migration.pk)
        if locked.migration_type != MigrationType.LIVE:
            raise MigrationInvalidState(locked, f"migration {locked.pk} is a {locked.migration_type}: only "
                                                "live migrations can be forced to complete")
        if locked.status != S.RUNNING:
            raise MigrationInvalidState(locked, f"migration {locked.pk} is {locked.status}: it can be "
                                                "forced to complete only while running")
        # The source acts on one switch-over per migration: a second request would wait for nothing.
        earlier = (InstanceActionEvent.objects.filter(action_id=locked.action_id,
                                                      event=contract.FORCE_COMPLETE_EVENT)
                   .exclude(result="Error").order_by("-id").first())
        if earlier is not None:
            state = ("switched over" if earlier.result == "Success"
                     else "already waiting for libvirt to take its switch-over")
            raise MigrationInvalidState(locked, f"migration {locked.pk} is {state} (force-complete requested "
                                                f"at {earlier.start_time:%H:%M:%S} UTC): "
                                                f"{earlier.message or 'sent to the source'}")
        # Opened under the name the source's report closes it with: one row from request to switch-over.
        record_event(str(locked.instance_id), event=contract.FORCE_COMPLETE_EVENT, result="Start",
                     host=locked.source_host.name if locked.source_host else "",
                     message=f"requested by {_requester(user)}",
                     action_id=locked.action_id)
        _cast(locked.source_host, contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE, **_ids(locked))
    return locked


def _cast_abort(migration: Migration) -> None:
    _cast(migration.source_host, contract.COMPUTE_ABORT_LIVE_MIGRATION, **_ids(migration))


def _resize_migration(instance: Instance) -> Migration:
    migration = (Migration.objects.filter(instance=instance, status=S.FINISHED,
                                          migration_type=MigrationType.RESIZE)
                 .select_related("source_host", "dest_host", "old_flavor", "new_flavor").first())
    if migration is None:
        raise InstanceInvalidState(instance, "confirm or revert the resize of")
    return migration


def server_confirm_resize(*, instance: Instance, user: Any, request_id: str | None = None) -> Migration:
    """Keep the new flavor: the source's copy and resources are freed."""
    return _resize_decision(instance, user, states.CONFIRM_RESIZE, request_id, _confirm, "source")


def server_revert_resize(*, instance: Instance, user: Any, request_id: str | None = None) -> Migration:
    """Go back to the old flavor on the old host, with the disk as it was before the resize."""
    return _resize_decision(instance, user, states.REVERT_RESIZE, request_id, _revert, "dest")


def _resize_decision(instance: Instance, user: Any, rule: states.Transition, request_id: str | None,
                     send: Callable[[Migration, InstanceAction | None], None], end: str) -> Migration:
    """Confirm or revert: the host that acts first (the source removes its copy; the destination
    undoes the new domain) must be up; one transition, an action, the step sent."""
    migration = _resize_migration(instance)
    host = migration.source_host if end == "source" else migration.dest_host
    if host is None or not host.is_up:
        raise HostUnavailable(instance, f"cannot {rule.action} server {instance.uuid}: its {end} host "
                                        f"{host.name if host else '(gone)'} is down")
    with transaction.atomic():
        transition(instance, rule)
        action = action_start(instance=instance, action=rule.action, user=user,
                              request_id=request_id or new_request_id())
        send(migration, action)
    return migration


def _confirm(migration: Migration, action: InstanceAction | None) -> None:
    _next_step(migration, action, S.CONFIRMING, migration.source_host, contract.COMPUTE_CONFIRM_RESIZE)


def _revert(migration: Migration, action: InstanceAction | None) -> None:
    _next_step(migration, action, S.REVERTING, migration.dest_host, contract.COMPUTE_REVERT_RESIZE)


def _next_step(migration: Migration, action: InstanceAction | None, status: str, host: Host | None,
               task: str) -> None:
    """Move the migration to ``status`` (under ``action`` when a request started it) and send ``task``."""
    Migration.objects.filter(pk=migration.pk).update(status=status, updated=timezone.now(),
                                                      **({"action": action} if action else {}))
    _cast(host, task, **_ids(migration))


def confirm_expired_resizes() -> int:
    """Confirm the resizes left unconfirmed for RESIZE_CONFIRM_WINDOW seconds (Nova's
    ``_poll_unconfirmed_resizes``). Returns how many were confirmed."""
    window = settings.RESIZE_CONFIRM_WINDOW
    if window <= 0:
        return 0
    confirmed = 0
    expired = (Migration.objects.filter(status=S.FINISHED, migration_type=MigrationType.RESIZE,
                                        finished_at__lt=timezone.now() - timedelta(seconds=window))
               .select_related("instance", "source_host"))
    for migration in expired:
        instance = migration.instance
        with transaction.atomic():
            if not Instance.objects.filter(uuid=instance.uuid, vm_state=VmState.RESIZED,
                                           task_state__isnull=True).change(
                    task_state=TaskState.RESIZE_CONFIRMING):
                continue
            action = action_start(instance=instance, action=states.CONFIRM_RESIZE.action, user=None,
                                  request_id="system")
            now = timezone.now()
            action.events.create(event="auto_confirm_resize", result="Success", start_time=now,
                                 finish_time=now, message=f"not confirmed within RESIZE_CONFIRM_WINDOW "
                                                          f"({window} s): confirmed automatically")
            _confirm(migration, action)
        confirmed += 1
    return confirmed


# --- Reports from the hosts ------------------------------------------------------------------------

def _progress_values(progress: Any) -> dict[str, int]:
    """The byte counters of a host's progress report that are numbers (bool is no count)."""
    if not isinstance(progress, dict):
        return {}
    return {key: int(progress[key]) for key in contract.MIGRATION_PROGRESS_KEYS
            if isinstance(progress.get(key), int | float) and not isinstance(progress[key], bool)}


def migration_progress(*, migration_id: int, host: str, progress: dict[str, Any]) -> bool:
    values = _progress_values(progress)
    return bool(Migration.objects.filter(pk=migration_id, source_host__name=host,
                                         status__in=(*_LIVE_JOB, S.MIGRATING))
                .update(progress_updated=timezone.now(), updated=timezone.now(), **values))


def migration_update(*, migration_id: int, host: str, status: str, error: str | None = None,
                     values: dict[str, Any] | None = None, event: dict[str, Any] | None = None) -> bool:
    """Apply a step's outcome and send the next step. A report the migration does not expect now
    (a redelivery, a late report, the wrong host) is dropped and logged."""
    values = values or {}
    with transaction.atomic():
        migration = (Migration.objects.select_for_update(of=("self",)).select_related(
            "instance", "source_host", "dest_host", "old_flavor", "new_flavor")
            .filter(pk=migration_id).first())
        if migration is None:
            log.warning("dropped migration report %s from %s: no migration %s", status, host, migration_id)
            return False
        live = migration.migration_type == MigrationType.LIVE
        handler = (_LIVE_STEPS if live else _COLD_STEPS).get(status)
        role = _role(migration, host, status)
        if handler is None or role is None or migration.status not in handler[0] \
                or handler[1] not in (role, "any"):
            log.info("dropped migration report %s from %s for migration %s (%s, status %s)", status, host,
                     migration_id, migration.migration_type, migration.status)
            return False
        instance_uuid = str(migration.instance_id)
        if event:
            record_event(instance_uuid, event=str(event.get("name", "migration")),
                         result=str(event.get("result", "")), host=host,
                         message=str(event.get("message", "")), action_id=migration.action_id)
        handler[2](migration, host=host, error=error or "", values=values)
    return True


def _role(migration: Migration, host: str, status: str) -> str | None:
    source = migration.source_host.name if migration.source_host else None
    dest = migration.dest_host.name if migration.dest_host else None
    if source == dest == host:  # a resize on one host: the step says which end reports
        return _SAME_HOST_ROLE.get(status, "dest")
    if host == source:
        return "source"
    if host == dest:
        return "dest"
    return None


_SAME_HOST_ROLE = {contract.MIGRATION_RUNNING: "source", contract.MIGRATION_RUNNING_POSTCOPY: "source",
                   contract.MIGRATION_MIGRATED: "source",
                   contract.MIGRATION_CANCELLED: "source", contract.MIGRATION_FAILED: "source",
                   contract.MIGRATION_CONFIRMED: "source", contract.MIGRATION_REVERTED: "source"}


def _set(migration: Migration, **values: Any) -> None:
    values.setdefault("updated", timezone.now())
    Migration.objects.filter(pk=migration.pk).update(**values)
    for key, value in values.items():
        setattr(migration, key, value)


def _event(migration: Migration, name: str, result: str, message: str, host: str = "") -> None:
    record_event(str(migration.instance_id), event=name, result=result, host=host, message=message,
                 action_id=migration.action_id)


def _finish(migration: Migration, result: str, message: str = "") -> None:
    action = InstanceAction.objects.filter(pk=migration.action_id).first()
    if action is not None:
        finish_action(action, result=result, message=message)


def _release_destination(migration: Migration) -> None:
    """The move did not happen: the destination's claim goes, the source's is the server's again."""
    Allocation.objects.filter(instance_id=migration.instance_id, host=migration.dest_host,
                              migration__isnull=True).delete()
    Allocation.objects.filter(migration=migration).update(migration=None)


def _release_source(migration: Migration) -> None:
    """The move is final: the source's claim, held by the migration, goes."""
    Allocation.objects.filter(migration=migration).delete()


def _vm_state_of(power_state: str, fallback: str) -> str:
    if power_state in PowerState.values:
        return states.VM_STATE_FOR_POWER_STATE[PowerState(power_state)]
    return fallback


def _settled(power_state: str | None, fallback: str) -> dict[str, Any]:
    """The instance's values when its task ends: the power state a host reported and the vm_state it
    means; only the task when the host could not say."""
    changes: dict[str, Any] = {"task_state": None}
    if power_state:
        changes.update(power_state=power_state, vm_state=_vm_state_of(power_state, fallback))
    return changes


def _landed(host: Host, power_state: str, fallback: str) -> dict[str, Any]:
    """:func:`_settled`, on ``host`` (and in its zone) from now on."""
    return {"host": host, "availability_zone": host.zone, **_settled(power_state, fallback)}


def _reported_or_expected(migration: Migration, values: dict[str, Any]) -> str:
    """The power state a cold-migration step reported, else what it was asked for."""
    return values.get("power_state") or (PowerState.RUNNING if migration.power_on else PowerState.SHUTDOWN)


def _instance(migration: Migration, expected_task: str) -> QuerySet[Instance]:
    return Instance.objects.filter(uuid=migration.instance_id, task_state=expected_task)


def _cast(host: Host | None, task: str, **kwargs: Any) -> None:
    """Send a step when the transaction commits. A step not started within MIGRATION_STEP_TIMEOUT
    is discarded by the worker (the reaper ends the migration): never a live migration starting hours
    later because Redis redelivered it after a worker died holding it."""
    if host is None:
        return
    name, expires = host.name, settings.MIGRATION_STEP_TIMEOUT
    transaction.on_commit(lambda: rpc.cast(name, task, expires=expires, **kwargs))


def _ids(migration: Migration) -> dict[str, Any]:
    return {"instance_uuid": str(migration.instance_id), "migration_id": migration.pk}


# Live migration steps -----------------------------------------------------------------------------

def _live_prepared(migration: Migration, **_: Any) -> None:
    if migration.status == S.CANCELLING:
        _live_failed(migration, status=S.CANCELLED, error="aborted on request before it started",
                     values={})
        return
    _set(migration, status=S.QUEUED)
    _cast(migration.source_host, contract.COMPUTE_LIVE_MIGRATION, **_ids(migration),
          dest_host=migration.dest_host.name, migration_uri=migration.migration_uri,
          migration_data_uri=migration.migration_data_uri or None,
          block_migration=bool(migration.block_migration), shared_storage=bool(migration.shared_storage),
          completion_timeout=migration.completion_timeout)


def _live_running(migration: Migration, **_: Any) -> None:
    """The job runs (reported once when it starts, and again with the event of a switch-over that
    paused the guest or that libvirt refused)."""
    started_at = migration.started_at or timezone.now()
    if migration.status == S.CANCELLING:
        _set(migration, started_at=started_at)
        _cast_abort(migration)  # the first abort may have arrived before the job started
        return
    if migration.status == S.RUNNING_POSTCOPY:  # a late report: post-copy cannot go back
        return
    _set(migration, status=S.RUNNING, started_at=started_at)


def _live_postcopy(migration: Migration, **_: Any) -> None:
    """Switched to post-copy: the guest runs on the destination now and can no longer be aborted (an
    abort asked for meanwhile has lost the race)."""
    _set(migration, status=S.RUNNING_POSTCOPY, started_at=migration.started_at or timezone.now())


def _close_force_complete(migration: Migration, result: str, outcome: str) -> None:
    """A force-complete still waiting when the migration ends (libvirt refused the switch-over so far,
    or the source never got the request) ends with it: its event must not stay open."""
    waiting = InstanceActionEvent.objects.filter(
        action_id=migration.action_id, event=contract.FORCE_COMPLETE_EVENT, finish_time__isnull=True)
    for event in waiting:
        event.finish_time, event.result = timezone.now(), result
        event.message = "; ".join(part for part in (event.message, f"not switched over: {outcome}") if part)
        event.save(update_fields=["finish_time", "result", "message"])


def _live_migrated(migration: Migration, **_: Any) -> None:
    _close_force_complete(migration, "Success", "the migration completed first")
    _set(migration, status=S.POST_MIGRATING)
    instance = migration.instance
    _cast(migration.dest_host, contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST, **_ids(migration),
          spec=spawn_spec(instance, migration.dest_host.name))


def _live_completed(migration: Migration, *, values: dict[str, Any], **_: Any) -> None:
    power_state = values.get("power_state") or PowerState.RUNNING
    instance = migration.instance
    changes = _landed(migration.dest_host, power_state, instance.vm_state)
    if not _instance(migration, TaskState.MIGRATING).filter(host=migration.source_host).change(**changes):
        log.warning("live migration %s completed but %s is no longer migrating", migration.pk, instance.uuid)
    _release_source(migration)
    # The destination's final figures (libvirt's completed job) fill in what progress reports missed:
    # a quick migration may end before the first one.
    figures: dict[str, Any] = {"memory_remaining": 0,
                               "disk_remaining": 0 if migration.block_migration else migration.disk_remaining,
                               **_progress_values(values.get("progress"))}
    downtime = values.get("downtime_ms")
    if type(downtime) is int and downtime >= 0:
        figures["downtime_ms"] = downtime
    _set(migration, status=S.COMPLETED, finished_at=timezone.now(), **figures)
    seconds = (timezone.now() - (migration.started_at or migration.created)).total_seconds()
    _event(migration, "live_migration", "Success",
           f"{migration.source_host.name} -> {migration.dest_host.name} in {seconds:.1f} s", host="")
    _finish(migration, "Success")


def _live_failed(migration: Migration, *, status: str = S.FAILED, error: str = "",
                 values: dict[str, Any], **_: Any) -> None:
    """The domain stayed on the source (libvirt failed, or the job was aborted, or the destination
    could not prepare): the server is where it was, in the state its domain is in."""
    instance = migration.instance
    power_state = values.get("power_state")
    changes = _settled(power_state, instance.vm_state)
    if migration.status == S.RUNNING_POSTCOPY:
        # The guest ran on the destination with part of its memory still on the source: neither copy
        # can go on. The destination's is removed (rollback); the source's disk is the one to boot.
        changes.update(vm_state=VmState.ERROR, fault={
            "message": f"live migration {migration.pk} failed in post-copy: the guest's memory was "
                       f"split between {migration.source_host.name} and {migration.dest_host.name} and "
                       f"it cannot continue ({error}). A hard reboot starts it again on "
                       f"{migration.source_host.name} from its disk there; what it wrote after the "
                       "switch-over may be lost", "code": 500, "details": ""})
    elif power_state == PowerState.NOSTATE:
        changes["fault"] = {"message": f"live migration {migration.pk} failed and the domain no "
                                       f"longer exists on {migration.source_host.name}: {error}",
                            "code": 500, "details": ""}
    _instance(migration, TaskState.MIGRATING).change(**changes)
    _release_destination(migration)
    message = error or status
    _set(migration, status=status, error=message, finished_at=timezone.now())
    label = "cancelled" if status == S.CANCELLED else "failed"
    _close_force_complete(migration, "Error", f"the migration {label}")
    _event(migration, "live_migration", "Error", f"live migration {label}: {message}")
    if status == S.CANCELLED:
        _event(migration, "abort_live_migration", "Success", message)
    _finish(migration, "Error", f"live migration {label}: {message}")
    _cast(migration.dest_host, contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST, **_ids(migration),
          shared_storage=bool(migration.shared_storage))


def _live_cancelled(migration: Migration, *, error: str, values: dict[str, Any], **_: Any) -> None:
    _live_failed(migration, status=S.CANCELLED, error=error or "aborted on request", values=values)


def _live_source_failed(migration: Migration, *, error: str, values: dict[str, Any], **_: Any) -> None:
    _live_failed(migration, status=S.FAILED, error=error, values=values)


def _live_dest_error(migration: Migration, *, error: str, values: dict[str, Any], **_: Any) -> None:
    if migration.status in (S.PREPARING, S.CANCELLING):
        _live_failed(migration, status=S.ERROR, error=f"the destination could not prepare: {error}",
                     values={})
        return
    # post-migrating: libvirt said the domain moved, the destination disagrees. Tell what is known.
    power_state = values.get("power_state") or PowerState.NOSTATE
    instance = migration.instance
    if power_state != PowerState.NOSTATE:
        _instance(migration, TaskState.MIGRATING).change(
            **_landed(migration.dest_host, power_state, instance.vm_state))
        _release_source(migration)
    else:
        _instance(migration, TaskState.MIGRATING).change(
            task_state=None, vm_state=VmState.ERROR, power_state=PowerState.NOSTATE,
            fault={"message": f"live migration {migration.pk}: libvirt reported the domain moved to "
                              f"{migration.dest_host.name}, but it does not run there: {error}",
                   "code": 500, "details": ""})
    _set(migration, status=S.ERROR, error=error, finished_at=timezone.now())
    _event(migration, "post_live_migration", "Error", error)
    _finish(migration, "Error", error)


def _rolled_back(migration: Migration, *, host: str, **_: Any) -> None:
    log.info("migration %s rolled back on %s", migration.pk, host)


_ACTIVE_LIVE = (S.QUEUED, S.RUNNING, S.CANCELLING)
# A libvirt job may run on the source: also once switched to post-copy (it can no longer be aborted).
_LIVE_JOB = (*_ACTIVE_LIVE, S.RUNNING_POSTCOPY)
_LIVE_STEPS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    contract.MIGRATION_PREPARED: ((S.PREPARING, S.CANCELLING), "dest", _live_prepared),
    contract.MIGRATION_RUNNING: (_LIVE_JOB, "source", _live_running),
    contract.MIGRATION_RUNNING_POSTCOPY: (_ACTIVE_LIVE, "source", _live_postcopy),
    contract.MIGRATION_MIGRATED: (_LIVE_JOB, "source", _live_migrated),
    contract.MIGRATION_CANCELLED: (_ACTIVE_LIVE, "source", _live_cancelled),
    contract.MIGRATION_FAILED: (_LIVE_JOB, "source", _live_source_failed),
    contract.MIGRATION_COMPLETED: ((S.POST_MIGRATING,), "dest", _live_completed),
    contract.MIGRATION_ERROR: ((S.PREPARING, S.CANCELLING, S.POST_MIGRATING), "dest", _live_dest_error),
    contract.MIGRATION_ROLLED_BACK: ((S.FAILED, S.CANCELLED, S.ERROR), "dest", _rolled_back),
}


# Cold migration and resize steps -------------------------------------------------------------------

def _cold_prepared(migration: Migration, **_: Any) -> None:
    _set(migration, status=S.MIGRATING, started_at=timezone.now())
    _instance(migration, TaskState.RESIZE_PREP).change(task_state=TaskState.RESIZE_MIGRATING)
    _cast(migration.source_host, contract.COMPUTE_RESIZE_INSTANCE, **_ids(migration),
          dest_host=migration.dest_host.name, migration_uri=migration.migration_uri,
          timeout=settings.CLEAN_SHUTDOWN_TIMEOUT)


def _cold_failed(migration: Migration, *, error: str, values: dict[str, Any], host: str = "",
                 **_: Any) -> None:
    """Preparing or copying failed; the source put everything back: the server is where it was."""
    instance = migration.instance
    Instance.objects.filter(uuid=instance.uuid, task_state__in=(
        TaskState.RESIZE_PREP, TaskState.RESIZE_MIGRATING)).change(
        **_settled(values.get("power_state"), instance.vm_state))
    _release_destination(migration)
    _set(migration, status=S.ERROR, error=error, finished_at=timezone.now())
    _event(migration, f"{migration.migration_type}", "Error", error, host=host)
    _finish(migration, "Error", error)


def _cold_migrated(migration: Migration, **_: Any) -> None:
    _set(migration, status=S.POST_MIGRATING)
    _instance(migration, TaskState.RESIZE_MIGRATING).change(task_state=TaskState.RESIZE_FINISH)
    _cast(migration.dest_host, contract.COMPUTE_FINISH_RESIZE, **_ids(migration),
          spec=spawn_spec(migration.instance, migration.dest_host.name, migration.new_flavor),
          power_on=migration.power_on)


def _apply_flavor(flavor: Flavor) -> dict[str, Any]:
    return {"flavor": flavor, "vcpus": flavor.vcpus, "memory_mb": flavor.memory_mb, "root_gb": flavor.root_gb}


def _cold_finished(migration: Migration, *, values: dict[str, Any], **_: Any) -> None:
    dest = migration.dest_host
    resize = migration.migration_type == MigrationType.RESIZE
    changes = _landed(dest, _reported_or_expected(migration, values), VmState.ACTIVE)
    if resize:
        changes["vm_state"] = VmState.RESIZED
    _instance(migration, TaskState.RESIZE_FINISH).change(**changes, **_apply_flavor(migration.new_flavor))
    now = timezone.now()
    seconds = (now - (migration.started_at or migration.created)).total_seconds()
    where = f"{migration.source_host.name} -> {dest.name}"
    if resize:
        _set(migration, status=S.FINISHED, finished_at=now)
        _event(migration, "resize", "Success", f"{where}, {migration.old_flavor.name} -> "
                                               f"{migration.new_flavor.name} in {seconds:.1f} s; "
                                               "waiting for confirm or revert")
        _finish(migration, "Success")
        return
    # A cold migration confirms itself: the server is done, the source's copy is removed next.
    _event(migration, "migrate", "Success", f"{where} in {seconds:.1f} s")
    _finish(migration, "Success")
    _set(migration, finished_at=now)
    _confirm(migration, None)


def _cold_finish_failed(migration: Migration, *, error: str, **_: Any) -> None:
    """The destination could not start the copy: go back to the source's disk, kept aside."""
    _instance(migration, TaskState.RESIZE_FINISH).change(task_state=TaskState.RESIZE_REVERTING)
    _set(migration, error=f"the destination {migration.dest_host.name} could not finish: {error}")
    _event(migration, "finish_resize", "Error", f"{error}; reverting to {migration.source_host.name}")
    _revert(migration, None)


def _confirmed(migration: Migration, **_: Any) -> None:
    _release_source(migration)
    _set(migration, status=S.CONFIRMED)
    instance = Instance.objects.get(uuid=migration.instance_id)
    if instance.task_state == TaskState.RESIZE_CONFIRMING:
        Instance.objects.filter(uuid=instance.uuid, task_state=TaskState.RESIZE_CONFIRMING).change(
            task_state=None, vm_state=_vm_state_of(instance.power_state, VmState.ACTIVE))
        _event(migration, "confirm_resize", "Success", f"the old copy on {migration.source_host.name} "
                                                       "is removed")
        _finish(migration, "Success")


def _confirm_failed(migration: Migration, *, error: str, **_: Any) -> None:
    instance = Instance.objects.get(uuid=migration.instance_id)
    _set(migration, status=S.ERROR, error=f"confirm failed on {migration.source_host.name}: {error}")
    if instance.task_state == TaskState.RESIZE_CONFIRMING:
        Instance.objects.filter(uuid=instance.uuid, task_state=TaskState.RESIZE_CONFIRMING).change(
            task_state=None, vm_state=_vm_state_of(instance.power_state, VmState.ACTIVE))
        _finish(migration, "Error", error)


def _reverted_dest(migration: Migration, **_: Any) -> None:
    _cast(migration.source_host, contract.COMPUTE_FINISH_REVERT_RESIZE, **_ids(migration),
          spec=spawn_spec(migration.instance, migration.source_host.name, migration.old_flavor),
          power_on=migration.power_on)


def _reverted(migration: Migration, *, values: dict[str, Any], **_: Any) -> None:
    source = migration.source_host
    _instance(migration, TaskState.RESIZE_REVERTING).change(
        **_landed(source, _reported_or_expected(migration, values), VmState.ACTIVE),
        **_apply_flavor(migration.old_flavor))
    _release_destination(migration)
    failed = bool(migration.error)
    _set(migration, status=S.ERROR if failed else S.REVERTED, finished_at=timezone.now())
    _event(migration, "revert_resize", "Success", f"back on {source.name} with flavor "
                                                  f"{migration.old_flavor.name}")
    _finish(migration, "Error" if failed else "Success", migration.error)


def _revert_failed(migration: Migration, *, error: str, host: str, values: dict[str, Any], **_: Any) -> None:
    message = f"the revert failed on {host}: {error}"
    _instance(migration, TaskState.RESIZE_REVERTING).change(
        task_state=None, vm_state=VmState.ERROR, power_state=values.get("power_state") or PowerState.NOSTATE,
        fault={"message": message, "code": 500, "details": ""})
    _set(migration, status=S.ERROR, error=message, finished_at=timezone.now())
    _event(migration, "revert_resize", "Error", message, host=host)
    _finish(migration, "Error", message)


def _cold_error(migration: Migration, **kwargs: Any) -> None:
    """"error" means different things at different steps."""
    handler = {S.PREPARING: _cold_failed, S.MIGRATING: _cold_failed,
               S.POST_MIGRATING: _cold_finish_failed, S.CONFIRMING: _confirm_failed,
               S.REVERTING: _revert_failed}[S(migration.status)]
    handler(migration, **kwargs)


_COLD_STEPS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    contract.MIGRATION_PREPARED: ((S.PREPARING,), "dest", _cold_prepared),
    contract.MIGRATION_MIGRATED: ((S.MIGRATING,), "source", _cold_migrated),
    contract.MIGRATION_FINISHED: ((S.POST_MIGRATING,), "dest", _cold_finished),
    contract.MIGRATION_CONFIRMED: ((S.CONFIRMING,), "source", _confirmed),
    contract.MIGRATION_REVERTED_DEST: ((S.REVERTING,), "dest", _reverted_dest),
    contract.MIGRATION_REVERTED: ((S.REVERTING,), "source", _reverted),
    contract.MIGRATION_ERROR: ((S.PREPARING, S.MIGRATING, S.POST_MIGRATING, S.CONFIRMING, S.REVERTING),
                               "any", _cold_error),
}


# --- Interrupted and stuck migrations ---------------------------------------------------------------

def recover_after_restart(host: Host, reported: dict[str, str]) -> int:
    """Nova's ``_init_instance`` for migrations: the compute worker of ``host`` restarted while it was
    the source of a migration step. Where its domain is now decides (``reported``: host_init's list).

    A live migration whose domain left the host is finished by asking the destination whether it
    runs there; one whose domain is still here is aborted (the libvirt job may outlive the worker)
    and ends failed, the server on its source. A cold migration or resize interrupted while the
    source stopped or copied the disk ends in ERROR with a fault saying where the disk is.
    """
    recovered = 0
    reason = f"interrupted by a restart of the compute worker on {host.name}"
    live = Migration.objects.filter(source_host=host, migration_type=MigrationType.LIVE,
                                    status__in=_LIVE_JOB)
    for pk in live.values_list("pk", flat=True):
        with transaction.atomic():
            migration = _locked(pk, _LIVE_JOB)
            if migration is None:
                continue
            uuid = str(migration.instance_id)
            if uuid in reported and migration.status == S.RUNNING_POSTCOPY:
                # Past the point of no return: libvirt finishes the job without the worker. The
                # domain leaving (a later report) or the step timeout settles it.
                _event(migration, "init_instance", "Success", f"{reason}; the migration is in post-copy "
                                                              "and cannot be aborted: libvirt finishes it",
                       host=host.name)
                continue
            if uuid in reported:
                _cast_abort(migration)
                _live_failed(migration, status=S.FAILED, values={"power_state": reported[uuid]},
                             error=f"{reason}; the job was aborted and the server stays on {host.name}")
            else:
                _event(migration, "init_instance", "Success", f"{reason}; the domain left {host.name}: "
                                                              f"asking {migration.dest_host.name} whether "
                                                              "it runs there", host=host.name)
                _live_migrated(migration)
            recovered += 1
    cold = Migration.objects.filter(source_host=host, status=S.MIGRATING).exclude(
        migration_type=MigrationType.LIVE)
    for pk in cold.values_list("pk", flat=True):
        with transaction.atomic():
            migration = _locked(pk, (S.MIGRATING,))
            if migration is not None:
                _cold_interrupted(migration, f"{reason} while it stopped the server and copied its disk")
                recovered += 1
    return recovered


def _locked(pk: int, statuses: tuple[str, ...]) -> Migration | None:
    return (Migration.objects.select_for_update(of=("self",))
            .select_related("instance", "source_host", "dest_host", "old_flavor", "new_flavor")
            .filter(pk=pk, status__in=statuses).first())


def _cold_interrupted(migration: Migration, reason: str) -> None:
    uuid = str(migration.instance_id)
    source = migration.source_host.name
    message = (f"{migration.migration_type} {migration.pk} {reason}. The server's disk is on {source} in "
               f"INSTANCES_PATH/{uuid} or INSTANCES_PATH/{uuid}{contract.RESIZE_DIR_SUFFIX}; an operator "
               "must check it before resetting the state")
    Instance.objects.filter(uuid=uuid, task_state__in=(
        TaskState.RESIZE_PREP, TaskState.RESIZE_MIGRATING, TaskState.RESIZE_FINISH)).change(
        task_state=None, vm_state=VmState.ERROR, fault={"message": message, "code": 500, "details": ""})
    _set(migration, status=S.ERROR, error=message, finished_at=timezone.now())
    _event(migration, "init_instance", "Error", message, host=source)
    _finish(migration, "Error", message)


def reap_stuck_migrations() -> int:
    """End migrations whose step did not report within MIGRATION_STEP_TIMEOUT (a running live
    migration: within its completion timeout plus that), from what the hosts last reported."""
    now = timezone.now()
    step = timedelta(seconds=settings.MIGRATION_STEP_TIMEOUT)
    reaped = 0
    stuck = Migration.objects.filter(status__in=(S.PREPARING, S.QUEUED, S.RUNNING, S.RUNNING_POSTCOPY,
                                                 S.CANCELLING, S.MIGRATING, S.POST_MIGRATING, S.CONFIRMING,
                                                 S.REVERTING), updated__lt=now - step)
    for migration in stuck.select_related("source_host", "dest_host"):
        if migration.status in (S.RUNNING, S.RUNNING_POSTCOPY, S.CANCELLING) and migration.started_at and \
                migration.started_at + timedelta(seconds=migration.completion_timeout or 0) + step > now:
            continue
        with transaction.atomic():
            locked = _locked(migration.pk, (migration.status,))
            if locked is None or locked.updated != migration.updated:
                continue
            _reap_migration(locked, f"{locked.migration_type} {locked.pk} got no report for "
                                    f"{settings.MIGRATION_STEP_TIMEOUT} s while {locked.status}")
            reaped += 1
    return reaped


def _reported(host: Host | None, uuid: str) -> str | None:
    if host is None or not host.is_up:
        return None
    return (host.reported_instances or {}).get(uuid)


def _reap_migration(migration: Migration, late: str) -> None:
    uuid = str(migration.instance_id)
    if migration.migration_type == MigrationType.LIVE:
        on_dest, on_source = _reported(migration.dest_host, uuid), _reported(migration.source_host, uuid)
        if migration.status in (S.PREPARING, S.QUEUED, S.CANCELLING, S.RUNNING) and on_source:
            _cast_abort(migration)
            _live_failed(migration, status=S.FAILED, values={"power_state": on_source},
                         error=f"{late}; the domain is still on {migration.source_host.name}: aborted")
            return
        if on_dest and not on_source:
            _event(migration, "migration_deadline", "Success",
                   f"{late}; {migration.dest_host.name} reports the domain {on_dest}")
            _live_completed(migration, values={"power_state": on_dest})
            return
        message = f"{late}; neither host reports the domain where expected"
        _instance(migration, TaskState.MIGRATING).change(
            task_state=None, vm_state=VmState.ERROR, fault={"message": message, "code": 500, "details": ""})
        _set(migration, status=S.ERROR, error=message, finished_at=timezone.now())
        _finish(migration, "Error", message)
        return
    if migration.status in (S.CONFIRMING,):
        _confirm_failed(migration, error=late)
        return
    _cold_interrupted(migration, late)
