"""A dead host: force-down, fencing, and evacuation (Nova's ``evacuate``).

A host that stops heartbeating may still run its guests (a network split, a hung worker). Its servers
may be rebuilt elsewhere only once it is **fenced**: forced down by an admin who knows it is off
(:func:`host_force_down`, Nova's ``PUT os-services`` ``forced_down``), or by HOST_FENCE_COMMAND (an
IPMI power-off, say) that exited 0 (:func:`host_fence`). A forced-down host is down whatever its
heartbeats say until an admin clears it.

Evacuating a server (:func:`server_evacuate`) rebuilds it on another host the scheduler's filters pick
(the dead host excluded): with its disk when the destination shares the dead host's instance storage
(both report the same ``storage_id``), else from its image, losing the root disk's data, which only
``allow_data_loss`` permits. In one transaction: the server enters ``rebuilding``, the migration
(type evacuation, status rebuilding) and its action are recorded, the destination is claimed (the
dead host's allocation is handed to the migration) and ``compute.rebuild_instance`` is sent on
commit. The destination's report (:mod:`cloudctl.compute.migration_reports`) lands the server there
(migration ``done``, the dead host's allocation released) or puts it in ERROR where it was (the
destination's claim released). When the dead host's worker starts again, its stale copy is removed
(:func:`evacuated_cleanup`, ``compute.destroy_evacuated``) and the migration is ``completed``.

The periodic task (:func:`hosts_fence_and_evacuate`, from beat) fences the dead hosts that hold
servers and, with AUTO_EVACUATE, evacuates the servers of the fenced ones as the system.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from cloudctl.compute import placement, states
from cloudctl.compute.errors import (
    EvacuationRefused,
    HostFenceFailed,
    HostNotFenced,
    HostUnavailable,
    InvalidRequest,
    ServerInvalidState,
)
from cloudctl.compute.migration_requests import Evacuation
from cloudctl.compute.migration_steps import migration_event, migration_save, step_ids, step_send
from cloudctl.compute.models import (
    MIGRATION_IN_PROGRESS,
    Host,
    Instance,
    InstanceAction,
    Migration,
    MigrationStatus,
    MigrationType,
)
from cloudctl.compute.services import action_start, finish_action, new_request_id, transition
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import TaskState, VmState
from cloudctl.compute.sync import system_action
from cloudctl.database import DATABASE_ERRORS
from cloudctl.images.models import ImageStatus
from compute_workers import contract
from compute_workers.contract import ActionResult
from scheduler.selection import NoValidHost

log = logging.getLogger(__name__)

FENCED_REASON = "fenced by HOST_FENCE_COMMAND"
SYSTEM_REQUEST_ID = "system"


def _requester(user: Any) -> str:
    return getattr(user, "username", "") or "the system"


# --- Force-down and fencing -----------------------------------------------------------------------

def host_force_down(*, host: Host, forced_down: bool, user: Any, reason: str = "") -> Host:
    """Nova's service force-down: ``forced_down`` True says the host is off (down whatever its
    heartbeats say; its servers may be evacuated); False clears it (the host is up again with its next
    heartbeat), with the fencing attempts' record."""
    if forced_down:
        Host.objects.filter(pk=host.pk).update(
            forced_down=True, forced_down_at=timezone.now(),
            forced_down_reason=(reason or f"forced down by {_requester(user)}")[:255])
    else:
        Host.objects.filter(pk=host.pk).update(forced_down=False, forced_down_at=None, forced_down_reason="",
                                               fence_attempted_at=None, fence_message="")
    log.warning("host %s: forced_down=%s by %s (%s)", host.name, forced_down, _requester(user), reason)
    host.refresh_from_db()
    return host


def fence_command(host_name: str) -> list[str]:
    """HOST_FENCE_COMMAND's argv for ``host_name`` (``{host}`` replaced in each argument); [] when unset."""
    return [arg.replace("{host}", host_name) for arg in shlex.split(settings.HOST_FENCE_COMMAND)]


def _run_fence_command(host: Host) -> tuple[bool, str]:
    """Run the command once, never through a shell, within HOST_FENCE_TIMEOUT: (exit 0, what it said)."""
    argv = fence_command(host.name)
    timeout = settings.HOST_FENCE_TIMEOUT
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"HOST_FENCE_COMMAND did not finish within {timeout:g} s (killed)"
    except OSError as exc:
        return False, f"HOST_FENCE_COMMAND could not run: {exc}"
    said = (done.stderr.strip() or done.stdout.strip())[-500:]
    if done.returncode != 0:
        return False, f"HOST_FENCE_COMMAND exited {done.returncode}" + (f": {said}" if said else "")
    return True, "HOST_FENCE_COMMAND exited 0" + (f": {said}" if said else "")


def _fence(host: Host) -> bool:
    """Run the fencing command on ``host`` and record the outcome on it: exit 0 forces it down."""
    ok, said = _run_fence_command(host)
    now = timezone.now()
    message = f"{now:%Y-%m-%d %H:%M:%S} UTC: {said}"
    if ok:
        Host.objects.filter(pk=host.pk).update(forced_down=True, forced_down_at=now,
                                               forced_down_reason=FENCED_REASON, fence_message=message)
        log.warning("host %s fenced: %s", host.name, said)
    else:
        Host.objects.filter(pk=host.pk).update(fence_message=f"{message} (fencing failed; retried)")
        log.error("fencing host %s failed: %s", host.name, said)
    host.refresh_from_db()
    return ok


def host_fence(*, host: Host, user: Any) -> Host:
    """Run HOST_FENCE_COMMAND on ``host`` now (admin). Refused (409) when no command is set or the host
    is up (heartbeating); a failure is recorded on the host and refused with what the command said."""
    if not settings.HOST_FENCE_COMMAND.strip():
        raise HostFenceFailed("HOST_FENCE_COMMAND is not set: fence the host by hand (power it off) and "
                              f'POST /api/v1/hosts/{host.name}/force-down/ {{"forced_down": true}}')
    if host.heartbeat_recent:
        raise HostFenceFailed(f"host {host.name} is up (last heartbeat {host.last_heartbeat:%H:%M:%S} UTC): "
                              "only a host that stopped heartbeating is fenced")
    Host.objects.filter(pk=host.pk).update(fence_attempted_at=timezone.now())
    log.warning("host %s: fencing requested by %s", host.name, _requester(user))
    if not _fence(host):
        raise HostFenceFailed(f"fencing host {host.name} failed: {host.fence_message}")
    return host


def _dead_hosts_to_fence() -> list[Host]:
    """Hosts that stopped heartbeating (not a clean stop: ``last_heartbeat`` is kept), not forced down,
    holding servers, whose last fencing attempt (if any) is older than HOST_FENCE_RETRY_INTERVAL."""
    now = timezone.now()
    retry = now - timedelta(seconds=settings.HOST_FENCE_RETRY_INTERVAL)
    silent = now - timedelta(seconds=settings.SERVICE_DOWN_TIME)
    with_servers = Instance.objects.exclude(vm_state=VmState.DELETED).values("host_id")
    return list(Host.objects.filter(Q(fence_attempted_at__isnull=True) | Q(fence_attempted_at__lt=retry),
                                    forced_down=False, last_heartbeat__lt=silent, pk__in=with_servers))


def hosts_fence_and_evacuate() -> dict[str, int]:
    """The periodic task: fence every dead host holding servers (once per attempt, even with two beat
    ticks running at once), then, with AUTO_EVACUATE, evacuate the servers of the fenced hosts."""
    fenced = 0
    if settings.HOST_FENCE_COMMAND.strip():
        for host in _dead_hosts_to_fence():
            previous = host.fence_attempted_at
            # The attempt is this run's only if nobody took it meanwhile (compare-and-swap).
            if not Host.objects.filter(pk=host.pk, forced_down=False, fence_attempted_at=previous).update(
                    fence_attempted_at=timezone.now()):
                continue
            fenced += _fence(host)
    evacuated = auto_evacuate() if settings.AUTO_EVACUATE else 0
    return {"fenced": fenced, "evacuated": evacuated}


# --- Evacuation -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Destination:
    name: str
    shared_storage: bool


def fencing_problem(host: Host) -> str:
    """Why the servers of ``host`` may not be rebuilt elsewhere now ("" when they may): it must be
    fenced — forced down (by an admin, or by a fencing command that succeeded) and silent since. An
    admin who powered a host off and forced it down need not wait SERVICE_DOWN_TIME (Nova does not
    either); but a heartbeat that arrives after the force-down proves its worker runs, so may its
    servers: refused until the host is really off."""
    seen = f"{host.last_heartbeat:%Y-%m-%d %H:%M:%S} UTC" if host.last_heartbeat else "never"
    if host.forced_down:
        if (host.last_heartbeat is not None and host.forced_down_at is not None
                and host.last_heartbeat > host.forced_down_at):
            return (f"host {host.name} is forced down but still heartbeats (last {seen}, forced down "
                    f"{host.forced_down_at:%Y-%m-%d %H:%M:%S} UTC): its compute worker runs, so may its "
                    "servers; power the host off first")
        return ""
    if host.heartbeat_recent:
        return (f"host {host.name} is up (last heartbeat {seen}); evacuate only rebuilds the servers of a "
                "dead host (live-migrate or migrate them)")
    return (f"host {host.name} is down but not fenced, so its servers may still run there; fence it: "
            f"power it off and POST /api/v1/hosts/{host.name}/force-down/ {{\"forced_down\": true}}, or "
            f"POST /api/v1/hosts/{host.name}/fence/ (HOST_FENCE_COMMAND)")


def require_fenced(instance: Instance) -> Host:
    """The server's host, if its servers may be rebuilt elsewhere (see :func:`fencing_problem`)."""
    host = instance.host
    if host is None:
        raise HostUnavailable(instance, f"cannot evacuate server {instance.uuid}: it is on no host")
    problem = fencing_problem(host)
    if problem:
        raise HostUnavailable(instance, f"cannot evacuate server {instance.uuid}: {problem}")
    return host


def _require_evacuable(instance: Instance) -> None:
    """409 for a migration in progress (it ends first: the reaper ends one whose host died after
    MIGRATION_STEP_TIMEOUT) or a state evacuate does not start from."""
    moving = (Migration.objects.filter(instance=instance, status__in=MIGRATION_IN_PROGRESS)
              .order_by("-id").first())
    if moving is not None:
        if moving.migration_type == MigrationType.EVACUATION:
            raise EvacuationRefused(instance, f"server {instance.uuid} is being evacuated already "
                                              f"(migration {moving.pk}, {moving.status})")
        raise EvacuationRefused(instance, f"server {instance.uuid} has a {moving.migration_type} in progress "
                                          f"(migration {moving.pk}, {moving.status}): it must end first (the "
                                          "reaper ends it MIGRATION_STEP_TIMEOUT after its last report, or "
                                          "abort it)")
    rule = states.EVACUATE
    if instance.vm_state not in rule.from_vm_states or instance.task_state not in rule.from_task_states:
        raise EvacuationRefused(instance, f"cannot evacuate server {instance.uuid} while "
                                          f"vm_state={instance.vm_state} task_state={instance.task_state}")


def _image_usable(instance: Instance) -> bool:
    image = instance.image
    return image is not None and image.status == ImageStatus.ACTIVE


def _destinations(instance: Instance, source: Host, named: str | None,
                  allow_data_loss: bool) -> tuple[list[Destination], Any]:
    """The hosts to try, best first (sharing the dead host's storage first), and the request they
    were chosen for (the claim re-checks it). Raises EvacuationRefused with the reason."""
    if named is not None:
        if named == source.name:
            raise InvalidRequest("host", f"the server is on host {named}, the one that died")
        if not Host.objects.filter(name=named).exists():
            raise InvalidRequest("host", f"no host {named!r}")
    if instance.image is None:
        raise EvacuationRefused(instance, f"server {instance.uuid} has no image record left: it cannot be "
                                          "rebuilt anywhere")
    spec = replace(placement.request_spec_of(instance), ignore_hosts=(source.name,), force_host=named or "")
    try:
        chosen = [h.name for h in placement.candidate_hosts(spec, subset_size=1)]
    except NoValidHost as no_host:
        raise EvacuationRefused(instance,
                                f"no host can take server {instance.uuid}: {no_host.message}") from None
    storage = dict(Host.objects.filter(name__in=chosen).values_list("name", "storage_id"))
    shared = [name for name in chosen if source.storage_id and storage.get(name) == source.storage_id]
    others = [name for name in chosen if name not in shared]
    where = (f"host {named}" if named else f"any of the {len(chosen)} host(s) that can take it "
                                           f"({', '.join(chosen)})")
    storage_of = f"storage_id {source.storage_id}" if source.storage_id else "it reports no storage_id"
    private = (f"the root disk is on {source.name}'s private storage ({storage_of}), which {where} "
               "does not share")
    if not shared and not allow_data_loss:
        raise EvacuationRefused(instance, f"{private}: rebuilding the server there recreates its root disk "
                                          f"from image {instance.image.name} and its data is lost; pass "
                                          '"allow_data_loss": true to accept that')
    if not _image_usable(instance):
        if not shared:
            raise EvacuationRefused(instance, f"{private}, and the server's image {instance.image.name} is "
                                              f"{instance.image.status}: its root disk cannot be rebuilt")
        others = []
    found = [Destination(name, True) for name in shared]
    if allow_data_loss:
        found += [Destination(name, False) for name in others]
    return found, spec


def _end_interrupted(instance: Instance, source: Host, task: str | None) -> None:
    """A task the host's death interrupted is over: its running action (and its open steps) end in
    error, saying so."""
    message = (f"interrupted: host {source.name} died during {task}" if task
               else f"interrupted: host {source.name} died")
    for action in InstanceAction.objects.filter(instance=instance, finish_time__isnull=True):
        action.events.filter(finish_time__isnull=True).update(finish_time=timezone.now(),
                                                              result=ActionResult.ERROR, message=message)
        finish_action(action, result=ActionResult.ERROR, message=f"{message}; the server is evacuated")


def server_evacuate(*, instance: Instance, user: Any, host: str | None = None, allow_data_loss: bool = False,
                    request_id: str | None = None) -> Migration:
    """Rebuild a server of a dead, fenced host on another host (admin; Nova's evacuate). See the
    module's docstring. Refused with 409 and the reason (:class:`HostUnavailable`,
    :class:`EvacuationRefused`), 400 for a named host that does not exist or is the dead one."""
    if not isinstance(allow_data_loss, bool):
        raise InvalidRequest("allow_data_loss", "must be true or false")
    source = require_fenced(instance)
    _require_evacuable(instance)
    destinations, spec = _destinations(instance, source, host, allow_data_loss)
    power_on = instance.vm_state != VmState.STOPPED
    uuid = str(instance.uuid)
    try:
        with transaction.atomic():
            task = instance.task_state
            transition(instance, states.EVACUATE)
            _end_interrupted(instance, source, task)
            action = action_start(instance=instance, action=states.EVACUATE.action, user=user,
                                  request_id=request_id or new_request_id())
            migration = Migration.objects.create(
                instance=instance, migration_type=MigrationType.EVACUATION,
                status=MigrationStatus.REBUILDING, source_host=source, old_flavor=instance.flavor,
                new_flavor=instance.flavor, action=action, user=user if getattr(user, "pk", None) else None,
                power_on=power_on, started_at=timezone.now())
            dest, shared = _claim(instance, migration, destinations, spec)
            migration_save(migration, dest_host=dest, shared_storage=shared)
            image = instance.image.name if instance.image else "?"
            how = ("on shared storage: its disk is kept" if shared
                   else f"from image {image}: the root disk's data is lost")
            migration_event(migration, "evacuate", "Start",
                            f"{source.name} (down, {source.forced_down_reason}) -> {dest.name}, {how}",
                            host=dest.name)
            step_send(dest, contract.COMPUTE_REBUILD_INSTANCE, **step_ids(migration),
                      spec=spawn_spec(instance, dest.name), on_shared_storage=shared,
                      power_on=power_on)
    except Exception:
        instance.refresh_from_db()
        raise
    log.warning("evacuating %s from %s to %s (migration %s, shared storage %s)", uuid, source.name,
                migration.dest_host, migration.pk, migration.shared_storage)
    return migration


def _claim(instance: Instance, migration: Migration, destinations: list[Destination],
           spec: Any) -> tuple[Host, bool]:
    """Within the transaction: the first destination whose claim holds (the dead host's allocation is
    handed to the migration), and whether it shares the dead host's storage. EvacuationRefused when
    every one lost its room meanwhile."""
    for destination in destinations:
        if placement.claim_move(str(instance.uuid), destination.name, spec, migration.pk):
            return Host.objects.get(name=destination.name), destination.shared_storage
    raise EvacuationRefused(instance, f"no host can take server {instance.uuid}: "
                                      f"{', '.join(d.name for d in destinations)} no longer had room "
                                      "(claimed concurrently); try again")


# A server refused with its reason, nothing changed: a host evacuation reports it and goes on.
REFUSED = (EvacuationRefused, HostUnavailable, ServerInvalidState, InvalidRequest)


def host_evacuate_servers(*, host: Host, user: Any, allow_data_loss: bool = False,
                          request_id: str | None = None) -> list[Evacuation]:
    """Evacuate every server of a dead, fenced host, each through :func:`server_evacuate`: per server
    its migration, or why it stays (the others go on). 409 (:class:`HostNotFenced`) when the host
    may not be evacuated at all."""
    if not isinstance(allow_data_loss, bool):
        raise InvalidRequest("allow_data_loss", "must be true or false")
    problem = fencing_problem(host)
    if problem:
        raise HostNotFenced(f"cannot evacuate host {host.name}: {problem}")
    results: list[Evacuation] = []
    servers = (Instance.objects.filter(host=host).exclude(vm_state=VmState.DELETED)
               .select_related("host", "image", "flavor", "project", "server_group").order_by("created"))
    for server in servers:
        try:
            migration = server_evacuate(instance=server, user=user, allow_data_loss=allow_data_loss,
                                        request_id=request_id)
        except REFUSED as refused:
            results.append(Evacuation(server, None, str(refused)))
        else:
            results.append(Evacuation(server, migration))
    return results


def auto_evacuate() -> int:
    """AUTO_EVACUATE: evacuate the servers of every fenced, silent host as the system (request id
    "system", AUTO_EVACUATE_ALLOW_DATA_LOSS). A server it cannot move gets one event saying why (again
    only when the reason changes); one whose evacuation failed since the host was fenced is left to
    an admin (evacuate it again by hand), never retried in a loop. Returns how many were accepted."""
    accepted = 0
    with_servers = Instance.objects.exclude(vm_state=VmState.DELETED).values("host_id")
    for host in Host.objects.filter(forced_down=True, pk__in=with_servers):
        if fencing_problem(host):
            continue
        since = host.forced_down_at or timezone.now()
        servers = (Instance.objects.filter(host=host).exclude(vm_state=VmState.DELETED)
                   .exclude(task_state=TaskState.REBUILDING)
                   .select_related("host", "image", "flavor", "project", "server_group").order_by("created"))
        for server in servers:
            if Migration.objects.filter(instance=server, migration_type=MigrationType.EVACUATION,
                                        source_host=host, status=MigrationStatus.ERROR,
                                        created__gte=since).exists():
                continue
            try:
                server_evacuate(instance=server, user=None, request_id=SYSTEM_REQUEST_ID,
                                allow_data_loss=settings.AUTO_EVACUATE_ALLOW_DATA_LOSS)
            except REFUSED as refused:
                _say_once(server, str(refused), since)
            except DATABASE_ERRORS:
                raise
            except Exception:  # one server must not keep the others on a dead host
                log.exception("auto-evacuating %s from %s failed", server.uuid, host.name)
            else:
                accepted += 1
    return accepted


def _say_once(server: Instance, reason: str, since: Any) -> None:
    message = f"AUTO_EVACUATE could not move the server: {reason}"
    said = InstanceAction.objects.filter(instance=server, action=states.EVACUATE.action,
                                         request_id=SYSTEM_REQUEST_ID, message=message, start_time__gte=since)
    if not said.exists():
        system_action(server, states.EVACUATE.action, result=ActionResult.ERROR, message=message,
                       event="auto_evacuate")
        log.warning("auto-evacuation of %s: %s", server.uuid, reason)


# --- The dead host comes back ---------------------------------------------------------------------

def evacuated_cleanup(*, host: Host) -> int:
    """The worker of ``host`` started: every server evacuated away from it whose stale copy is still
    to remove (migration ``done``) gets ``compute.destroy_evacuated`` (its disk kept when it was on
    shared storage: the new host's now); the report completes the migration. Returns how many."""
    done = Migration.objects.filter(source_host=host, migration_type=MigrationType.EVACUATION,
                                    status=MigrationStatus.DONE).select_related("source_host")
    sent = 0
    for migration in done:
        step_send(host, contract.COMPUTE_DESTROY_EVACUATED, **step_ids(migration),
                  keep_disks=bool(migration.shared_storage))
        log.warning("host %s is back: removing its stale copy of evacuated server %s (migration %s)",
                    host.name, migration.instance_id, migration.pk)
        sent += 1
    return sent
