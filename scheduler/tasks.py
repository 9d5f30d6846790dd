"""The scheduler's Celery entry point (queue ``scheduler``): the tasks, by their stable names.

The rest of ``scheduler/`` is pure (host_state, filters, weighers, selection: snapshots in, a
choice out). Reading hosts, claiming and reporting are the control plane's
(:mod:`cloudctl.compute.placement`, :mod:`cloudctl.compute.scheduling`); this thin module is the
only one of ``scheduler/`` that imports ``cloudctl`` (the import-linter contract says so), and
nothing in ``cloudctl`` imports it: the control plane sends its tasks by name.
"""

from __future__ import annotations

from celery import shared_task

from cloudctl.compute import migration_preflight as preflight
from cloudctl.compute import placement, scheduling
from compute_workers import contract

# Fail at worker start, not at the first request, when the settings name an unknown plugin.
placement.enabled_filters()
placement.enabled_weighers()


@shared_task(name=contract.SCHEDULE_INSTANCE)
def schedule_instance(instance_uuid: str) -> str | None:
    return scheduling.schedule_instance(instance_uuid)


@shared_task(name=contract.MIGRATION_PREFLIGHT)
def migration_preflight(migration_id: int) -> str:
    """The pre-flight checks of a requested migration (blocking calls to two compute workers, up to
    MIGRATION_PRECHECK_TIMEOUT each per candidate): here, never on the conductor's queue, which must
    stay free for the hosts' reports."""
    return preflight.migration_preflight(migration_id)
