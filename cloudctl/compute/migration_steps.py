"""What the migration modules share: the statuses a live job runs in, recording a step's outcome
on the migration and its action, handing claims back, and sending the next step to a host.

Requests (:mod:`cloudctl.compute.migration_requests`) start migrations, the conductor applies the
hosts' reports (:mod:`cloudctl.compute.migration_reports`), and recovery
(:mod:`cloudctl.compute.recovery`) ends what a restart interrupted or nobody reported; all three
write a migration through these few functions.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from cloudctl.compute import rpc
from cloudctl.compute.conductor import record_event
from cloudctl.compute.migration_batches import ENDED, batch_advance
from cloudctl.compute.models import Allocation, Host, Instance, InstanceAction, Migration, MigrationType
from cloudctl.compute.models import MigrationStatus as S
from cloudctl.compute.ports import server_ports_migrating
from cloudctl.compute.services import finish_action
from compute_workers import contract

ACTIVE_LIVE = (S.QUEUED, S.RUNNING, S.CANCELLING)
# A libvirt job may run on the source: also once switched to post-copy (it can no longer be aborted).
LIVE_JOB = (*ACTIVE_LIVE, S.RUNNING_POSTCOPY)


def migration_save(migration: Migration, **values: Any) -> None:
    """Write ``values`` to the row (``updated`` too: the reaper measures silence from it) and the object.

    Every end of a migration is written here: the end of one of a host evacuation's migrations
    starts the next waiting one of its batch (the caller locked the row with
    :func:`cloudctl.compute.migration_batches.migration_locked`), and the end of a live migration
    ends its ports' ``migrating_to`` (landed: the binding moved there already; failed, cancelled,
    reaped: the destination lets them go), so both hosts' network states follow."""
    values.setdefault("updated", timezone.now())
    Migration.objects.filter(pk=migration.pk).update(**values)
    for key, value in values.items():
        setattr(migration, key, value)
    ended = values.get("status") in ENDED
    if ended and migration.migration_type == MigrationType.LIVE:
        server_ports_migrating(migration.instance_id, "")
    if migration.batch and ended:
        batch_advance(migration.batch)


def migration_event(migration: Migration, name: str, result: str, message: str, host: str = "") -> None:
    """A step on the action of the request that started the migration (not the server's newest)."""
    record_event(str(migration.instance_id), event=name, result=result, host=host, message=message,
                 action_id=migration.action_id)


def migration_finish(migration: Migration, result: str, message: str = "") -> None:
    """End the action of the request that started the migration."""
    action = InstanceAction.objects.filter(pk=migration.action_id).first()
    if action is not None:
        finish_action(action, result=result, message=message)


def release_destination(migration: Migration) -> None:
    """The move did not happen: the destination's claim goes, the source's is the server's again."""
    Allocation.objects.filter(instance_id=migration.instance_id, host=migration.dest_host,
                              migration__isnull=True).delete()
    Allocation.objects.filter(migration=migration).update(migration=None)


def release_source(migration: Migration) -> None:
    """The move is final: the source's claim, held by the migration, goes."""
    Allocation.objects.filter(migration=migration).delete()


def instance_in_task(migration: Migration, expected_task: str) -> QuerySet[Instance]:
    """The migrating server, only while in ``expected_task``: the compare-and-swap of each step."""
    return Instance.objects.filter(uuid=migration.instance_id, task_state=expected_task)


def step_send(host: Host | None, task: str, **kwargs: Any) -> None:
    """Send a step when the transaction commits. A step not started within MIGRATION_STEP_TIMEOUT
    is discarded by the worker (the reaper ends the migration): never a live migration starting hours
    later because Redis redelivered it after a worker died holding it."""
    if host is None:
        return
    name, expires = host.name, settings.MIGRATION_STEP_TIMEOUT
    transaction.on_commit(lambda: rpc.cast(name, task, expires=expires, **kwargs))


def step_ids(migration: Migration) -> dict[str, Any]:
    return {"instance_uuid": str(migration.instance_id), "migration_id": migration.pk}


def abort_send(migration: Migration) -> None:
    """Ask the source to abort its libvirt job (the outcome comes back as a report)."""
    step_send(migration.source_host, contract.COMPUTE_ABORT_LIVE_MIGRATION, **step_ids(migration))


def confirm_send(migration: Migration, action: InstanceAction | None) -> None:
    """Confirm a finished move: the source removes its copy."""
    _next_step(migration, action, S.CONFIRMING, migration.source_host, contract.COMPUTE_CONFIRM_RESIZE)


def revert_send(migration: Migration, action: InstanceAction | None) -> None:
    """Revert a finished move: the destination undoes its domain, then the source starts its copy."""
    _next_step(migration, action, S.REVERTING, migration.dest_host, contract.COMPUTE_REVERT_RESIZE)


def _next_step(migration: Migration, action: InstanceAction | None, status: str, host: Host | None,
               task: str) -> None:
    """Move the migration to ``status`` (under ``action`` when a request started it) and send ``task``."""
    Migration.objects.filter(pk=migration.pk).update(status=status, updated=timezone.now(),
                                                      **({"action": action} if action else {}))
    step_send(host, task, **step_ids(migration))
