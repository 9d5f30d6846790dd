"""Sending a migration to its pre-flight checks, and host evacuations throttled in batches.

A requested migration is ``checking`` until the scheduler's worker has run its pre-flight checks
(:mod:`cloudctl.compute.migration_preflight`, sent by task name). The migrations of one host
evacuation share a ``batch``: at most ``batch_limit`` of them are past ``accepted`` and in progress
at once, the others wait in ``accepted``. Whenever one ends (every end goes through
:func:`cloudctl.compute.migration_steps.migration_save`), :func:`batch_advance` sends the next.

Locks: a change of a batch's migration locks all of the batch's rows first, in id order
(:func:`migration_locked`), then works on its own. Two endings of one batch (or an ending and an
abort) therefore queue instead of each holding its own row while waiting for the other's, and
never start the same waiting migration twice.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from cloudctl.compute import rpc
from cloudctl.compute.models import MIGRATION_IN_PROGRESS, Migration
from cloudctl.compute.models import MigrationStatus as S
from compute_workers import contract

# Statuses a migration can no longer leave: its batch's next one may start.
ENDED: tuple[str, ...] = tuple(status for status in S.values if status not in MIGRATION_IN_PROGRESS)


def migration_locked(pk: int, statuses: tuple[str, ...] | None = None) -> Migration | None:
    """Within the caller's transaction: the migration, row locked, if its status is one of
    ``statuses`` (any when None); its batch's rows are locked first (see the module's docstring)."""
    batch = Migration.objects.filter(pk=pk).values_list("batch", flat=True).first()
    if batch:
        list(Migration.objects.select_for_update().filter(batch=batch).order_by("pk")
             .values_list("pk", flat=True))
    found = (Migration.objects.select_for_update(of=("self",))
             .select_related("instance", "source_host", "dest_host", "old_flavor", "new_flavor")
             .filter(pk=pk))
    if statuses is not None:
        found = found.filter(status__in=statuses)
    return found.first()


def preflight_send(migration_id: int) -> None:
    """Ask the scheduler's worker for the pre-flight checks, when the transaction commits."""
    transaction.on_commit(lambda: rpc.send_to_scheduler(contract.MIGRATION_PREFLIGHT,
                                                        migration_id=migration_id))


def batch_advance(batch: str) -> list[int]:
    """Within the caller's transaction: move the batch's waiting migrations (oldest first) to
    ``checking`` and send their checks, as many as keep at most ``batch_limit`` past ``accepted``
    and in progress. Returns the ids started. Idempotent: nothing starts while the batch is full."""
    rows = list(Migration.objects.select_for_update().filter(batch=batch).order_by("pk")
                .values_list("pk", "status", "batch_limit"))
    if not rows:
        return []
    limit = max((row[2] or 1) for row in rows)
    running = sum(1 for _pk, status, _limit in rows
                  if status in MIGRATION_IN_PROGRESS and status != S.ACCEPTED)
    started: list[int] = []
    for pk, status, _limit in rows:
        if running + len(started) >= limit:
            break
        if status == S.ACCEPTED and Migration.objects.filter(pk=pk, status=S.ACCEPTED).update(
                status=S.CHECKING, updated=timezone.now()):
            preflight_send(pk)
            started.append(pk)
    return started


def waiting_batches() -> list[str]:
    """Batches with a migration waiting in ``accepted`` (the reaper makes sure each one moves)."""
    return list(Migration.objects.filter(status=S.ACCEPTED).exclude(batch="")
                .values_list("batch", flat=True).distinct())
