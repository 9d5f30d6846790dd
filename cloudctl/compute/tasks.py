"""Conductor tasks: thin wrappers that apply compute workers' reports through conductor services.

This is the boundary between the two worlds. Every report delivered by the broker must first prove
which host sent it (:class:`HostReport`: its signature headers, checked against the host's key);
then its payload (values, event, fault, progress) is checked against the contract's types here
(:func:`contract.validate_values` and its siblings), so a malformed report fails its task with the
reason instead of reaching the database. The services behind (conductor, sync, recovery, migration
reports) apply a report only to what the signing host owns: its instances, its end of a migration.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from celery import Task, shared_task

from cloudctl.compute import conductor, evacuation, host_keys, migration_reports, recovery, sync
from cloudctl.database import DatabaseTask
from compute_workers import contract


class SignedReport(Task):
    """A conductor task fed by compute workers: a message from the broker runs only when its signature
    headers prove it comes from the host it names (:func:`host_keys.report_verified`); otherwise it is
    dropped (logged at WARNING, counted) and the task returns None. A direct call in this process
    (tests, other services) is not a message and is not checked."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if not request.called_directly and not host_keys.report_verified(
                self.name, request.headers, args, kwargs, task_id=request.id):
            return None
        return super().__call__(*args, **kwargs)


class HostReport(DatabaseTask, SignedReport):
    """A compute host's report: signed (:class:`SignedReport`) and retried when the database is lost
    (:class:`DatabaseTask`). The retry wraps the signature check, which reads the host's key
    generation from the database too; a retried message keeps its headers, so it is checked again."""


@shared_task(name=contract.CONDUCTOR_INSTANCE_UPDATE, base=HostReport)
def instance_update(instance_uuid: str, host: str, expected_task_state: str | None,
                    values: dict[str, Any], event: dict[str, Any] | None = None,
                    fault: dict[str, Any] | None = None, action_id: int | None = None) -> bool:
    return conductor.instance_update(instance_uuid=instance_uuid, host=host,
                                     expected_task_state=expected_task_state,
                                     values=dict(contract.validate_values(values)),
                                     event=_plain(contract.validate_event(event)),
                                     fault=_plain(contract.validate_fault(fault)), action_id=action_id)


@shared_task(name=contract.CONDUCTOR_BUILD_FAILED, base=HostReport)
def build_failed(instance_uuid: str, host: str, fault: dict[str, Any], reschedule: bool) -> None:
    conductor.build_failed(instance_uuid=instance_uuid, host=host,
                           fault=dict(contract.validate_fault(fault) or {}), reschedule=reschedule)


@shared_task(name=contract.CONDUCTOR_INSTANCE_DESTROYED, base=HostReport)
def instance_destroyed(instance_uuid: str, host: str) -> None:
    conductor.instance_destroyed(instance_uuid=instance_uuid, host=host)


@shared_task(name=contract.CONDUCTOR_HOST_HEARTBEAT, base=HostReport, ignore_result=True)
def host_heartbeat(host: str, resources: dict[str, Any]) -> None:
    resources = _resources(resources)
    record = conductor.host_heartbeat(host=host, resources=resources)
    observed_at = conductor.observed_at_of(resources)
    sync.complete_builds(record, resources.get("instances", {}), observed_at, resources.get("busy", []))
    sync.resend_lost_spawns(record, resources.get("instances", {}), observed_at, resources.get("busy", []))
    sync.complete_deletes(record, resources.get("instances", {}), observed_at, resources.get("busy", []))
    sync.sync_host(record, resources.get("instances", {}), observed_at)


@shared_task(name=contract.CONDUCTOR_HOST_STOPPING, base=HostReport)
def host_stopping(host: str) -> None:
    conductor.host_stopping(host=host)


@shared_task(name=contract.CONDUCTOR_HOST_INIT, base=HostReport)
def host_init(host: str, resources: dict[str, Any]) -> None:
    resources = _resources(resources)
    conductor.host_heartbeat(host=host, resources=resources, starting=True)
    recovery.host_init(host=host, reported=resources.get("instances", {}))


@shared_task(name=contract.CONDUCTOR_POWER_STATE_UPDATE, base=HostReport, ignore_result=True)
def power_state_update(host: str, instance_uuid: str, power_state: str,
                       observed_at: float | None = None) -> bool:
    return sync.power_state_update(host=host, instance_uuid=instance_uuid,
                                   power_state=power_state, observed_at=observed_at)


@shared_task(name="conductor.reap_expired_tasks")
def reap_expired_tasks() -> int:
    return recovery.resend_lost_schedules() + recovery.reap_expired_tasks()


@shared_task(name=contract.CONDUCTOR_MIGRATION_UPDATE, base=HostReport)
def migration_update(migration_id: int, host: str, status: str, error: str | None = None,
                     values: dict[str, Any] | None = None, event: dict[str, Any] | None = None) -> bool:
    return migration_reports.migration_update(
        migration_id=migration_id, host=host, status=status, error=error,
        values=None if values is None else _migration_values(values),
        event=_plain(contract.validate_event(event)))


@shared_task(name=contract.CONDUCTOR_MIGRATION_PROGRESS, base=HostReport, ignore_result=True)
def migration_progress(migration_id: int, host: str, progress: dict[str, Any]) -> bool:
    return migration_reports.migration_progress(migration_id=migration_id, host=host,
                                                progress=dict(contract.validate_progress(progress)))


@shared_task(name="conductor.hosts_fence_and_evacuate")
def hosts_fence_and_evacuate() -> dict[str, int]:
    """Periodic (beat, HOST_FENCE_INTERVAL): fence the dead hosts holding servers (HOST_FENCE_COMMAND)
    and, with AUTO_EVACUATE, evacuate the fenced hosts' servers."""
    return evacuation.hosts_fence_and_evacuate()


@shared_task(name="conductor.confirm_expired_resizes")
def confirm_expired_resizes() -> int:
    """Periodic (beat): unconfirmed resizes past RESIZE_CONFIRM_WINDOW, and stuck migrations."""
    return recovery.confirm_expired_resizes() + recovery.reap_stuck_migrations()


def _resources(resources: Any) -> dict[str, Any]:
    """A heartbeat's (or host_init's) resources: an object; ``tunnel_ip``, when given, "" or an IP
    address (the other hosts' VXLAN flood entries will point at it); ``busy``, when given, a list of
    strings; ``storage_id`` (:func:`contract.check_storage_id`) set, "" when missing."""
    if not isinstance(resources, dict):
        raise contract.ReportError("resources must be a JSON object")
    busy = resources.get("busy", [])
    if not isinstance(busy, list) or not all(isinstance(item, str) for item in busy):
        raise contract.ReportError(f"busy must be a list of instance uuids, not {busy!r}")
    # 32 hex digits or "" (a missing key, an older worker: "" too). A copy: the message's own kwargs
    # stay as signed (a retry checks the signature again).
    resources = {**resources, "storage_id": contract.check_storage_id(resources.get("storage_id"))}
    tunnel_ip = resources.get("tunnel_ip", "")
    if not isinstance(tunnel_ip, str):
        raise contract.ReportError(f"tunnel_ip must be a string, not {tunnel_ip!r}")
    if tunnel_ip:
        try:
            ipaddress.ip_address(tunnel_ip)
        except ValueError:
            raise contract.ReportError(f"tunnel_ip {tunnel_ip!r} is not an IP address") from None
    return resources


def _plain(payload: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if payload is None else dict(payload)


def _migration_values(values: dict[str, Any]) -> dict[str, Any]:
    """A migration report's ``values``: the instance's power state, checked, plus a live migration's
    final figures (``progress``) and ``downtime_ms``."""
    if not isinstance(values, dict):
        raise contract.ReportError("values must be a JSON object")
    checked: dict[str, Any] = dict(contract.validate_values(
        {key: value for key, value in values.items() if key not in ("progress", "downtime_ms")}))
    if "progress" in values:
        checked["progress"] = dict(contract.validate_progress(values["progress"]))
    if values.get("downtime_ms") is not None:
        downtime = values["downtime_ms"]
        if not isinstance(downtime, int) or isinstance(downtime, bool) or downtime < 0:
            raise contract.ReportError(f"downtime_ms must be a non-negative integer, not {downtime!r}")
        checked["downtime_ms"] = downtime
    return checked
