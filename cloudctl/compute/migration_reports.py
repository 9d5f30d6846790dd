"""The hosts' reports on a migration, applied by the conductor (``conductor.migration_update``,
``conductor.migration_progress``): each step's outcome, and the next step sent.

A report is applied only when the migration expects it: its status is one the step table lists
for that report, and the host that reports is the end of the migration the table names (the source
or the destination). Anything else (a redelivery, a late report, the wrong host) is dropped and
logged. Live migration and cold migration/resize have a table each (:data:`LIVE_STEPS`,
:data:`COLD_STEPS`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Protocol

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from cloudctl.compute import states
from cloudctl.compute.conductor import record_event
from cloudctl.compute.migration_batches import migration_locked
from cloudctl.compute.migration_steps import (
    ACTIVE_LIVE,
    LIVE_JOB,
    abort_send,
    confirm_send,
    instance_in_task,
    migration_event,
    migration_finish,
    migration_save,
    release_destination,
    release_source,
    revert_send,
    step_ids,
    step_send,
)
from cloudctl.compute.models import (
    MIGRATION_IN_PROGRESS,
    Flavor,
    Host,
    Instance,
    InstanceActionEvent,
    Migration,
    MigrationType,
)
from cloudctl.compute.models import MigrationStatus as S
from cloudctl.compute.ports import server_ports_follow, server_ports_move
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import PowerState, TaskState, VmState
from compute_workers import contract
from compute_workers.contract import ActionResult

log = logging.getLogger(__name__)


class Reporter(StrEnum):
    """The end of a migration a report comes from (``ANY``: a step either end may report)."""

    SOURCE = "source"
    DEST = "dest"
    ANY = "any"


class StepHandler(Protocol):
    def __call__(self, migration: Migration, *, host: str, error: str, values: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Step:
    """How one report applies: only while the migration is in one of ``expected``, only from
    ``reporter``; ``apply`` records the outcome and sends the next step."""

    expected: tuple[str, ...]  # MigrationStatus values
    reporter: Reporter
    apply: StepHandler

    def accepts(self, status: str, reporter: Reporter | None) -> bool:
        return reporter is not None and status in self.expected and self.reporter in (reporter, Reporter.ANY)


def _progress_values(progress: Any) -> dict[str, int]:
    """The byte counters of a host's progress report that are numbers (bool is no count)."""
    if not isinstance(progress, dict):
        return {}
    return {key: int(progress[key]) for key in contract.MIGRATION_PROGRESS_KEYS
            if isinstance(progress.get(key), int | float) and not isinstance(progress[key], bool)}


def migration_progress(*, migration_id: int, host: str, progress: dict[str, Any]) -> bool:
    values = _progress_values(progress)
    return bool(Migration.objects.filter(pk=migration_id, source_host__name=host,
                                         status__in=(*LIVE_JOB, S.MIGRATING))
                .update(progress_updated=timezone.now(), updated=timezone.now(), **values))


def migration_update(*, migration_id: int, host: str, status: str, error: str | None = None,
                     values: dict[str, Any] | None = None, event: dict[str, Any] | None = None) -> bool:
    """Apply a step's outcome and send the next step. A report the migration does not expect now
    (a redelivery, a late report, the wrong host) is dropped and logged."""
    values = values or {}
    with transaction.atomic():
        migration = migration_locked(migration_id)
        if migration is None:
            log.warning("dropped migration report %s from %s: no migration %s", status, host, migration_id)
            return False
        step = STEPS[migration.migration_type].get(status)
        reporter = _reporter(migration, host, status)
        if step is None or not step.accepts(migration.status, reporter):
            log.info("dropped migration report %s from %s for migration %s (%s, status %s)", status, host,
                     migration_id, migration.migration_type, migration.status)
            if migration.migration_type == MigrationType.EVACUATION and reporter == Reporter.DEST:
                _late_rebuild(migration, status)
            return False
        instance_uuid = str(migration.instance_id)
        if event:
            record_event(instance_uuid, event=str(event.get("name", "migration")),
                         result=str(event.get("result", "")), host=host,
                         message=str(event.get("message", "")), action_id=migration.action_id)
        step.apply(migration, host=host, error=error or "", values=values)
    return True


def _reporter(migration: Migration, host: str, status: str) -> Reporter | None:
    """The end of the migration ``host`` is (None: neither)."""
    source = migration.source_host.name if migration.source_host else None
    dest = migration.dest_host.name if migration.dest_host else None
    if source == dest == host:  # a resize on one host: the step says which end reports
        return _SAME_HOST_REPORTER.get(status, Reporter.DEST)
    if host == source:
        return Reporter.SOURCE
    if host == dest:
        return Reporter.DEST
    return None


# A resize on one host: the reports that come from its source end (the others from its destination).
_SAME_HOST_REPORTER = {report: Reporter.SOURCE for report in (
    contract.MIGRATION_RUNNING, contract.MIGRATION_RUNNING_POSTCOPY, contract.MIGRATION_MIGRATED,
    contract.MIGRATION_CANCELLED, contract.MIGRATION_FAILED, contract.MIGRATION_CONFIRMED,
    contract.MIGRATION_REVERTED)}


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


def _land(migration: Migration, moving: QuerySet[Instance], changes: dict[str, Any]) -> int:
    """Apply ``changes`` (:func:`_landed`'s, and more) to the moving server: the one place a
    migration changes a server's host, so its ports' binding follows it there."""
    changed = moving.change(**changes)
    if changed:
        server_ports_move(migration.instance_id, changes["host"].name)
    return changed


def _reported_or_expected(migration: Migration, values: dict[str, Any]) -> str:
    """The power state a cold-migration step reported, else what it was asked for."""
    return values.get("power_state") or (PowerState.RUNNING if migration.power_on else PowerState.SHUTDOWN)


# Live migration steps -----------------------------------------------------------------------------

def _live_prepared(migration: Migration, **_: Any) -> None:
    if migration.status == S.CANCELLING:
        live_failed(migration, status=S.CANCELLED, error="aborted on request before it started",
                    values={})
        return
    migration_save(migration, status=S.QUEUED)
    step_send(migration.source_host, contract.COMPUTE_LIVE_MIGRATION, **step_ids(migration),
              dest_host=migration.dest_host.name, migration_uri=migration.migration_uri,
              migration_data_uri=migration.migration_data_uri or None,
              block_migration=bool(migration.block_migration), shared_storage=bool(migration.shared_storage),
              completion_timeout=migration.completion_timeout)


def _live_running(migration: Migration, **_: Any) -> None:
    """The job runs (reported once when it starts, and again with the event of a switch-over that
    paused the guest or that libvirt refused)."""
    started_at = migration.started_at or timezone.now()
    if migration.status == S.CANCELLING:
        migration_save(migration, started_at=started_at)
        abort_send(migration)  # the first abort may have arrived before the job started
        return
    if migration.status == S.RUNNING_POSTCOPY:  # a late report: post-copy cannot go back
        return
    migration_save(migration, status=S.RUNNING, started_at=started_at)


def _live_postcopy(migration: Migration, **_: Any) -> None:
    """Switched to post-copy: the guest runs on the destination now and can no longer be aborted (an
    abort asked for meanwhile has lost the race)."""
    migration_save(migration, status=S.RUNNING_POSTCOPY, started_at=migration.started_at or timezone.now())


def _close_force_complete(migration: Migration, result: str, outcome: str) -> None:
    """A force-complete still waiting when the migration ends (libvirt refused the switch-over so far,
    or the source never got the request) ends with it: its event must not stay open."""
    waiting = InstanceActionEvent.objects.filter(
        action_id=migration.action_id, event=contract.FORCE_COMPLETE_EVENT, finish_time__isnull=True)
    for event in waiting:
        event.finish_time, event.result = timezone.now(), result
        event.message = "; ".join(part for part in (event.message, f"not switched over: {outcome}") if part)
        event.save(update_fields=["finish_time", "result", "message"])


def live_migrated(migration: Migration, **_: Any) -> None:
    _close_force_complete(migration, ActionResult.SUCCESS, "the migration completed first")
    migration_save(migration, status=S.POST_MIGRATING)
    instance = migration.instance
    step_send(migration.dest_host, contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST, **step_ids(migration),
              spec=spawn_spec(instance, migration.dest_host.name))


def live_completed(migration: Migration, *, values: dict[str, Any], **_: Any) -> None:
    power_state = values.get("power_state") or PowerState.RUNNING
    instance = migration.instance
    changes = _landed(migration.dest_host, power_state, instance.vm_state)
    moving = instance_in_task(migration, TaskState.MIGRATING).filter(host=migration.source_host)
    if not _land(migration, moving, changes):
        log.warning("live migration %s completed but %s is no longer migrating", migration.pk, instance.uuid)
    release_source(migration)
    # The destination's final figures (libvirt's completed job) fill in what progress reports missed:
    # a quick migration may end before the first one.
    figures: dict[str, Any] = {"memory_remaining": 0,
                               "disk_remaining": 0 if migration.block_migration else migration.disk_remaining,
                               **_progress_values(values.get("progress"))}
    downtime = values.get("downtime_ms")
    if type(downtime) is int and downtime >= 0:
        figures["downtime_ms"] = downtime
    migration_save(migration, status=S.COMPLETED, finished_at=timezone.now(), **figures)
    seconds = (timezone.now() - (migration.started_at or migration.created)).total_seconds()
    migration_event(migration, "live_migration", ActionResult.SUCCESS,
                    f"{migration.source_host.name} -> {migration.dest_host.name} in {seconds:.1f} s", host="")
    migration_finish(migration, ActionResult.SUCCESS)


def live_failed(migration: Migration, *, status: str = S.FAILED, error: str = "",
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
    instance_in_task(migration, TaskState.MIGRATING).change(**changes)
    release_destination(migration)
    message = error or status
    migration_save(migration, status=status, error=message, finished_at=timezone.now())
    label = "cancelled" if status == S.CANCELLED else "failed"
    _close_force_complete(migration, ActionResult.ERROR, f"the migration {label}")
    migration_event(migration, "live_migration", ActionResult.ERROR, f"live migration {label}: {message}")
    if status == S.CANCELLED:
        migration_event(migration, "abort_live_migration", ActionResult.SUCCESS, message)
    migration_finish(migration, ActionResult.ERROR, f"live migration {label}: {message}")
    step_send(migration.dest_host, contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST, **step_ids(migration),
              shared_storage=bool(migration.shared_storage))


def _live_cancelled(migration: Migration, *, error: str, values: dict[str, Any], **_: Any) -> None:
    live_failed(migration, status=S.CANCELLED, error=error or "aborted on request", values=values)


def _live_source_failed(migration: Migration, *, error: str, values: dict[str, Any], **_: Any) -> None:
    live_failed(migration, status=S.FAILED, error=error, values=values)


def _live_dest_error(migration: Migration, *, error: str, values: dict[str, Any], **_: Any) -> None:
    if migration.status in (S.PREPARING, S.CANCELLING):
        live_failed(migration, status=S.ERROR, error=f"the destination could not prepare: {error}",
                    values={})
        return
    # post-migrating: libvirt said the domain moved, the destination disagrees. Tell what is known.
    power_state = values.get("power_state") or PowerState.NOSTATE
    instance = migration.instance
    if power_state != PowerState.NOSTATE:
        _land(migration, instance_in_task(migration, TaskState.MIGRATING),
              _landed(migration.dest_host, power_state, instance.vm_state))
        release_source(migration)
    else:
        instance_in_task(migration, TaskState.MIGRATING).change(
            task_state=None, vm_state=VmState.ERROR, power_state=PowerState.NOSTATE,
            fault={"message": f"live migration {migration.pk}: libvirt reported the domain moved to "
                                     f"{migration.dest_host.name}, but it does not run there: {error}",
                          "code": 500, "details": ""})
    migration_save(migration, status=S.ERROR, error=error, finished_at=timezone.now())
    migration_event(migration, "post_live_migration", ActionResult.ERROR, error)
    migration_finish(migration, ActionResult.ERROR, error)


def _rolled_back(migration: Migration, *, host: str, **_: Any) -> None:
    log.info("migration %s rolled back on %s", migration.pk, host)


LIVE_STEPS: dict[str, Step] = {
    contract.MIGRATION_PREPARED: Step((S.PREPARING, S.CANCELLING), Reporter.DEST, _live_prepared),
    contract.MIGRATION_RUNNING: Step(LIVE_JOB, Reporter.SOURCE, _live_running),
    contract.MIGRATION_RUNNING_POSTCOPY: Step(ACTIVE_LIVE, Reporter.SOURCE, _live_postcopy),
    contract.MIGRATION_MIGRATED: Step(LIVE_JOB, Reporter.SOURCE, live_migrated),
    contract.MIGRATION_CANCELLED: Step(ACTIVE_LIVE, Reporter.SOURCE, _live_cancelled),
    contract.MIGRATION_FAILED: Step(LIVE_JOB, Reporter.SOURCE, _live_source_failed),
    contract.MIGRATION_COMPLETED: Step((S.POST_MIGRATING,), Reporter.DEST, live_completed),
    contract.MIGRATION_ERROR: Step((S.PREPARING, S.CANCELLING, S.POST_MIGRATING), Reporter.DEST,
                                   _live_dest_error),
    contract.MIGRATION_ROLLED_BACK: Step((S.FAILED, S.CANCELLED, S.ERROR), Reporter.DEST, _rolled_back),
}


# Cold migration and resize steps -------------------------------------------------------------------

def _cold_prepared(migration: Migration, **_: Any) -> None:
    migration_save(migration, status=S.MIGRATING, started_at=timezone.now())
    instance_in_task(migration, TaskState.RESIZE_PREP).change(task_state=TaskState.RESIZE_MIGRATING)
    step_send(migration.source_host, contract.COMPUTE_RESIZE_INSTANCE, **step_ids(migration),
              dest_host=migration.dest_host.name, migration_uri=migration.migration_uri,
              timeout=settings.CLEAN_SHUTDOWN_TIMEOUT)


def _cold_failed(migration: Migration, *, error: str, values: dict[str, Any], host: str = "",
                 **_: Any) -> None:
    """Preparing or copying failed; the source put everything back: the server is where it was."""
    instance = migration.instance
    Instance.objects.filter(uuid=instance.uuid, task_state__in=(
        TaskState.RESIZE_PREP, TaskState.RESIZE_MIGRATING)).change(
        **_settled(values.get("power_state"), instance.vm_state))
    release_destination(migration)
    migration_save(migration, status=S.ERROR, error=error, finished_at=timezone.now())
    migration_event(migration, f"{migration.migration_type}", ActionResult.ERROR, error, host=host)
    migration_finish(migration, ActionResult.ERROR, error)


def _cold_migrated(migration: Migration, **_: Any) -> None:
    migration_save(migration, status=S.POST_MIGRATING)
    instance_in_task(migration, TaskState.RESIZE_MIGRATING).change(task_state=TaskState.RESIZE_FINISH)
    step_send(migration.dest_host, contract.COMPUTE_FINISH_RESIZE, **step_ids(migration),
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
    _land(migration, instance_in_task(migration, TaskState.RESIZE_FINISH),
          {**changes, **_apply_flavor(migration.new_flavor)})
    now = timezone.now()
    seconds = (now - (migration.started_at or migration.created)).total_seconds()
    where = f"{migration.source_host.name} -> {dest.name}"
    if resize:
        migration_save(migration, status=S.FINISHED, finished_at=now)
        migration_event(migration, "resize", ActionResult.SUCCESS, f"{where}, {migration.old_flavor.name} -> "
                                                        f"{migration.new_flavor.name} in {seconds:.1f} s; "
                                                        "waiting for confirm or revert")
        migration_finish(migration, ActionResult.SUCCESS)
        return
    # A cold migration confirms itself: the server is done, the source's copy is removed next.
    migration_event(migration, "migrate", ActionResult.SUCCESS, f"{where} in {seconds:.1f} s")
    migration_finish(migration, ActionResult.SUCCESS)
    migration_save(migration, finished_at=now)
    confirm_send(migration, None)


def _cold_finish_failed(migration: Migration, *, error: str, **_: Any) -> None:
    """The destination could not start the copy: go back to the source's disk, kept aside."""
    instance_in_task(migration, TaskState.RESIZE_FINISH).change(task_state=TaskState.RESIZE_REVERTING)
    migration_save(migration, error=f"the destination {migration.dest_host.name} could not finish: {error}")
    migration_event(migration, "finish_resize", ActionResult.ERROR,
                    f"{error}; reverting to {migration.source_host.name}")
    revert_send(migration, None)


def _confirmed(migration: Migration, **_: Any) -> None:
    release_source(migration)
    migration_save(migration, status=S.CONFIRMED)
    instance = Instance.objects.get(uuid=migration.instance_id)
    if instance.task_state == TaskState.RESIZE_CONFIRMING:
        Instance.objects.filter(uuid=instance.uuid, task_state=TaskState.RESIZE_CONFIRMING).change(
            task_state=None, vm_state=_vm_state_of(instance.power_state, VmState.ACTIVE))
        migration_event(migration, "confirm_resize", ActionResult.SUCCESS,
                        f"the old copy on {migration.source_host.name} is removed")
        migration_finish(migration, ActionResult.SUCCESS)


def confirm_failed(migration: Migration, *, error: str, **_: Any) -> None:
    instance = Instance.objects.get(uuid=migration.instance_id)
    migration_save(migration, status=S.ERROR,
                   error=f"confirm failed on {migration.source_host.name}: {error}")
    if instance.task_state == TaskState.RESIZE_CONFIRMING:
        Instance.objects.filter(uuid=instance.uuid, task_state=TaskState.RESIZE_CONFIRMING).change(
            task_state=None, vm_state=_vm_state_of(instance.power_state, VmState.ACTIVE))
        migration_finish(migration, ActionResult.ERROR, error)


def _reverted_dest(migration: Migration, **_: Any) -> None:
    step_send(migration.source_host, contract.COMPUTE_FINISH_REVERT_RESIZE, **step_ids(migration),
              spec=spawn_spec(migration.instance, migration.source_host.name, migration.old_flavor),
              power_on=migration.power_on)


def _reverted(migration: Migration, *, values: dict[str, Any], **_: Any) -> None:
    source = migration.source_host
    _land(migration, instance_in_task(migration, TaskState.RESIZE_REVERTING),
          {**_landed(source, _reported_or_expected(migration, values), VmState.ACTIVE),
           **_apply_flavor(migration.old_flavor)})
    release_destination(migration)
    failed = bool(migration.error)
    migration_save(migration, status=S.ERROR if failed else S.REVERTED, finished_at=timezone.now())
    migration_event(migration, "revert_resize", ActionResult.SUCCESS, f"back on {source.name} with flavor "
                                                           f"{migration.old_flavor.name}")
    migration_finish(migration, ActionResult.ERROR if failed else ActionResult.SUCCESS, migration.error)


def _revert_failed(migration: Migration, *, error: str, host: str, values: dict[str, Any], **_: Any) -> None:
    message = f"the revert failed on {host}: {error}"
    instance_in_task(migration, TaskState.RESIZE_REVERTING).change(
        task_state=None, vm_state=VmState.ERROR, power_state=values.get("power_state") or PowerState.NOSTATE,
        fault={"message": message, "code": 500, "details": ""})
    migration_save(migration, status=S.ERROR, error=message, finished_at=timezone.now())
    migration_event(migration, "revert_resize", ActionResult.ERROR, message, host=host)
    migration_finish(migration, ActionResult.ERROR, message)


def _cold_error(migration: Migration, **kwargs: Any) -> None:
    """"error" means different things at different steps."""
    by_status: dict[str, StepHandler] = {
        S.PREPARING: _cold_failed, S.MIGRATING: _cold_failed, S.POST_MIGRATING: _cold_finish_failed,
        S.CONFIRMING: confirm_failed, S.REVERTING: _revert_failed}
    by_status[S(migration.status)](migration, **kwargs)


COLD_STEPS: dict[str, Step] = {
    contract.MIGRATION_PREPARED: Step((S.PREPARING,), Reporter.DEST, _cold_prepared),
    contract.MIGRATION_MIGRATED: Step((S.MIGRATING,), Reporter.SOURCE, _cold_migrated),
    contract.MIGRATION_FINISHED: Step((S.POST_MIGRATING,), Reporter.DEST, _cold_finished),
    contract.MIGRATION_CONFIRMED: Step((S.CONFIRMING,), Reporter.SOURCE, _confirmed),
    contract.MIGRATION_REVERTED_DEST: Step((S.REVERTING,), Reporter.DEST, _reverted_dest),
    contract.MIGRATION_REVERTED: Step((S.REVERTING,), Reporter.SOURCE, _reverted),
    contract.MIGRATION_ERROR: Step((S.PREPARING, S.MIGRATING, S.POST_MIGRATING, S.CONFIRMING, S.REVERTING),
                                   Reporter.ANY, _cold_error),
}


# Evacuation steps ----------------------------------------------------------------------------------

def evacuation_rebuilt(migration: Migration, *, values: dict[str, Any], **_: Any) -> None:
    """The destination rebuilt the server: it is there now (host, zone, ports, allocation), the dead
    host's allocation is released, the migration ``done`` until the dead host removes its stale copy
    (at once if its worker runs again already, else when it starts: :mod:`cloudctl.compute.recovery`)."""
    source, dest = migration.source_host, migration.dest_host
    power_state = _reported_or_expected(migration, values)
    moving = instance_in_task(migration, TaskState.REBUILDING).filter(host=source)
    fallback = VmState.ACTIVE if migration.power_on else VmState.STOPPED
    now = timezone.now()
    if not _land(migration, moving, {**_landed(dest, power_state, fallback), "fault": None}):
        # Deleted meanwhile (its claims went with it): the domain built there is removed by the
        # destination's heartbeat reaping (a deleted server's domain).
        message = f"rebuilt on {dest.name}, but the server is no longer rebuilding there (deleted meanwhile?)"
        log.warning("evacuation %s: %s", migration.pk, message)
        release_destination(migration)
        migration_save(migration, status=S.ERROR, error=message, finished_at=now)
        migration_event(migration, "evacuate", ActionResult.ERROR, message, host=dest.name)
        migration_finish(migration, ActionResult.ERROR, message)
        return
    release_source(migration)
    migration_save(migration, status=S.DONE, finished_at=now)
    seconds = (now - (migration.started_at or migration.created)).total_seconds()
    how = "with its disk (shared storage)" if migration.shared_storage else "from its image"
    migration_event(migration, "evacuate", ActionResult.SUCCESS,
                    f"{source.name} -> {dest.name}, rebuilt {how} in {seconds:.1f} s", host=dest.name)
    migration_finish(migration, ActionResult.SUCCESS)
    if source.last_heartbeat is not None and source.last_heartbeat > now - timedelta(
            seconds=settings.SERVICE_DOWN_TIME):
        # Its worker runs again (its host_init came before this report): the copy goes now.
        step_send(source, contract.COMPUTE_DESTROY_EVACUATED, **step_ids(migration),
                  keep_disks=bool(migration.shared_storage))


def evacuation_failed(migration: Migration, error: str) -> None:
    """The rebuild did not happen: the destination's claim is released, the server stays on the dead
    host in ERROR with a fault that says what to do (evacuate it again, or delete it)."""
    source, dest = migration.source_host, migration.dest_host
    uuid = str(migration.instance_id)
    where = f"from {source.name} to {dest.name if dest else '?'}"
    message = (f"evacuation {migration.pk} {where} failed: {error}. The server is still on {source.name} "
               f"(down, fenced): evacuate it again (POST /api/v1/servers/{uuid}/evacuate/) once the cause "
               "is fixed, or delete it")
    release_destination(migration)
    if instance_in_task(migration, TaskState.REBUILDING).change(
            task_state=None, vm_state=VmState.ERROR, fault={"message": message, "code": 500, "details": ""}):
        server_ports_follow(uuid, VmState.ERROR)
    migration_save(migration, status=S.ERROR, error=error, finished_at=timezone.now())
    migration_event(migration, "evacuate", ActionResult.ERROR, message, host=dest.name if dest else "")
    migration_finish(migration, ActionResult.ERROR, message)


def _evacuation_error(migration: Migration, *, host: str, error: str, **_: Any) -> None:
    """"error" from the destination while rebuilding (the rebuild failed), or from the dead host once
    done (removing its stale copy failed: recorded; its next start tries again)."""
    if migration.status == S.REBUILDING and migration.dest_host and host == migration.dest_host.name:
        evacuation_failed(migration, f"{host} could not rebuild it: {error or 'no reason given'}")
    elif migration.status == S.DONE and migration.source_host and host == migration.source_host.name:
        migration_save(migration, error=f"removing the stale copy on {host} failed: {error}; tried again "
                                        "when its compute worker starts next")
        log.error("evacuation %s: removing the stale copy on %s failed: %s", migration.pk, host, error)
    else:
        log.info("dropped evacuation error from %s for migration %s (status %s)", host, migration.pk,
                 migration.status)


def _evacuation_source_cleaned(migration: Migration, *, host: str, **_: Any) -> None:
    migration_save(migration, status=S.COMPLETED)
    log.info("evacuation %s completed: %s removed its stale copy of %s", migration.pk, host,
             migration.instance_id)


def _late_rebuild(migration: Migration, status: str) -> None:
    """A "rebuilt" the migration no longer expects (it ended in error: reaped, say) left a domain on
    the destination for a server that is not there: it is removed (its disk kept on shared storage,
    where it is the server's only one), unless the server lives there or is being rebuilt there again."""
    dest = migration.dest_host
    if status != contract.MIGRATION_REBUILT or migration.status != S.ERROR or dest is None:
        return
    instance = Instance.objects.filter(uuid=migration.instance_id).values("host_id").first()
    again = Migration.objects.filter(instance_id=migration.instance_id, dest_host=dest,
                                     status__in=MIGRATION_IN_PROGRESS).exists()
    if instance is None or instance["host_id"] == dest.pk or again:
        return
    log.warning("evacuation %s: late rebuild on %s; removing the domain it left there", migration.pk,
                dest.name)
    step_send(dest, contract.COMPUTE_DESTROY_EVACUATED, **step_ids(migration),
              keep_disks=bool(migration.shared_storage))


EVACUATION_STEPS: dict[str, Step] = {
    contract.MIGRATION_REBUILT: Step((S.REBUILDING,), Reporter.DEST, evacuation_rebuilt),
    contract.MIGRATION_SOURCE_CLEANED: Step((S.DONE,), Reporter.SOURCE, _evacuation_source_cleaned),
    contract.MIGRATION_ERROR: Step((S.REBUILDING, S.DONE), Reporter.ANY, _evacuation_error),
}

STEPS: dict[str, dict[str, Step]] = {
    MigrationType.LIVE: LIVE_STEPS, MigrationType.COLD: COLD_STEPS, MigrationType.RESIZE: COLD_STEPS,
    MigrationType.EVACUATION: EVACUATION_STEPS,
}
