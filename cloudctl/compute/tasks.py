"""Conductor tasks: thin wrappers that apply compute workers' reports through conductor services."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from cloudctl.compute import conductor
from compute_workers import contract


@shared_task(name=contract.CONDUCTOR_INSTANCE_UPDATE)
def instance_update(instance_uuid: str, host: str, expected_task_state: str | None,
                    values: dict[str, Any], event: dict[str, Any] | None = None,
                    fault: dict[str, Any] | None = None) -> bool:
    return conductor.instance_update(instance_uuid=instance_uuid, host=host,
                                     expected_task_state=expected_task_state, values=values,
                                     event=event, fault=fault)


@shared_task(name=contract.CONDUCTOR_BUILD_FAILED)
def build_failed(instance_uuid: str, host: str, fault: dict[str, Any], reschedule: bool) -> None:
    conductor.build_failed(instance_uuid=instance_uuid, host=host, fault=fault,
                           reschedule=reschedule)


@shared_task(name=contract.CONDUCTOR_INSTANCE_DESTROYED)
def instance_destroyed(instance_uuid: str, host: str) -> None:
    conductor.instance_destroyed(instance_uuid=instance_uuid, host=host)


@shared_task(name=contract.CONDUCTOR_HOST_HEARTBEAT, ignore_result=True)
def host_heartbeat(host: str, resources: dict[str, Any]) -> None:
    conductor.host_heartbeat(host=host, resources=resources)


@shared_task(name="conductor.reap_stuck_builds")
def reap_stuck_builds() -> int:
    return conductor.reap_stuck_builds()
