"""Moving servers between hosts, as requested: live migration and cold migration (admin), resize
(owner), confirm or revert a resize, abort or force-complete a live migration, empty a host.

The control plane orchestrates, the hosts do the work (see the migration part of
``compute_workers/contract.py``). A request is answered at once, without asking any host: what can
be judged here is (the input, the source host up, the server idle: 400 or 409), then in one
transaction the server enters its task state and the migration is recorded ``checking``. The
pre-flight checks (the scheduler's filters, the destination's and the source's checks, the claim)
run in the scheduler's worker (:mod:`cloudctl.compute.migration_preflight`), which starts the
migration or ends it ``refused`` with the server as it was; each step's report then sends the next
(:mod:`cloudctl.compute.migration_reports`). The record points at the destination only once the
destination says the domain runs there.

While a migration runs, the server holds resources on both hosts: its source allocation belongs to
the migration until the move is confirmed (or the allocation is given back to the server when the
move fails or is reverted).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cloudctl.compute import quota_usage, states
from cloudctl.compute.conductor import record_event
from cloudctl.compute.errors import (
    ComputeUnavailable,
    HostUnavailable,
    InvalidRequest,
    MigrationInvalidState,
    ServerInvalidState,
)
from cloudctl.compute.migration_batches import batch_advance, migration_locked, preflight_send
from cloudctl.compute.migration_preflight import RULES
from cloudctl.compute.migration_steps import (
    abort_send,
    confirm_send,
    instance_in_task,
    migration_event,
    migration_finish,
    migration_save,
    revert_send,
    step_ids,
    step_send,
)
from cloudctl.compute.models import (
    Flavor,
    Host,
    Instance,
    InstanceAction,
    InstanceActionEvent,
    Migration,
    MigrationType,
)
from cloudctl.compute.models import MigrationStatus as S
from cloudctl.compute.services import (
    action_start,
    host_set_enabled,
    new_request_id,
    require_host_up,
    transition,
)
from cloudctl.compute.states import VmState
from compute_workers import contract
from compute_workers.contract import ActionResult

# A request refused with its reason, nothing changed: a batch (admin action, host evacuation) reports it
# for that server and goes on with the next.
REFUSED = (ServerInvalidState, HostUnavailable, InvalidRequest, ComputeUnavailable)


@dataclass(frozen=True)
class Batch:
    """The migrations of one host evacuation: at most ``limit`` of them checked and moving at once."""

    id: str
    limit: int


@dataclass(frozen=True)
class Evacuation:
    """One server of :func:`host_live_migrate_servers`: its migration, or why it stays."""

    server: Instance
    migration: Migration | None
    refused: str = ""

    @property
    def accepted(self) -> bool:
        return self.migration is not None


@dataclass(frozen=True)
class HostEvacuation:
    """What :func:`host_live_migrate_servers` accepted: per server, in one throttled batch."""

    batch: str
    max_servers: int
    servers: list[Evacuation]


def _requester(user: Any) -> str:
    """Who asked, for an event's or a disable reason's text."""
    return getattr(user, "username", "") or "the system"


def _check_block_migration(block_migration: Any) -> None:
    if block_migration not in ("auto", True, False):
        raise InvalidRequest("block_migration", 'must be "auto", true or false')


def server_live_migrate(*, instance: Instance, user: Any, host: str | None = None,
                        block_migration: bool | str = "auto", request_id: str | None = None,
                        batch: Batch | None = None) -> Migration:
    """Live-migrate a running (or paused) server to ``host`` or to a host the scheduler picks.

    ``block_migration`` "auto" copies the disk only when the two hosts do not share the instance
    storage (detected by the hosts, never assumed); True insists on copying it, False on sharing.
    Accepted at once (``checking``, or ``accepted`` waiting in an evacuation's ``batch``); the
    pre-flight checks decide the destination or refuse it later.
    """
    _check_block_migration(block_migration)
    require_host_up(instance, "live-migrate")
    _require_idle(instance, states.LIVE_MIGRATE)
    return _begin(instance=instance, user=user, rule=states.LIVE_MIGRATE, kind=MigrationType.LIVE,
                  host=host, flavor=instance.flavor, request_id=request_id, same_host=False,
                  block_migration=None if block_migration == "auto" else bool(block_migration), batch=batch)


def host_live_migrate_servers(*, host: Host, user: Any, block_migration: bool | str = "auto",
                              max_servers: int | None = None) -> HostEvacuation:
    """Empty a host for maintenance (Nova's host-evacuate-live): disable it first, so that nothing is
    scheduled onto it meanwhile (an operator's reason is kept), then accept a live migration of each of
    its servers to a host the scheduler picks, each through :func:`server_live_migrate`. A server
    refused at once (stopped: cold-migrate it; in a task) is reported with the reason and the others
    go on. Throttled: only ``max_servers`` (default EVACUATION_MAX_SERVERS) of the batch are checked
    and moved at once; the others wait in ``accepted`` until one ends."""
    _check_block_migration(block_migration)
    if max_servers is None:
        max_servers = settings.EVACUATION_MAX_SERVERS
    if isinstance(max_servers, bool) or not isinstance(max_servers, int) or max_servers < 1:
        raise InvalidRequest("max_servers", "must be a positive integer")
    if host.enabled:
        host_set_enabled(host=host, enabled=False, reason=f"live-migrating its servers away (requested by "
                                                          f"{_requester(user)})")
    batch = Batch(str(uuid.uuid4()), max_servers)
    results = []
    servers = (Instance.objects.filter(host=host).exclude(vm_state=VmState.DELETED)
               .select_related("host").order_by("created"))
    for server in servers:
        try:
            migration = server_live_migrate(instance=server, user=user, host=None,
                                            block_migration=block_migration, batch=batch)
        except REFUSED as refused:
            results.append(Evacuation(server, None, str(refused)))
        else:
            results.append(Evacuation(server, migration))
    # Every migration of the batch exists before the first checks run: an early end finds the
    # waiting ones it must start.
    with transaction.atomic():
        started = set(batch_advance(batch.id))
    for result in results:
        if result.migration is not None and result.migration.pk in started:
            result.migration.status = S.CHECKING
    return HostEvacuation(batch.id, max_servers, results)


def server_migrate(*, instance: Instance, user: Any, host: str | None = None,
                   request_id: str | None = None) -> Migration:
    """Cold-migrate a server: stop it, copy its disk to another host, start it there (if it ran)."""
    require_host_up(instance, "migrate")
    _require_idle(instance, states.COLD_MIGRATE)
    return _begin(instance=instance, user=user, rule=states.COLD_MIGRATE, kind=MigrationType.COLD,
                  host=host, flavor=instance.flavor, request_id=request_id, same_host=False)


def server_resize(*, instance: Instance, user: Any, flavor: Flavor,
                  request_id: str | None = None) -> Migration:
    """Resize a server to ``flavor``: a cold migration that may stay on its host; it ends in
    VERIFY_RESIZE with the old disk kept until the resize is confirmed or reverted."""
    require_host_up(instance, "resize")
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
    with transaction.atomic():
        # The new flavor's cores and RAM above the old ones, counted in the resize's transaction;
        # from here until it is confirmed or reverted the server counts its larger flavor.
        quota_usage.enforce_resize(instance=instance, flavor=flavor)
        return _begin(instance=instance, user=user, rule=states.RESIZE, kind=MigrationType.RESIZE,
                      host=None, flavor=flavor, request_id=request_id,
                      same_host=settings.ALLOW_RESIZE_TO_SAME_HOST)


def _require_idle(instance: Instance, rule: states.Transition) -> None:
    """Refuse early (409) what the transition would refuse."""
    if instance.vm_state not in rule.from_vm_states or instance.task_state not in rule.from_task_states:
        raise ServerInvalidState(instance, rule.action)


def _named_host(instance: Instance, host: str | None, same_host: bool) -> Host | None:
    """The destination an admin named (400 if there is none or it is the source when that is not
    allowed); the scheduler's filters still judge it in the pre-flight checks."""
    if not host:
        return None
    found = Host.objects.filter(name=host).first()
    if found is None:
        raise InvalidRequest("host", f"no host {host!r}")
    if found.pk == instance.host_id and not same_host:
        raise InvalidRequest("host", f"the server already runs on host {host}")
    return found


def _begin(*, instance: Instance, user: Any, rule: states.Transition, kind: str, host: str | None,
           flavor: Flavor, request_id: str | None, same_host: bool, block_migration: bool | None = None,
           batch: Batch | None = None) -> Migration:
    """In one transaction: the state transition (the loser of a race gets 409), the action, the
    migration record (``checking``, its checks sent on commit; or ``accepted`` in an evacuation's
    batch, which sends the checks in turn). Nothing is claimed or asked of any host yet."""
    dest = _named_host(instance, host, same_host)
    with transaction.atomic():
        transition(instance, rule)
        action = action_start(instance=instance, action=rule.action, user=user,
                              request_id=request_id or new_request_id())
        migration = Migration.objects.create(
            instance=instance, migration_type=kind, source_host=instance.host, dest_host=dest,
            old_flavor=instance.flavor, new_flavor=flavor, action=action,
            user=user if getattr(user, "pk", None) else None, block_migration=block_migration,
            status=S.ACCEPTED if batch else S.CHECKING, batch=batch.id if batch else "",
            batch_limit=batch.limit if batch else None)
        if batch is None:
            preflight_send(migration.pk)
    return migration


def migration_abort(*, migration: Migration, user: Any) -> Migration:
    """Abort a migration not started yet (waiting in its batch, or being checked: it ends cancelled
    at once, the server idle as it was), or a live migration in progress (the server stays on its
    source, running)."""
    with transaction.atomic():
        locked = migration_locked(migration.pk)
        if locked is None:
            raise Migration.DoesNotExist(f"migration {migration.pk} is gone")
        if locked.status in (S.ACCEPTED, S.CHECKING):
            _cancel_unstarted(locked, user)
            return locked
        if locked.migration_type != MigrationType.LIVE:
            raise MigrationInvalidState(locked, f"migration {locked.pk} is a {locked.migration_type}: only "
                                                "live migrations can be aborted once started")
        if locked.status == S.RUNNING_POSTCOPY:
            raise MigrationInvalidState(locked, f"migration {locked.pk} is {locked.status}: the guest "
                                                f"already runs on {locked.dest_host.name} and fetches "
                                                "the rest of its memory from the source; it can no "
                                                "longer be aborted")
        if locked.status not in (S.PREPARING, S.QUEUED, S.RUNNING):
            raise MigrationInvalidState(locked, f"migration {locked.pk} is {locked.status}: it can be "
                                                "aborted while accepted, checking, preparing, queued or "
                                                "running")
        locked.status = S.CANCELLING
        locked.save(update_fields=["status", "updated"])
        record_event(str(locked.instance_id), event="abort_live_migration", result="Start",
                     host=locked.source_host.name if locked.source_host else "",
                     message=f"abort requested by {_requester(user)}",
                     action_id=locked.action_id)
        abort_send(locked)
    return locked


def _cancel_unstarted(migration: Migration, user: Any) -> None:
    """Nothing was claimed or sent to a host: the migration ends cancelled, the server goes back to
    idle (its vm_state never changed). A pre-flight task still running finds it no longer checking."""
    message = f"aborted on request by {_requester(user)} while {migration.status}, before it started"
    task = RULES[migration.migration_type].to_task_state
    instance_in_task(migration, task).filter(host_id=migration.source_host_id).change(task_state=None)
    migration_save(migration, status=S.CANCELLED, error=message, finished_at=timezone.now())
    migration_event(migration, "abort_migration", ActionResult.SUCCESS, message)
    migration_finish(migration, ActionResult.ERROR, f"{migration.migration_type} cancelled: {message}")


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
                   .exclude(result=ActionResult.ERROR).order_by("-id").first())
        if earlier is not None:
            state = ("switched over" if earlier.result == ActionResult.SUCCESS
                     else "already waiting for libvirt to take its switch-over")
            raise MigrationInvalidState(locked, f"migration {locked.pk} is {state} (force-complete requested "
                                                f"at {earlier.start_time:%H:%M:%S} UTC): "
                                                f"{earlier.message or 'sent to the source'}")
        # Opened under the name the source's report closes it with: one row from request to switch-over.
        record_event(str(locked.instance_id), event=contract.FORCE_COMPLETE_EVENT, result="Start",
                     host=locked.source_host.name if locked.source_host else "",
                     message=f"requested by {_requester(user)}",
                     action_id=locked.action_id)
        step_send(locked.source_host, contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE, **step_ids(locked))
    return locked


def _resize_migration(instance: Instance) -> Migration:
    migration = (Migration.objects.filter(instance=instance, status=S.FINISHED,
                                          migration_type=MigrationType.RESIZE)
                 .select_related("source_host", "dest_host", "old_flavor", "new_flavor").first())
    if migration is None:
        raise ServerInvalidState(instance, "confirm or revert the resize of")
    return migration


def server_confirm_resize(*, instance: Instance, user: Any, request_id: str | None = None) -> Migration:
    """Keep the new flavor: the source's copy and resources are freed."""
    return _resize_decision(instance, user, states.CONFIRM_RESIZE, request_id, confirm_send, "source")


def server_revert_resize(*, instance: Instance, user: Any, request_id: str | None = None) -> Migration:
    """Go back to the old flavor on the old host, with the disk as it was before the resize."""
    return _resize_decision(instance, user, states.REVERT_RESIZE, request_id, revert_send, "dest")


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
