"""Recovery: what a compute worker's restart interrupted, and what never reported back.

* ``host_init``: a compute worker (re)started. Its migrations are settled first (where each domain
  is now decides), then each of its servers: a build whose domain runs is completed, another is
  spawned again (a spawn is idempotent), a delete is sent again, a reboot
  or power change is repeated, a pause or suspend is rolled back to what the domain is (Nova's
  ``ComputeManager._init_instance``). The network node also gets every DHCP network and router again.
* The reapers (periodic, from beat): a task past its deadline ends in a truthful state (and an image
  upload that stopped receiving data ends killed), a migration step that did not report within
  MIGRATION_STEP_TIMEOUT ends from what the hosts last reported, and a resize left unconfirmed for
  RESIZE_CONFIRM_WINDOW is confirmed.

Every outcome is said on the server's action, so an operator can read what happened and why.
"""

from __future__ import annotations

import functools
import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cloudctl.compute import rpc, states
from cloudctl.compute.conductor import current_action, record_event
from cloudctl.compute.evacuation import evacuated_cleanup
from cloudctl.compute.migration_batches import batch_advance, migration_locked, waiting_batches
from cloudctl.compute.migration_preflight import RULES
from cloudctl.compute.migration_reports import (
    confirm_failed,
    evacuation_failed,
    evacuation_rebuilt,
    live_completed,
    live_failed,
    live_migrated,
)
from cloudctl.compute.migration_steps import (
    LIVE_JOB,
    abort_send,
    confirm_send,
    instance_in_task,
    migration_event,
    migration_finish,
    migration_save,
    step_ids,
    step_send,
)
from cloudctl.compute.models import Allocation, Host, Instance, Migration, MigrationType
from cloudctl.compute.models import MigrationStatus as S
from cloudctl.compute.services import action_start, finish_action, mark_deleted
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import VM_STATE_FOR_POWER_STATE, PowerState, TaskState, VmState
from cloudctl.compute.sync import complete_build, resend_once, sync_power_state
from cloudctl.database import DATABASE_ERRORS
from cloudctl.images.services import image_uploads_reap
from cloudctl.network import dhcp, hostsync, routers
from compute_workers import contract
from compute_workers.contract import ActionResult

log = logging.getLogger(__name__)


# --- A compute worker restarted --------------------------------------------------------------------

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
    """A compute worker (re)started: finish or repeat what its restart interrupted, then send it its
    network state."""
    record = Host.objects.filter(name=host).first()
    if record is not None:
        # Before anything else: the stale copies of the servers evacuated away while it was down go
        # (never started, never repeated: those servers are not on this host any more).
        evacuated_cleanup(host=record)
        try:
            migrations_recover(host=record, reported=reported)
        except DATABASE_ERRORS:
            raise  # the database is gone: the whole task is retried (DatabaseTask), not skipped
        except Exception:
            log.exception("recovering the migrations of %s after a worker restart failed", host)
    servers = (Instance.objects.select_related("host", "project", "flavor", "image")
               .filter(host__name=host).exclude(vm_state=VmState.DELETED))
    for instance in servers:
        power_state = reported.get(str(instance.uuid), PowerState.NOSTATE)
        try:
            _init_instance(instance, power_state)
        except DATABASE_ERRORS:
            raise  # not a bad row: every other would fail too; the task's retry recovers them all
        except Exception:  # one bad row must not stop the others from recovering
            log.exception("recovering %s on %s after a worker restart failed", instance.uuid, host)
    network_node_init(host=host)
    # The restarted worker converges its bridges, VXLAN peers and filtering to what is recorded now
    # (after the recovery above moved what it moves), whether or not it holds a port.
    hostsync.host_sync([host])


def network_node_init(*, host: str) -> None:
    """The network node's worker (re)started with nothing running: every DHCP server it runs
    (``NETWORK_DHCP_HOST``) and every router (``NETWORK_NODE_HOST``) is sent to it again."""
    if host == settings.NETWORK_DHCP_HOST:
        try:
            log.info("host %s runs DHCP: %d network(s) sent again", host, dhcp.dhcp_resync_all())
        except DATABASE_ERRORS:
            raise
        except Exception:
            log.exception("sending the DHCP networks to %s again failed", host)
    if host == settings.NETWORK_NODE_HOST:
        try:
            log.info("host %s runs the routers: %d sent again", host, routers.routers_resync_all())
        except DATABASE_ERRORS:
            raise
        except Exception:
            log.exception("sending the routers to %s again failed", host)


BUILD_COMPLETED_AT_RESTART = ("completed at the compute worker's restart: its domain runs, the spawn report "
                              "was lost with the worker")


def _init_instance(instance: Instance, power_state: str) -> None:
    host = instance.host.name if instance.host else ""
    uuid = str(instance.uuid)
    task = instance.task_state
    if task == TaskState.SPAWNING and power_state == PowerState.RUNNING:
        # The spawn finished (its domain runs) but its report died with the worker (kill -9 between
        # the domain's start and the report): complete it as the heartbeat would, not ERROR.
        if complete_build(uuid, host, BUILD_COMPLETED_AT_RESTART):
            return
        instance.refresh_from_db()
        task = instance.task_state
    if task == TaskState.SPAWNING:
        # No running domain: the spawn was cut short, or had not started (its task still waits in
        # the host's queue, consumed after this). A spawn is idempotent (it finds an existing domain
        # by name and starts it), so it is sent again rather than the build ended in ERROR: a worker
        # restarted while spawns were queued for it would otherwise fail them all and then run them
        # for servers in ERROR. INSTANCE_BUILD_TIMEOUT still bounds the build.
        record_event(uuid, event="init_instance", result=ActionResult.SUCCESS, host=host,
                     message=f"the compute worker on {host} restarted during the spawn (domain "
                             f"{power_state}); spawning again")
        rpc.cast(host, contract.COMPUTE_SPAWN, spec=spawn_spec(instance, host))
        return
    if task in (TaskState.SCHEDULING, TaskState.SPAWNING):
        message = (f"the build was interrupted by a restart of the compute worker on {host}; "
                   "delete this server and create it again")
        with transaction.atomic():
            if Instance.objects.filter(uuid=uuid, task_state=task).change(
                    vm_state=VmState.ERROR, task_state=None, power_state=power_state,
                    fault={"message": message, "code": 500, "details": ""}):
                record_event(uuid, event="init_instance", result=ActionResult.ERROR, host=host,
                             message=message)
                _finish_running_action(uuid, ActionResult.ERROR, message)
        return
    if task == TaskState.DELETING:
        record_event(uuid, event="init_instance", result=ActionResult.SUCCESS, host=host,
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
                record_event(uuid, event="init_instance", result=ActionResult.ERROR, host=host,
                             message=message)
                _finish_running_action(uuid, ActionResult.ERROR, message)
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
                finish_time=timezone.now(), result=ActionResult.ERROR,
                message=f"interrupted: the compute worker on {host} restarted")
        how = "hard reboot" if again == TaskState.REBOOTING_HARD else again.replace("_", " ")
        record_event(uuid, event="init_instance", result=ActionResult.SUCCESS, host=host,
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


def migrations_recover(*, host: Host, reported: dict[str, str]) -> int:
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
                                    status__in=LIVE_JOB)
    for pk in live.values_list("pk", flat=True):
        with transaction.atomic():
            migration = _locked(pk, LIVE_JOB)
            if migration is None:
                continue
            uuid = str(migration.instance_id)
            if uuid in reported and migration.status == S.RUNNING_POSTCOPY:
                # Past the point of no return: libvirt finishes the job without the worker. The
                # domain leaving (a later report) or the step timeout settles it.
                migration_event(migration, "init_instance", ActionResult.SUCCESS,
                                f"{reason}; the migration is in post-copy and cannot be aborted: libvirt "
                                "finishes it", host=host.name)
                continue
            if uuid in reported:
                abort_send(migration)
                live_failed(migration, status=S.FAILED, values={"power_state": reported[uuid]},
                            error=f"{reason}; the job was aborted and the server stays on {host.name}")
            else:
                migration_event(migration, "init_instance", ActionResult.SUCCESS,
                                f"{reason}; the domain left {host.name}: asking {migration.dest_host.name} "
                                "whether it runs there", host=host.name)
                live_migrated(migration)
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
    return migration_locked(pk, statuses)


def _cold_interrupted(migration: Migration, reason: str) -> None:
    uuid = str(migration.instance_id)
    source = migration.source_host.name
    message = (f"{migration.migration_type} {migration.pk} {reason}. The server's disk is on {source} in "
               f"INSTANCES_PATH/{uuid} or INSTANCES_PATH/{uuid}{contract.RESIZE_DIR_SUFFIX}; an operator "
               "must check it before resetting the state")
    Instance.objects.filter(uuid=uuid, task_state__in=(
        TaskState.RESIZE_PREP, TaskState.RESIZE_MIGRATING, TaskState.RESIZE_FINISH)).change(
        task_state=None, vm_state=VmState.ERROR, fault={"message": message, "code": 500, "details": ""})
    migration_save(migration, status=S.ERROR, error=message, finished_at=timezone.now())
    migration_event(migration, "init_instance", ActionResult.ERROR, message, host=source)
    migration_finish(migration, ActionResult.ERROR, message)


# --- Reapers ---------------------------------------------------------------------------------------

def resend_lost_schedules() -> int:
    """A server still scheduling BUILD_RESEND_AFTER after it was created lost its schedule_instance (a
    scheduler killed holding it: Redis gives an unacknowledged task back only after its visibility
    timeout): it is sent once more (:func:`cloudctl.compute.sync.resend_once`), rather than the server
    left in BUILD until INSTANCE_BUILD_TIMEOUT. Scheduling is idempotent: a late original finds the
    server placed and does nothing. Returns how many were sent."""
    cutoff = timezone.now() - timedelta(seconds=settings.BUILD_RESEND_AFTER)
    waiting = Instance.objects.filter(task_state=TaskState.SCHEDULING,
                                      task_state_since__lt=cutoff).values_list("uuid", flat=True)
    return sum(resend_once(str(uuid), "schedule_resent", host="", message=(
        f"still waiting for a host {settings.BUILD_RESEND_AFTER:g} s after the request (the scheduler's "
        "message was lost): scheduling sent again"),
        send=functools.partial(rpc.send_to_scheduler, contract.SCHEDULE_INSTANCE, instance_uuid=str(uuid)))
        for uuid in waiting)


def reap_expired_tasks() -> int:
    """End every task past its deadline in a truthful state, and say so on its action.

    Builds use INSTANCE_BUILD_TIMEOUT; every other task its TASK_DEADLINES entry. The truth comes
    from the host's last heartbeat when it is recent; a server on a host that is down, or whose
    domain the host did not report, ends in ERROR with a fault that says what is known. Image uploads
    (status saving) that received nothing for IMAGE_SAVING_DEADLINE end killed, with the reason.
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
    try:
        reaped += image_uploads_reap(now=now)
    except DATABASE_ERRORS:
        raise  # the task is retried; what was reaped above is committed and not reaped twice
    except Exception:  # the servers' reaping above stands whatever happens to the images'
        log.exception("reaping the stalled image uploads failed")
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
        read_at = host.reported_at or host.last_heartbeat
        if read_at is not None and read_at < instance.task_state_since:
            # The host's list was read before the task started. The server's own power state is
            # fresher: every report and heartbeat until then was applied to it (the sync ignores
            # what is older), and the list may even predate the last change (read while a spawn
            # still had the domain paused at its start). So it is the last truth there is.
            power_state, source = instance.power_state, "the domain was last known"
        elif uuid in reported:
            power_state, source = reported[uuid], "the host last reported the domain"
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
        record_event(uuid, event="task_deadline_exceeded", result=ActionResult.ERROR,
                     host=host.name if host else "", message=message)
        _finish_running_action(uuid, ActionResult.ERROR, message)
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


def checking_deadline() -> int:
    """Seconds a migration may stay ``checking``: every candidate's two pre-flight calls, and a step
    timeout's margin for the scheduler's worker to pick the task up."""
    return int(settings.MIGRATION_PRECHECK_TIMEOUT * 2 * settings.MIGRATION_MAX_ATTEMPTS
               + settings.MIGRATION_STEP_TIMEOUT)


def reap_stuck_migrations() -> int:
    """End migrations whose step did not report within MIGRATION_STEP_TIMEOUT (a running live
    migration: within its completion timeout plus that), from what the hosts last reported; and
    migrations whose pre-flight checks never ended (:func:`checking_deadline`: the scheduler's worker
    was down, say). A host evacuation's batch with room and migrations waiting (an end that did not
    start the next, which should not happen) is moved on: a waiting migration is never reaped."""
    now = timezone.now()
    step = timedelta(seconds=settings.MIGRATION_STEP_TIMEOUT)
    reaped = _reap_checking(now)
    for batch in waiting_batches():
        with transaction.atomic():
            if batch_advance(batch):
                log.warning("host evacuation batch %s had room and migrations waiting: moved on", batch)
    stuck = Migration.objects.filter(status__in=(S.PREPARING, S.QUEUED, S.RUNNING, S.RUNNING_POSTCOPY,
                                                 S.CANCELLING, S.MIGRATING, S.POST_MIGRATING, S.CONFIRMING,
                                                 S.REVERTING, S.REBUILDING), updated__lt=now - step)
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


def _reap_checking(now: datetime) -> int:
    deadline = checking_deadline()
    reaped = 0
    stuck = Migration.objects.filter(status=S.CHECKING, updated__lt=now - timedelta(seconds=deadline))
    for pk in stuck.values_list("pk", flat=True):
        with transaction.atomic():
            migration = _locked(pk, (S.CHECKING,))
            if migration is None or migration.updated >= now - timedelta(seconds=deadline):
                continue
            message = (f"{migration.migration_type} {migration.pk}: the pre-flight checks did not end within "
                       f"{deadline} s (is the scheduler's worker running?); nothing was changed, the "
                       "server is as it was")
            task = RULES[migration.migration_type].to_task_state
            instance_in_task(migration, task).filter(host_id=migration.source_host_id).change(task_state=None)
            migration_save(migration, status=S.ERROR, error=message, finished_at=now)
            migration_event(migration, "preflight_checks", ActionResult.ERROR, message)
            migration_finish(migration, ActionResult.ERROR, message)
            reaped += 1
    return reaped


def _reported(host: Host | None, uuid: str) -> str | None:
    if host is None or not host.is_up:
        return None
    return (host.reported_instances or {}).get(uuid)


def _reap_migration(migration: Migration, late: str) -> None:
    uuid = str(migration.instance_id)
    if migration.migration_type == MigrationType.EVACUATION:
        _reap_evacuation(migration, late)
        return
    if migration.migration_type == MigrationType.LIVE:
        on_dest, on_source = _reported(migration.dest_host, uuid), _reported(migration.source_host, uuid)
        if migration.status in (S.PREPARING, S.QUEUED, S.CANCELLING, S.RUNNING) and on_source:
            abort_send(migration)
            live_failed(migration, status=S.FAILED, values={"power_state": on_source},
                        error=f"{late}; the domain is still on {migration.source_host.name}: aborted")
            return
        if on_dest and not on_source:
            migration_event(migration, "migration_deadline", ActionResult.SUCCESS,
                            f"{late}; {migration.dest_host.name} reports the domain {on_dest}")
            live_completed(migration, values={"power_state": on_dest})
            return
        message = f"{late}; neither host reports the domain where expected"
        instance_in_task(migration, TaskState.MIGRATING).change(
            task_state=None, vm_state=VmState.ERROR, fault={"message": message, "code": 500, "details": ""})
        migration_save(migration, status=S.ERROR, error=message, finished_at=timezone.now())
        migration_finish(migration, ActionResult.ERROR, message)
        return
    if migration.status in (S.CONFIRMING,):
        confirm_failed(migration, error=late)
        return
    _cold_interrupted(migration, late)


def _reap_evacuation(migration: Migration, late: str) -> None:
    """A rebuild that did not report: done if the destination's heartbeat shows the domain, else it
    ends in error (the server in ERROR on the dead host, to evacuate again) and whatever the
    destination built is removed (its disk kept on shared storage: the server's only one)."""
    dest = migration.dest_host
    on_dest = _reported(dest, str(migration.instance_id))
    if on_dest:
        migration_event(migration, "migration_deadline", ActionResult.SUCCESS,
                        f"{late}; {dest.name if dest else '?'} reports the domain {on_dest}")
        evacuation_rebuilt(migration, values={"power_state": on_dest})
        return
    evacuation_failed(migration, f"{late}; the destination does not report the domain")
    if dest is not None and dest.is_up:
        step_send(dest, contract.COMPUTE_DESTROY_EVACUATED, **step_ids(migration),
                  keep_disks=bool(migration.shared_storage))


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
            action.events.create(event="auto_confirm_resize", result=ActionResult.SUCCESS, start_time=now,
                                 finish_time=now, message=f"not confirmed within RESIZE_CONFIRM_WINDOW "
                                                          f"({window} s): confirmed automatically")
            confirm_send(migration, action)
        confirmed += 1
    return confirmed
