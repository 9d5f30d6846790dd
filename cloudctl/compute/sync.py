"""Reality wins: the hypervisor's word against the database, and what to do when they disagree.

Two sources feed this module, both through the conductor:

* ``power_state_update`` from libvirt lifecycle events, seconds after a guest changes state;
* the heartbeat's list of domains, every few seconds (the periodic sync, and the builds and deletes
  whose report was lost: :func:`complete_builds`, :func:`complete_deletes`).

Rules follow Nova's ``_sync_instance_power_state``: instances with a task in flight are left to it,
and a guest the user did not ask to start is never started. What a compute worker's restart
interrupted, and tasks past their deadline, are :mod:`cloudctl.compute.recovery`'s.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cloudctl.compute import conductor, ports, rpc
from cloudctl.compute.models import Allocation, Host, Instance, InstanceAction
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import VM_STATE_FOR_POWER_STATE, PowerState, TaskState, VmState
from compute_workers import contract
from compute_workers.contract import ActionResult

log = logging.getLogger(__name__)


def system_action(instance: Instance, action: str, *, result: str, message: str,
                   event: str) -> InstanceAction:
    """Record what cloudctl did on its own (no user asked), finished at once."""
    now = timezone.now()
    record = InstanceAction.objects.create(instance=instance, action=action, request_id="system",
                                           project=instance.project, finish_time=now,
                                           result=result, message=message)
    record.events.create(event=event, result=result, message=message,
                         host=instance.host.name if instance.host else "", start_time=now,
                         finish_time=now)
    return record


def sync_power_state(instance: Instance, power_state: str, observed_at: datetime) -> bool:
    """Apply one observation of a domain's power state. Returns True when anything changed.

    Skipped when the observation predates the instance's last change (it may describe a moment
    before a reboot finished) or when a task is in flight (the task reports the outcome itself).
    """
    if instance.vm_state in (VmState.BUILDING, VmState.DELETED) or instance.task_state is not None:
        return False
    if observed_at <= instance.updated:
        return False
    if power_state not in PowerState.values:
        log.warning("ignoring unknown power state %r for %s", power_state, instance.uuid)
        return False
    changes: dict[str, Any] = {}
    if instance.power_state != power_state:
        changes["power_state"] = power_state
    truth = VM_STATE_FOR_POWER_STATE[PowerState(power_state)]
    message = ""
    if power_state == PowerState.NOSTATE and _adopt_from_elsewhere(instance):
        return True
    if instance.vm_state == VmState.RESIZED:
        pass  # VERIFY_RESIZE waits for confirm or revert whatever the guest does: power state only
    elif instance.vm_state == VmState.STOPPED and power_state == PowerState.RUNNING:
        # Nova's rule: the server is stopped, so a running domain (started behind cloudctl's back)
        # is stopped again; cloudctl never leaves running what the user stopped.
        _stop_unexpected_domain(instance)
    elif instance.vm_state != truth and instance.vm_state != VmState.ERROR:
        changes["vm_state"] = truth
        message = (f"the hypervisor reports the domain {power_state} while the server was "
                   f"{instance.vm_state}; the server is now {truth}")
        if truth == VmState.ERROR:
            changes["fault"] = {"message": f"the domain of this server no longer exists on host "
                                           f"{instance.host.name if instance.host else '?'}",
                                "code": 500, "details": ""}
    if not changes:
        return False
    with transaction.atomic():
        updated = Instance.objects.filter(uuid=instance.uuid, task_state__isnull=True,
                                          vm_state=instance.vm_state,
                                          updated=instance.updated).change(**changes)
        if updated:
            ports.server_ports_follow(instance.uuid, changes.get("vm_state"))
        if updated and message:
            log.info("sync %s: %s", instance.uuid, message)
            system_action(instance, "sync_power_state", result=ActionResult.SUCCESS, message=message,
                           event="sync_power_state")
    return bool(updated)


def _adopt_from_elsewhere(instance: Instance) -> bool:
    """The domain is gone from the server's host but another host that is up reports it (a live
    migration that libvirt finished after its worker died, for example): reality wins, the record
    and the claim move there. Not to a host that joined and awaits an admin's trust: a stranger's
    heartbeat listing a server's uuid must not take the server."""
    uuid = str(instance.uuid)
    found = [host for host in Host.objects.filter(reported_instances__has_key=uuid).exclude(
        pk=instance.host_id) if host.is_up and not host.awaiting_trust]
    if len(found) != 1:
        return False
    host = found[0]
    power_state = host.reported_instances[uuid]
    truth = VM_STATE_FOR_POWER_STATE.get(power_state, VmState.ERROR)
    message = (f"the domain is no longer on {instance.host.name if instance.host else 'any host'} but "
               f"{host.name} reports it {power_state}: the server is on {host.name} now")
    with transaction.atomic():
        if not Instance.objects.filter(uuid=uuid, task_state__isnull=True, updated=instance.updated).change(
                host=host, availability_zone=host.zone, power_state=power_state, vm_state=truth):
            return False
        ports.server_ports_move(uuid, host.name)
        ports.server_ports_follow(uuid, truth)
        Allocation.objects.filter(instance_id=uuid).delete()
        Allocation.objects.create(instance_id=uuid, host=host, vcpus=instance.vcpus,
                                  memory_mb=instance.memory_mb, disk_gb=instance.root_gb)
        instance.host = host
        system_action(instance, "sync_power_state", result=ActionResult.SUCCESS, message=message,
                       event="domain_found_elsewhere")
    log.warning("sync %s: %s", uuid, message)
    return True


def _stop_unexpected_domain(instance: Instance) -> None:
    if instance.host is None:
        return
    with transaction.atomic():
        moved = Instance.objects.filter(uuid=instance.uuid, task_state__isnull=True,
                                        vm_state=VmState.STOPPED).change(
            task_state=TaskState.POWERING_OFF)
        if not moved:
            return
        action = InstanceAction.objects.create(
            instance=instance, action="stop", request_id="system", project=instance.project,
            message="the domain was running while the server is stopped; powering it off")
        host, kwargs = instance.host.name, {"instance_uuid": str(instance.uuid),
                                            "action_id": action.pk,
                                            "timeout": settings.CLEAN_SHUTDOWN_TIMEOUT}
        transaction.on_commit(lambda: rpc.cast(host, contract.COMPUTE_POWER_OFF, **kwargs))


def _observed(epoch: float | None) -> datetime:
    if epoch is None:
        return timezone.now()
    return datetime.fromtimestamp(float(epoch), tz=UTC)


def power_state_update(*, host: str, instance_uuid: str, power_state: str,
                       observed_at: float | None) -> bool:
    instance = (Instance.objects.select_related("host", "project")
                .filter(uuid=instance_uuid, host__name=host).first())
    if instance is None:
        return False
    return sync_power_state(instance, power_state, _observed(observed_at))


def sync_host(host: Host, reported: dict[str, str], observed_at: datetime) -> int:
    """The periodic sync: every idle server on ``host`` against the domains it reported."""
    changed = 0
    servers = (Instance.objects.select_related("host", "project")
               .filter(host=host, task_state__isnull=True)
               .exclude(vm_state__in=[VmState.BUILDING, VmState.DELETED]))
    for instance in servers:
        power_state = reported.get(str(instance.uuid), PowerState.NOSTATE)
        changed += sync_power_state(instance, power_state, observed_at)
    return changed


BUILD_COMPLETED_FROM_HEARTBEAT = "completed from the host's heartbeat: the spawn report was lost"


def complete_builds(host: Host, reported: dict[str, str], observed_at: datetime,
                    busy: Collection[str] = ()) -> int:
    """Ask the host what is true instead of waiting out INSTANCE_BUILD_TIMEOUT: a server spawning on
    ``host`` for longer than BUILD_REPORT_GRACE, whose domain the heartbeat (observed after the build
    started) lists running and on which no operation runs there any more (``busy``), finished its
    spawn; its report was lost. It is completed by the spawn report's own code path
    (:func:`conductor.instance_update`, expected task_state spawning), so the real report, if it
    comes later, is dropped as stale. Returns how many were completed.

    Not for a build that failed: a spawn that fails removes its domain before it reports build_failed
    and holds the instance (busy) until then; a build_failed already applied left spawning."""
    running = []
    for key, power_state in reported.items():
        if power_state != PowerState.RUNNING or key in busy:
            continue
        try:
            running.append(uuid.UUID(key))
        except (ValueError, AttributeError, TypeError):
            continue
    if not running:
        return 0
    started_before = min(timezone.now() - timedelta(seconds=settings.BUILD_REPORT_GRACE), observed_at)
    stuck = (Instance.objects.filter(host=host, uuid__in=running, vm_state=VmState.BUILDING,
                                     task_state=TaskState.SPAWNING, task_state_since__lt=started_before)
             .values_list("uuid", flat=True))
    return sum(complete_build(str(instance_uuid), host.name, BUILD_COMPLETED_FROM_HEARTBEAT)
               for instance_uuid in stuck)


def resend_lost_spawns(host: Host, reported: dict[str, str], observed_at: datetime,
                       busy: Collection[str] = ()) -> int:
    """A server spawning on ``host`` for longer than BUILD_RESEND_AFTER whose domain the heartbeat
    (observed that long after the build started) does not list and for which nothing runs there
    (``busy``) never got its spawn (a scheduler killed between its claim and the send, a message the
    broker lost): the spawn is sent once more (:func:`resend_once`). A spawn is idempotent (by domain
    name and its host's spawn journal), so a late original changes nothing. Returns how many."""
    started_before = min(timezone.now(), observed_at) - timedelta(seconds=settings.BUILD_RESEND_AFTER)
    waiting = (Instance.objects.select_related("flavor", "image", "project", "host")
               .filter(host=host, vm_state=VmState.BUILDING, task_state=TaskState.SPAWNING,
                       task_state_since__lt=started_before))
    sent = 0
    for instance in waiting:
        key = str(instance.uuid)
        if key in reported or key in busy:
            continue
        spec = spawn_spec(instance, host.name)
        sent += resend_once(key, "spawn_resent", host=host.name, message=(
            f"no spawn ran on {host.name} {settings.BUILD_RESEND_AFTER:g} s after the server was placed "
            "there (its message was lost): spawn sent again"),
            send=functools.partial(rpc.cast, host.name, contract.COMPUTE_SPAWN, spec=spec))
    return sent


def resend_once(instance_uuid: str, event: str, *, host: str, message: str, send: Callable[[], None]) -> bool:
    """Send a build's message again, at most once per action: ``event`` recorded on the server's running
    action says it was (and why), and ``send`` runs when that commits. False: no running action, or
    already resent."""
    with transaction.atomic():
        action = conductor.current_action(instance_uuid)
        if action is None or action.events.filter(event=event).exists():
            return False
        conductor.record_event(instance_uuid, event=event, result=ActionResult.SUCCESS, host=host,
                               message=message, action_id=action.pk)
        transaction.on_commit(send)
    log.warning("%s: %s", instance_uuid, message)
    return True


def complete_build(instance_uuid: str, host: str, message: str) -> bool:
    """End the spawn of ``instance_uuid`` on ``host`` as its lost report would have: ACTIVE and running,
    through the spawn report's own code path (expected task_state spawning), so the real report, if it
    comes later, is dropped as stale. ``message`` says on the action how the build was found finished.
    The caller has seen the domain running on ``host``. Returns whether the build was completed."""
    if not conductor.instance_update(
            instance_uuid=instance_uuid, host=host, expected_task_state=TaskState.SPAWNING,
            values={"vm_state": VmState.ACTIVE, "task_state": None, "power_state": PowerState.RUNNING},
            event={"name": "compute_spawn", "result": ActionResult.SUCCESS, "message": message}):
        return False
    log.warning("build of %s on %s %s", instance_uuid, host, message)
    return True


DELETE_COMPLETED_FROM_HEARTBEAT = ("completed from the host's heartbeat: the domain is gone, the report "
                                   "was lost")


def complete_deletes(host: Host, reported: dict[str, str], observed_at: datetime,
                     busy: Collection[str] = ()) -> int:
    """:func:`complete_builds` for deletes: a server deleting on ``host`` for longer than
    BUILD_REPORT_GRACE whose domain the heartbeat (observed after the delete started) no longer lists,
    and on which nothing runs there any more (``busy``), was destroyed; its ``instance_destroyed``
    report was lost (a conductor killed while it handled it: Redis gives an unacknowledged task back
    only after the visibility timeout). It is finished by that report's own code path, at once rather
    than at TASK_DEADLINE_DELETING. Returns how many were finished."""
    started_before = min(timezone.now() - timedelta(seconds=settings.BUILD_REPORT_GRACE), observed_at)
    gone = (Instance.objects.filter(host=host, task_state=TaskState.DELETING,
                                    task_state_since__lt=started_before)
            .values_list("uuid", flat=True))
    finished = 0
    for instance_uuid in gone:
        key = str(instance_uuid)
        if key in reported or key in busy:
            continue
        if conductor.instance_destroyed(instance_uuid=key, host=host.name,
                                        message=DELETE_COMPLETED_FROM_HEARTBEAT):
            log.warning("delete of %s on %s %s", key, host.name, DELETE_COMPLETED_FROM_HEARTBEAT)
            finished += 1
    return finished
