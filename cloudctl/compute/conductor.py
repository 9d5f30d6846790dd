"""What compute workers report, applied to the database. The conductor is its only writer.

Reports carry the task_state the worker expected; a report about an instance that has moved on
(deleted meanwhile, rescheduled elsewhere) is dropped and logged, never applied.
"""

from __future__ import annotations

import fnmatch
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cloudctl.compute import ports, rpc
from cloudctl.compute.models import (
    Allocation,
    Host,
    Instance,
    InstanceAction,
    InstanceActionEvent,
    Migration,
    MigrationStatus,
    MigrationType,
)
from cloudctl.compute.services import finish_action, mark_deleted
from cloudctl.compute.states import PowerState, TaskState, VmState
from cloudctl.network import hostsync
from compute_workers import contract
from compute_workers.contract import ActionResult

log = logging.getLogger(__name__)

_UPDATABLE = {"vm_state", "task_state", "power_state"}


def current_action(instance_uuid: str, action_id: int | None = None) -> InstanceAction | None:
    """The action ``action_id`` if given (and still running), else the instance's newest running
    action."""
    running = InstanceAction.objects.filter(instance_id=instance_uuid, finish_time__isnull=True)
    if action_id is not None:
        return running.filter(pk=action_id).first()
    return running.order_by("-start_time", "-id").first()


def record_event(instance_uuid: str, *, event: str, result: str = "", host: str = "",
                 message: str = "", traceback: str = "", action_id: int | None = None) -> None:
    """Add a step to the instance's running action.

    A result of ``start`` opens the step; a later result for the same step name closes it, so a
    step that takes time shows its start and finish times in one row.
    """
    action = current_action(instance_uuid, action_id)
    if action is None:
        log.info("event %s for %s has no running action; not recorded", event, instance_uuid)
        return
    now = timezone.now()
    result = result.strip().capitalize()
    if result == "Progress":
        # A long step tells how far it got: the open step's message changes, it stays open.
        action.events.filter(event=event, finish_time__isnull=True).update(message=message)
        return
    if result == "Start":
        # The conductor's processes may apply a host's reports out of order: a step's end handled before
        # its start recorded the step already (closed without an opening: start_time == finish_time).
        # Its late start must not open a second row that nothing would close.
        latest = action.events.filter(event=event, host=host).order_by("-id").first()
        if latest is not None and latest.finish_time is not None and latest.finish_time == latest.start_time:
            log.info("event %s of %s from %s: its start came after its end; recorded once", event,
                     instance_uuid, host)
            return
        InstanceActionEvent.objects.create(action=action, event=event, host=host, message=message,
                                           start_time=now)
        return
    opened = action.events.filter(event=event, finish_time__isnull=True).order_by("-id").first()
    if opened is not None:
        opened.finish_time, opened.result, opened.traceback = now, result, traceback
        opened.message = message or opened.message
        opened.save(update_fields=["finish_time", "result", "message", "traceback"])
        return
    InstanceActionEvent.objects.create(action=action, event=event, result=result, host=host,
                                       message=message, traceback=traceback, start_time=now,
                                       finish_time=now)


def instance_update(*, instance_uuid: str, host: str, expected_task_state: str | None,
                    values: dict[str, Any], event: dict[str, Any] | None = None,
                    fault: dict[str, Any] | None = None, action_id: int | None = None) -> bool:
    """Apply a compute worker's state report if the instance is still where the worker thinks.

    A fault becomes the server's fault only when the server ends in ERROR; an operation that failed
    but left the server in a sound state (a stop that could not stop a running guest) says so on
    its action instead, as Nova's instance actions do.
    """
    unknown = set(values) - _UPDATABLE
    if unknown:
        raise ValueError(f"instance_update cannot set {sorted(unknown)}")
    now = timezone.now()
    changes: dict[str, Any] = dict(values)
    if fault is not None and values.get("vm_state") == VmState.ERROR:
        changes["fault"] = fault
    if values.get("vm_state") == VmState.ACTIVE and expected_task_state == TaskState.SPAWNING:
        changes["launched_at"] = now
    with transaction.atomic():
        if action_id is not None and current_action(instance_uuid, action_id) is None:
            # The action already ended (reaped, or finished by an earlier delivery): a report
            # about it must not end a newer operation that expects the same task_state.
            log.info("dropped report from %s for %s: action %s is not running", host,
                     instance_uuid, action_id)
            return False
        matched = Instance.objects.filter(uuid=instance_uuid, host__name=host)
        matched = (matched.filter(task_state__isnull=True) if expected_task_state is None
                   else matched.filter(task_state=expected_task_state))
        if matched.change(**changes) != 1:
            _drop_stale_report(instance_uuid, host, expected_task_state, values)
            return False
        ports.server_ports_follow(instance_uuid, values.get("vm_state"))
        if event:
            record_event(instance_uuid, event=str(event.get("name", "compute")),
                         result=str(event.get("result", "")), host=host,
                         message=str(event.get("message", "")),
                         traceback=str((fault or {}).get("details", "")), action_id=action_id)
        if "task_state" in values and values["task_state"] is None:
            action = current_action(instance_uuid, action_id)
            if action is not None:
                failed = values.get("vm_state") == VmState.ERROR or fault is not None
                finish_action(action, result=ActionResult.ERROR if failed else ActionResult.SUCCESS,
                              message=(fault or {}).get("message", ""))
    return True


def _drop_stale_report(instance_uuid: str, host: str, expected_task_state: str | None,
                       values: dict[str, Any]) -> None:
    instance = Instance.objects.filter(uuid=instance_uuid).select_related("host").first()
    if instance is None:
        log.warning("dropped report from %s about unknown instance %s", host, instance_uuid)
        return
    log.info("dropped stale report from %s for %s: expected task_state=%s, now vm_state=%s "
             "task_state=%s host=%s; values=%s", host, instance_uuid, expected_task_state,
             instance.vm_state, instance.task_state, instance.host, values)
    # A spawn that finished after the server was deleted (or moved) left a domain behind:
    # reality wins, so ask that host to remove it.
    lives_elsewhere = instance.host is None or instance.host.name != host
    if values.get("vm_state") == VmState.ACTIVE and (
            instance.vm_state == VmState.DELETED or lives_elsewhere):
        log.warning("asking %s to remove the leftover domain of %s", host, instance_uuid)
        rpc.cast(host, contract.COMPUTE_TERMINATE, instance_uuid=instance_uuid)


def build_failed(*, instance_uuid: str, host: str, fault: dict[str, Any], reschedule: bool) -> None:
    """A spawn failed on ``host`` (and was cleaned up there): retry elsewhere or end in ERROR."""
    with transaction.atomic():
        instance = (Instance.objects.select_for_update()
                    .filter(uuid=instance_uuid, host__name=host, task_state=TaskState.SPAWNING)
                    .first())
        if instance is None:
            log.info("dropped build failure of %s on %s: the instance moved on", instance_uuid,
                     host)
            return
        Allocation.objects.filter(instance=instance, host__name=host).delete()
        record_event(instance_uuid, event="compute_spawn", result=ActionResult.ERROR, host=host,
                     message=str(fault.get("message", "")), traceback=str(fault.get("details", "")))
        retry_hosts = [*instance.retry_hosts, host]
        if reschedule and instance.attempts < settings.SCHEDULER_MAX_ATTEMPTS:
            Instance.objects.filter(uuid=instance_uuid).change(
                host=None, task_state=TaskState.SCHEDULING, retry_hosts=retry_hosts)
            ports.server_ports_bind(instance_uuid, "")
            transaction.on_commit(lambda: rpc.send_to_scheduler(
                contract.SCHEDULE_INSTANCE, instance_uuid=instance_uuid))
            return
        message = str(fault.get("message") or "the build failed")
        if reschedule:
            message = (f"{message} (tried {instance.attempts} of "
                       f"{settings.SCHEDULER_MAX_ATTEMPTS} allowed attempts, on "
                       f"{', '.join(retry_hosts)})")
        Instance.objects.filter(uuid=instance_uuid).change(
            vm_state=VmState.ERROR, task_state=None, power_state=PowerState.NOSTATE,
            retry_hosts=retry_hosts,
            fault={"message": message, "code": int(fault.get("code", 500)),
                   "details": str(fault.get("details", ""))})
        ports.server_ports_follow(instance_uuid, VmState.ERROR)
        action = current_action(instance_uuid)
        if action is not None:
            finish_action(action, result=ActionResult.ERROR, message=message)


def instance_destroyed(*, instance_uuid: str, host: str, message: str = "") -> bool:
    """The host removed the domain and files: finish the delete. Only the instance's own host (the
    one the delete was sent to) can say so. Returns whether a delete was finished."""
    with transaction.atomic():
        instance = (Instance.objects.select_for_update()
                    .filter(uuid=instance_uuid, host__name=host, task_state=TaskState.DELETING).first())
        if instance is None:
            log.info("instance_destroyed for %s from %s: not deleting there, nothing to do",
                     instance_uuid, host)
            return False
        action = current_action(instance_uuid)
        record_event(instance_uuid, event="compute_terminate_instance", result=ActionResult.SUCCESS,
                     host=host, message=message)
        mark_deleted(instance)
        if action is not None:
            finish_action(action, result=ActionResult.SUCCESS)
    return True


_HOST_FIELDS = ("libvirt_uri", "driver", "virt_type", "hypervisor_type", "hypervisor_version",
                "vcpus", "memory_mb", "memory_mb_reserved", "disk_gb", "disk_gb_reserved",
                "cpu_info")


def host_heartbeat(*, host: str, resources: dict[str, Any], starting: bool = False) -> Host:
    """Record a compute worker's heartbeat; the first one registers the host.

    A host whose worker stopped cleanly (:func:`host_stopping`) stays down until the worker starts
    again (``starting``: its ``host_init``): the last heartbeat it sent before stopping may be handled
    after the stop, or alongside it by the conductor's other process, and must not bring it back up
    (the scheduler would send new servers to a host nobody serves). Its resources are recorded.
    A tunnel IP that changed (or appeared) is sent to the hosts sharing a vxlan network with this one
    (their peers); a heartbeat without ``tunnel_ip`` (a worker older than the key) leaves it as it was."""
    values: dict[str, Any] = {key: resources[key] for key in _HOST_FIELDS if key in resources}
    values["reported_instances"] = resources.get("instances", {})
    values["reported_at"] = observed_at_of(resources)
    values["last_heartbeat"] = timezone.now()
    # Hosts reporting the same non-empty id share their instances directory (evacuation keeps the disk
    # then); a worker older than the key reports none: "".
    values["storage_id"] = resources.get("storage_id") or ""
    if "tunnel_ip" in resources:
        values["tunnel_ip"] = resources["tunnel_ip"] or ""
    same_tunnel = {"tunnel_ip": values["tunnel_ip"]} if "tunnel_ip" in values else {}
    rows = Host.objects.filter(name=host)
    live = rows if starting else rows.filter(last_heartbeat__isnull=False)
    # One transaction: a new tunnel IP and the sync of its peers (sent on commit) go together, so a
    # database lost between them leaves neither, and the retried heartbeat sees the change again.
    with transaction.atomic():
        # One UPDATE for the common case (the host exists, is up, its tunnel IP unchanged):
        # heartbeats are the conductor's bulk work. The condition is checked against the committed
        # row: a concurrent stop wins.
        if not live.filter(**same_tunnel).update(**values):
            previous = rows.values_list("tunnel_ip", flat=True).first()
            if previous is None:
                _, created = Host.objects.get_or_create(name=host, defaults={**values, **_joining(host)})
                if not created:  # registered meanwhile by the conductor's other process
                    previous = rows.values_list("tunnel_ip", flat=True).first()
            if previous is not None:
                if not live.update(**values):
                    del values["last_heartbeat"]
                    rows.update(**values)
                    log.info("host %s: heartbeat after its worker stopped; down until it starts again",
                             host)
                if same_tunnel and previous != values["tunnel_ip"]:
                    log.info("host %s: tunnel IP now %r", host, values["tunnel_ip"])
                    hostsync.tunnel_changed(host)
        record = Host.objects.get(name=host)
    _reap_deleted_domains(record)
    return record


NEW_HOST_REASON = Host.NEW_HOST_REASON


def host_trusted(host: str) -> bool:
    """Whether a new host joins enabled: its name matches COMPUTE_TRUSTED_HOSTS (names or shell
    patterns; by default the host `make run` configures)."""
    return any(fnmatch.fnmatchcase(host, pattern) for pattern in settings.COMPUTE_TRUSTED_HOSTS)


def _joining(host: str) -> dict[str, Any]:
    """The state a host's first heartbeat creates it in: enabled when trusted, else disabled (it is
    up, and gets no server until an admin enables it)."""
    if host_trusted(host):
        log.info("host %s joined (trusted: enabled)", host)
        return {"enabled": True}
    log.warning("host %s joined disabled: %s", host, NEW_HOST_REASON)
    return {"enabled": False, "disabled_reason": NEW_HOST_REASON}


# A heartbeat without ``observed_at`` is taken to be this old: its list of domains may predate
# a spawn or a state change the conductor applied in the meantime.
UNDATED_HEARTBEAT_AGE = timedelta(seconds=30)


def host_stopping(*, host: str) -> None:
    """The host's compute worker shut down cleanly: it is down now, not SERVICE_DOWN_TIME later, and
    until the worker starts again (see :func:`host_heartbeat`)."""
    Host.objects.filter(name=host).update(last_heartbeat=None)
    log.info("host %s: compute worker stopped", host)


def observed_at_of(resources: dict[str, Any]) -> datetime:
    """When the host read its domains' states (``observed_at``, epoch seconds)."""
    epoch = resources.get("observed_at")
    if epoch:
        return datetime.fromtimestamp(float(epoch), tz=UTC)
    return timezone.now() - UNDATED_HEARTBEAT_AGE


def _reap_deleted_domains(host: Host) -> None:
    """Domains still on a host for servers already deleted are removed (Nova's 'reap')."""
    reported = list(host.reported_instances or {})
    if not reported:
        return
    # A server evacuated away from this host has its copy removed by compute.destroy_evacuated (the
    # disk kept on shared storage), not by a terminate.
    evacuated = Migration.objects.filter(source_host=host, migration_type=MigrationType.EVACUATION,
                                         status=MigrationStatus.DONE).values("instance_id")
    leftovers = (Instance.objects.filter(uuid__in=reported, vm_state=VmState.DELETED)
                 .exclude(uuid__in=evacuated))
    for instance_uuid in leftovers.values_list("uuid", flat=True):
        log.warning("host %s still has a domain for deleted server %s; removing it", host.name,
                    instance_uuid)
        rpc.cast(host.name, contract.COMPUTE_TERMINATE, instance_uuid=str(instance_uuid))
