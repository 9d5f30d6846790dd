"""The compute tasks: thin wrappers that call one :class:`ComputeManager` method each.

Names come from :mod:`compute_workers.contract`; the time limits from :class:`ComputeConfig`
(declared for Celery; the threads pool does not enforce them, the manager bounds its own waits).

Which manager runs a task is asked of a :class:`Managers` for each task: a worker of one host always
answers its one manager (:class:`OneHost`); a fleet of simulated hosts answers the manager of the host
whose queue the task came from (:class:`compute_workers.fleet.Fleet`).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from celery import Celery, Task
from celery.app.task import Context

from compute_workers import contract
from compute_workers.config import ComputeConfig
from compute_workers.manager import ComputeManager

LOG = logging.getLogger(__name__)


class Managers(Protocol):
    """The manager that runs each task."""

    @property
    def config(self) -> ComputeConfig:
        """Settings every manager shares (the tasks' time limits)."""

    def for_task(self, request: Context, host: str | None = None) -> ComputeManager | None:
        """The manager of the task being run (``request`` is its Celery request: delivery info, id);
        ``host`` is the one the task's arguments name, if any (a spawn spec's). None: no host here."""


class OneHost:
    """The worker of one host: every task is its manager's."""

    def __init__(self, manager: ComputeManager) -> None:
        self.manager = manager

    @property
    def config(self) -> ComputeConfig:
        return self.manager.config

    def for_task(self, request: Context, host: str | None = None) -> ComputeManager:
        return self.manager


def _route(request: Context) -> str | None:
    delivery_info = getattr(request, "delivery_info", None) or {}
    return delivery_info.get("routing_key")


def register_tasks(app: Celery, managers: ComputeManager | Managers) -> None:
    """Register every compute task of the contract on ``app``, run by ``managers`` (a manager: that one
    for every task)."""
    if isinstance(managers, ComputeManager):
        managers = OneHost(managers)
    limits = {name: {"soft_time_limit": soft, "time_limit": hard}
              for name, soft, hard in managers.config.time_limits()}

    def manager_for(task: Task, host: str | None = None) -> ComputeManager | None:
        manager = managers.for_task(task.request, host)
        if manager is None:
            LOG.error("%s %s came with routing key %r, which is no queue of this worker's hosts; dropped",
                      task.name, task.request.id, _route(task.request))
        return manager

    # bind=True: the task's request tells which queue (hence which host) it came from.
    common = {"shared": False, "bind": True}

    @app.task(name=contract.COMPUTE_SPAWN, ignore_result=True, **common, **limits[contract.COMPUTE_SPAWN])
    def spawn(self: Task, spec: dict[str, Any]) -> None:
        host = spec.get("host") if isinstance(spec, dict) and isinstance(spec.get("host"), str) else None
        if manager := manager_for(self, host):
            manager.spawn(spec)

    @app.task(name=contract.COMPUTE_TERMINATE, ignore_result=True, **common,
              **limits[contract.COMPUTE_TERMINATE])
    def terminate(self: Task, instance_uuid: str) -> None:
        if manager := manager_for(self):
            manager.terminate(instance_uuid)

    @app.task(name=contract.COMPUTE_CONSOLE_OUTPUT, ignore_result=False, **common,
              **limits[contract.COMPUTE_CONSOLE_OUTPUT])
    def get_console_output(self: Task, instance_uuid: str, lines: int | None = None) -> dict[str, str]:
        if manager := manager_for(self):
            return manager.get_console_output(instance_uuid, lines)
        return {"error": "ConsoleUnavailable",
                "message": f"no host of this worker consumes the queue {_route(self.request)!r}"}

    # Cold migration and resize: fire-and-forget; each step reports conductor.migration_update.
    resize = {"ignore_result": True, **common}

    @app.task(name=contract.COMPUTE_PREP_RESIZE, **resize, **limits[contract.COMPUTE_PREP_RESIZE])
    def prep_resize(self: Task, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                    shared_marker: str | None = None) -> None:
        if manager := manager_for(self):
            manager.prep_resize(instance_uuid, migration_id, spec, shared_marker)

    @app.task(name=contract.COMPUTE_RESIZE_INSTANCE, **resize, **limits[contract.COMPUTE_RESIZE_INSTANCE])
    def resize_instance(self: Task, instance_uuid: str, migration_id: int, dest_host: str, migration_uri: str,
                        timeout: float | None = None) -> None:
        if manager := manager_for(self):
            manager.resize_instance(instance_uuid, migration_id, dest_host, migration_uri, timeout)

    @app.task(name=contract.COMPUTE_FINISH_RESIZE, **resize, **limits[contract.COMPUTE_FINISH_RESIZE])
    def finish_resize(self: Task, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                      power_on: bool = True) -> None:
        if manager := manager_for(self):
            manager.finish_resize(instance_uuid, migration_id, spec, power_on)

    @app.task(name=contract.COMPUTE_CONFIRM_RESIZE, **resize, **limits[contract.COMPUTE_CONFIRM_RESIZE])
    def confirm_resize(self: Task, instance_uuid: str, migration_id: int) -> None:
        if manager := manager_for(self):
            manager.confirm_resize(instance_uuid, migration_id)

    @app.task(name=contract.COMPUTE_REVERT_RESIZE, **resize, **limits[contract.COMPUTE_REVERT_RESIZE])
    def revert_resize(self: Task, instance_uuid: str, migration_id: int) -> None:
        if manager := manager_for(self):
            manager.revert_resize(instance_uuid, migration_id)

    @app.task(name=contract.COMPUTE_FINISH_REVERT_RESIZE, **resize,
              **limits[contract.COMPUTE_FINISH_REVERT_RESIZE])
    def finish_revert_resize(self: Task, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                             power_on: bool = True) -> None:
        if manager := manager_for(self):
            manager.finish_revert_resize(instance_uuid, migration_id, spec, power_on)

    # Lifecycle: fire-and-forget like spawn; the outcome goes to the conductor.
    lifecycle = {"ignore_result": True, **common}

    @app.task(name=contract.COMPUTE_REBOOT, **lifecycle, **limits[contract.COMPUTE_REBOOT])
    def reboot_instance(self: Task, instance_uuid: str, action_id: int | None, reboot_type: str,
                        spec: dict[str, Any] | None = None) -> None:
        if manager := manager_for(self):
            manager.reboot_instance(instance_uuid, action_id, reboot_type, spec)

    @app.task(name=contract.COMPUTE_POWER_OFF, **lifecycle, **limits[contract.COMPUTE_POWER_OFF])
    def power_off_instance(self: Task, instance_uuid: str, action_id: int | None,
                           timeout: float | None = None) -> None:
        if manager := manager_for(self):
            manager.power_off_instance(instance_uuid, action_id, timeout)

    @app.task(name=contract.COMPUTE_POWER_ON, **lifecycle, **limits[contract.COMPUTE_POWER_ON])
    def power_on_instance(self: Task, instance_uuid: str, action_id: int | None,
                          spec: dict[str, Any] | None = None) -> None:
        if manager := manager_for(self):
            manager.power_on_instance(instance_uuid, action_id, spec)

    @app.task(name=contract.COMPUTE_PAUSE, **lifecycle, **limits[contract.COMPUTE_PAUSE])
    def pause_instance(self: Task, instance_uuid: str, action_id: int | None) -> None:
        if manager := manager_for(self):
            manager.pause_instance(instance_uuid, action_id)

    @app.task(name=contract.COMPUTE_UNPAUSE, **lifecycle, **limits[contract.COMPUTE_UNPAUSE])
    def unpause_instance(self: Task, instance_uuid: str, action_id: int | None) -> None:
        if manager := manager_for(self):
            manager.unpause_instance(instance_uuid, action_id)

    @app.task(name=contract.COMPUTE_SUSPEND, **lifecycle, **limits[contract.COMPUTE_SUSPEND])
    def suspend_instance(self: Task, instance_uuid: str, action_id: int | None) -> None:
        if manager := manager_for(self):
            manager.suspend_instance(instance_uuid, action_id)

    @app.task(name=contract.COMPUTE_RESUME, **lifecycle, **limits[contract.COMPUTE_RESUME])
    def resume_instance(self: Task, instance_uuid: str, action_id: int | None) -> None:
        if manager := manager_for(self):
            manager.resume_instance(instance_uuid, action_id)

    @app.task(name=contract.COMPUTE_SNAPSHOT, **lifecycle, **limits[contract.COMPUTE_SNAPSHOT])
    def snapshot_instance(self: Task, instance_uuid: str, action_id: int | None, image_id: str,
                          upload_url: str, image_name: str = "") -> None:
        if manager := manager_for(self):
            manager.snapshot_instance(instance_uuid, action_id, image_id, upload_url, image_name)

    # Live migration. The checks are synchronous calls (the control plane waits on the result backend
    # with a timeout): they return their answer, like get_console_output. The steps report to the
    # conductor; compute.abort_live_migration runs in another worker thread while compute.live_migration
    # runs, and reaches it through the manager.

    def no_host(task: Task) -> dict[str, Any]:
        return {"ok": False, "check": "hypervisor",
                "message": f"no host of this worker consumes the queue {_route(task.request)!r}"}

    @app.task(name=contract.COMPUTE_CHECK_MIGRATE_DESTINATION, ignore_result=False, **common,
              **limits[contract.COMPUTE_CHECK_MIGRATE_DESTINATION])
    def check_can_migrate_destination(self: Task, instance_uuid: str, source_host: str,
                                      source_cpu_info: dict[str, Any] | None, image: dict[str, Any] | None,
                                      live: bool = True) -> dict[str, Any]:
        if manager := manager_for(self):
            return manager.check_can_migrate_destination(instance_uuid, source_host, source_cpu_info, image,
                                                         live)
        return no_host(self)

    @app.task(name=contract.COMPUTE_CHECK_MIGRATE_SOURCE, ignore_result=False, **common,
              **limits[contract.COMPUTE_CHECK_MIGRATE_SOURCE])
    def check_can_migrate_source(self: Task, instance_uuid: str,
                                 shared_marker: str | None = None) -> dict[str, Any]:
        if manager := manager_for(self):
            return manager.check_can_migrate_source(instance_uuid, shared_marker)
        return {**no_host(self), "check": "source"}

    migration_step = {"ignore_result": True, **common}

    @app.task(name=contract.COMPUTE_PRE_LIVE_MIGRATION, **migration_step,
              **limits[contract.COMPUTE_PRE_LIVE_MIGRATION])
    def pre_live_migration(self: Task, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                           block_migration: bool, shared_storage: bool,
                           shared_marker: str | None = None) -> None:
        if manager := manager_for(self):
            manager.pre_live_migration(instance_uuid, migration_id, spec, block_migration, shared_storage,
                                       shared_marker)

    @app.task(name=contract.COMPUTE_LIVE_MIGRATION, **migration_step,
              **limits[contract.COMPUTE_LIVE_MIGRATION])
    def live_migration(self: Task, instance_uuid: str, migration_id: int, dest_host: str, migration_uri: str,
                       migration_data_uri: str | None, block_migration: bool, shared_storage: bool,
                       completion_timeout: float | None = None) -> None:
        if manager := manager_for(self):
            manager.live_migration(instance_uuid, migration_id, dest_host, migration_uri, migration_data_uri,
                                   block_migration, shared_storage, completion_timeout)

    @app.task(name=contract.COMPUTE_ABORT_LIVE_MIGRATION, **migration_step,
              **limits[contract.COMPUTE_ABORT_LIVE_MIGRATION])
    def abort_live_migration(self: Task, instance_uuid: str, migration_id: int) -> None:
        if manager := manager_for(self):
            manager.abort_live_migration(instance_uuid, migration_id)

    @app.task(name=contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE, **migration_step,
              **limits[contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE])
    def live_migration_force_complete(self: Task, instance_uuid: str, migration_id: int) -> None:
        if manager := manager_for(self):
            manager.live_migration_force_complete(instance_uuid, migration_id)

    @app.task(name=contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST, **migration_step,
              **limits[contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST])
    def post_live_migration_at_destination(self: Task, instance_uuid: str, migration_id: int,
                                           spec: dict[str, Any]) -> None:
        if manager := manager_for(self):
            manager.post_live_migration_at_destination(instance_uuid, migration_id, spec)

    @app.task(name=contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST, **migration_step,
              **limits[contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST])
    def rollback_live_migration_at_destination(self: Task, instance_uuid: str, migration_id: int,
                                               shared_storage: bool) -> None:
        if manager := manager_for(self):
            manager.rollback_live_migration_at_destination(instance_uuid, migration_id, shared_storage)
