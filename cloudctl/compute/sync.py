"""Reality wins: the hypervisor's word against the database, and what to do when they disagree.

Three sources feed this module, all through the conductor:

* ``power_state_update`` from libvirt lifecycle events, seconds after a guest changes state;
* the heartbeat's list of domains, every few seconds (the periodic sync);
* ``host_init`` when a compute worker (re)starts, which also finishes or repeats what the restart
  interrupted (Nova's ``ComputeManager._init_instance``).

And the reaper: any task past its deadline is ended truthfully. Rules follow Nova's
``_sync_instance_power_state``: instances with a task in flight are left to it, and a guest the user
did not ask to start is never started.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cloudctl.compute import migration_ops, rpc
from cloudctl.compute.conductor import current_action, record_event
from cloudctl.compute.models import Allocation, Host, Instance, InstanceAction
from cloudctl.compute.services import finish_action, mark_deleted
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import VM_STATE_FOR_POWER_STATE, PowerState, TaskState, VmState
from compute_workers import contract

log = logging.getLogger(__name__)


def _system_action(instance: Instance, action: str, *, result: str, message: str,
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
        if updated and message:
            log.info("sync %s: %s", instance.uuid, message)
            _system_action(instance, "sync_power_state", result="Success", message=message,
                           event="sync_power_state")
    return bool(updated)


def _adopt_from_elsewhere(instance: Instance) -> bool:
    """The domain is gone from the server's host but another host that is up reports it (a live
    migration that libvirt finished after its worker died, for example): reality wins, the record
    and the claim move there."""
    uuid = str(instance.uuid)
    found = [host for host in Host.objects.filter(reported_instances__has_key=uuid).exclude(
        pk=instance.host_id) if host.is_up]
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
        Allocation.objects.filter(instance_id=uuid).delete()
        Allocation.objects.create(instance_id=uuid, host=host, vcpus=instance.vcpus,
                                  memory_mb=instance.memory_mb, disk_gb=instance.root_gb)
        instance.host = host
        _system_action(instance, "sync_power_state", result="Success", message=message,
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


# Nova's _init_instance, for the task states an interrupted worker can leave behind.
_REPEATED_ON_RESTART = {
    TaskState.REBOOTING: TaskState.REBOOTING_HARD,
    TaskState.REBOOTING_HARD: TaskState.REBOOTING_HARD,
    TaskState.POWERING_OFF: TaskState.POWERING_OFF,
    TaskState.POWERING_ON: TaskState.POWERING_ON,
}
_ROLLED_BACK_ON_RESTART = (TaskState.PAUSING, TaskState.UNPAUSING, TaskState.SUSPENDING,
                           TaskState.RESUMING)


def host_init(*, host: str, reported: dict[str, str]) -> None:
    """A compute worker (re)started: finish or repeat what its restart interrupted."""
    record = Host.objects.filter(name=host).first()
    if record is not None:
        try:
            migration_ops.recover_after_restart(record, reported)
        except Exception:
            log.exception("recovering the migrations of %s after a worker restart failed", host)
    servers = (Instance.objects.select_related("host", "project", "flavor", "image")
               .filter(host__name=host).exclude(vm_state=VmState.DELETED))
    for instance in servers:
        power_state = reported.get(str(instance.uuid), PowerState.NOSTATE)
        try:
            _init_instance(instance, power_state)
        except Exception:  # one bad row must not stop the others from recovering
            log.exception("recovering %s on %s after a worker restart failed", instance.uuid, host)


def _init_instance(instance: Instance, power_state: str) -> None:
    host = instance.host.name if instance.host else ""
    uuid = str(instance.uuid)
    task = instance.task_state
    if task in (TaskState.SCHEDULING, TaskState.SPAWNING):
        message = (f"the build was interrupted by a restart of the compute worker on {host}; "
                   "delete this server and create it again")
        with transaction.atomic():
            if Instance.objects.filter(uuid=uuid, task_state=task).change(
                    vm_state=VmState.ERROR, task_state=None, power_state=power_state,
                    fault={"message": message, "code": 500, "details": ""}):
                record_event(uuid, event="init_instance", result="Error", host=host,
                             message=message)
                _finish_running_action(uuid, "Error", message)
        return
    if task == TaskState.DELETING:
        record_event(uuid, event="init_instance", result="Success", host=host,
                     message=f"the compute worker on {host} restarted during the delete; "
                             "deleting again")
        rpc.cast(host, contract.COMPUTE_TERMINATE, instance_uuid=uuid)
        return
    if task in _REPEATED_ON_RESTART:
        _repeat_interrupted(instance, power_state)
        return
    if task in _ROLLED_BACK_ON_RESTART:
        truth = VM_STATE_FOR_POWER_STATE[PowerState(power_state)]
        message = (f"{task} was interrupted by a restart of the compute worker on {host}; the "
                   f"domain is {power_state}, so the server is {truth}")
        with transaction.atomic():
            if Instance.objects.filter(uuid=uuid, task_state=task).change(
                    vm_state=truth, task_state=None, power_state=power_state):
                record_event(uuid, event="init_instance", result="Error", host=host,
                             message=message)
                _finish_running_action(uuid, "Error", message)
        return
    if task is None:
        sync_power_state(instance, power_state, timezone.now() + timedelta(microseconds=1))


def _repeat_interrupted(instance: Instance, power_state: str) -> None:
    host = instance.host.name if instance.host else ""
    uuid = str(instance.uuid)
    task = instance.task_state
    again = _REPEATED_ON_RESTART[TaskState(task)]
    action = current_action(uuid)
    with transaction.atomic():
        if not Instance.objects.filter(uuid=uuid, task_state=task).change(task_state=again):
            return
        instance.refresh_from_db()
        if action is not None:
            action.events.filter(finish_time__isnull=True).update(
                finish_time=timezone.now(), result="Error",
                message=f"interrupted: the compute worker on {host} restarted")
        how = "hard reboot" if again == TaskState.REBOOTING_HARD else again.replace("_", " ")
        record_event(uuid, event="init_instance", result="Success", host=host,
                     message=f"the compute worker on {host} restarted during {task} (domain "
                             f"{power_state}); repeating it as a {how}")
        kwargs: dict[str, Any] = {"instance_uuid": uuid,
                                  "action_id": action.pk if action else None}
        if again == TaskState.REBOOTING_HARD:
            name = contract.COMPUTE_REBOOT
            kwargs.update(reboot_type=contract.REBOOT_HARD, spec=spawn_spec(instance, host))
        elif again == TaskState.POWERING_OFF:
            name = contract.COMPUTE_POWER_OFF
            kwargs.update(timeout=settings.CLEAN_SHUTDOWN_TIMEOUT)
        else:
            name = contract.COMPUTE_POWER_ON
            kwargs.update(spec=spawn_spec(instance, host))
        transaction.on_commit(lambda: rpc.cast(host, name, **kwargs))


def _finish_running_action(instance_uuid: str, result: str, message: str) -> None:
    action = current_action(instance_uuid)
    if action is not None:
        finish_action(action, result=result, message=message)


def reap_expired_tasks() -> int:
    """End every task past its deadline in a truthful state, and say so on its action.

    Builds use INSTANCE_BUILD_TIMEOUT; every other task its TASK_DEADLINES entry. The truth comes
    from the host's last heartbeat when it is recent; a server on a host that is down, or whose
    domain the host did not report, ends in ERROR with a fault that says what is known.
    """
    now = timezone.now()
    reaped = 0
    deadlines = {**settings.TASK_DEADLINES,
                 TaskState.SCHEDULING: settings.INSTANCE_BUILD_TIMEOUT,
                 TaskState.SPAWNING: settings.INSTANCE_BUILD_TIMEOUT}
    for task, seconds in deadlines.items():
        expired = (Instance.objects.select_related("host", "project")
                   .filter(task_state=task, task_state_since__lt=now - timedelta(seconds=seconds)))
        for instance in expired:
            reaped += _reap(instance, task, seconds)
    return reaped


def _reap(instance: Instance, task: str, seconds: int) -> int:
    uuid = str(instance.uuid)
    host = instance.host
    where = f"on host {host.name}" if host else "waiting for a host"
    late = f"{task} did not finish within {seconds} s {where}"
    # The host's last heartbeat is the best truth there is while the host is up: if the task never
    # ran (a wedged worker) it is the state before the task, which is where the server is.
    known = host is not None and host.is_up
    power_state, source = PowerState.NOSTATE, ""
    if known:
        reported = host.reported_instances or {}
        if uuid in reported:
            power_state, source = reported[uuid], "the host last reported the domain"
        elif host.last_heartbeat is not None and host.last_heartbeat < instance.task_state_since:
            # No heartbeat since the task started, and the last one predates the domain: the
            # state the server had when the task started is the last truth there is.
            power_state, source = instance.power_state, "the domain was last known"
    changes: dict[str, Any] = {"task_state": None}
    if task in (TaskState.SCHEDULING, TaskState.SPAWNING):
        message = f"build timed out: {late}"
        changes.update(vm_state=VmState.ERROR,
                       fault={"message": message, "code": 500, "details": ""})
    elif task == TaskState.DELETING and (host is None or not host.is_up):
        message = f"{late}; the host is down, so the server is deleted here (local delete)"
    elif known and power_state != PowerState.NOSTATE:
        truth = VM_STATE_FOR_POWER_STATE[PowerState(power_state)]
        message = f"{late}; {source} {power_state}, so the server is {truth}"
        changes.update(vm_state=truth, power_state=power_state)
    else:
        reason = ("the host is down" if host is None or not host.is_up
                  else "the host no longer reports its domain")
        message = f"{late} and {reason}"
        changes.update(vm_state=VmState.ERROR,
                       fault={"message": message, "code": 500, "details": ""})
    with transaction.atomic():
        if not Instance.objects.filter(uuid=uuid, task_state=task,
                                       task_state_since=instance.task_state_since).change(**changes):
            return 0
        record_event(uuid, event="task_deadline_exceeded", result="Error",
                     host=host.name if host else "", message=message)
        _finish_running_action(uuid, "Error", message)
        if task == TaskState.DELETING and (host is None or not host.is_up):
            instance.refresh_from_db()
            mark_deleted(instance)
        if task in (TaskState.SCHEDULING, TaskState.SPAWNING):
            Allocation.objects.filter(instance_id=uuid).delete()
            if host is not None:
                name = host.name
                transaction.on_commit(lambda: rpc.cast(name, contract.COMPUTE_TERMINATE,
                                                       instance_uuid=uuid))
    log.warning("reaped %s: %s", uuid, message)
    return 1
