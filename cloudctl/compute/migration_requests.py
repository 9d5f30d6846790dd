"""Moving servers between hosts, as requested: live migration and cold migration (admin), resize
(owner), confirm or revert a resize, abort or force-complete a live migration, empty a host.

The control plane orchestrates, the hosts do the work (see the migration part of
``compute_workers/contract.py``). A request is checked up front, before anything changes: the
scheduler's filters (through :mod:`cloudctl.compute.placement`, as a new server's placement), the
destination's and the source's pre-flight checks (CPU, image, storage, disk space), and the claim on
the destination. Only then does the server enter its task state and the first step go to a host;
each step's report then sends the next (:mod:`cloudctl.compute.migration_reports`). The record
points at the destination only once the destination says the domain runs there.

While a migration runs, the server holds resources on both hosts: its source allocation belongs to
the migration until the move is confirmed (or the allocation is given back to the server when the
move fails or is reverted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cloudctl.compute import placement, rpc, states
from cloudctl.compute.conductor import record_event
from cloudctl.compute.errors import (
    ComputeUnavailable,
    HostUnavailable,
    InvalidRequest,
    MigrationCheckFailed,
    MigrationInvalidState,
    ServerInvalidState,
)
from cloudctl.compute.migration_steps import abort_send, confirm_send, revert_send, step_ids, step_send
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
    GIB,
    action_start,
    host_set_enabled,
    new_request_id,
    require_host_up,
    transition,
)
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import VmState
from compute_workers import contract
from compute_workers.contract import ActionResult
from scheduler.host_state import RequestSpec
from scheduler.selection import NoValidHost

# A request refused with its reason, nothing changed: a batch (admin action, host evacuation) reports it
# for that server and goes on with the next.
REFUSED = (ServerInvalidState, HostUnavailable, InvalidRequest, ComputeUnavailable,
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


def server_live_migrate(*, instance: Instance, user: Any, host: str | None = None,
                        block_migration: bool | str = "auto",
                        request_id: str | None = None) -> Migration:
    """Live-migrate a running (or paused) server to ``host`` or to a host the scheduler picks.

    ``block_migration`` "auto" copies the disk only when the two hosts do not share the instance
    storage (detected by the hosts, never assumed); True insists on copying it, False on sharing.
    """
    _check_block_migration(block_migration)
    source = require_host_up(instance, "live-migrate")
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
    require_host_up(instance, "migrate")
    _require_idle(instance, states.COLD_MIGRATE)
    return _begin_cold(instance=instance, user=user, rule=states.COLD_MIGRATE, kind=MigrationType.COLD,
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
        raise ServerInvalidState(instance, rule.action)


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
                lost = MigrationCheckFailed(instance, "resources",
                                            f"host {dest.name} no longer has room for flavor "
                                            f"{flavor.name} (claimed concurrently)")
                transaction.set_rollback(True)
                failures.append(str(lost))
                last = lost
                instance.refresh_from_db()
                continue
            now = timezone.now()
            action.events.create(event="preflight_checks", result=ActionResult.SUCCESS, host=dest.name,
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
    except ComputeUnavailable as exc:
        raise MigrationCheckFailed(instance, "destination", str(exc)) from None
    if not answer.get("ok"):
        raise MigrationCheckFailed(instance, str(answer.get("check") or "destination"),
                                   f"destination {dest.name}: {answer.get('message', 'refused')}")
    try:
        source_answer = rpc.call(source.name, contract.COMPUTE_CHECK_MIGRATE_SOURCE, timeout=timeout,
                                 instance_uuid=str(instance.uuid),
                                 shared_marker=answer.get("shared_marker") or "")
    except ComputeUnavailable as exc:
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
        abort_send(locked)
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
