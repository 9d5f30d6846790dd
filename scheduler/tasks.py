"""Scheduler tasks (queue ``scheduler``): thin wrappers over scheduler.manager."""

from __future__ import annotations

from celery import shared_task

from compute_workers import contract
from scheduler import manager

# Fail at worker start, not at the first request, when the settings name an unknown plugin.
manager.enabled_filters()
manager.enabled_weighers()


@shared_task(name=contract.SCHEDULE_INSTANCE)
def schedule_instance(instance_uuid: str) -> str | None:
    return manager.schedule_instance(instance_uuid)
