"""The compute tasks: thin wrappers that call one :class:`ComputeManager` method each.

Names come from :mod:`compute_workers.contract`; the time limits from :class:`ComputeConfig`
(declared for Celery; the threads pool does not enforce them, the manager bounds its own waits).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from compute_workers import contract
from compute_workers.manager import ComputeManager


def register_tasks(app: Celery, manager: ComputeManager) -> None:
    """Register every compute task of the contract on ``app``, bound to ``manager``."""
    limits = {name: {"soft_time_limit": soft, "time_limit": hard}
              for name, soft, hard in manager.config.time_limits()}

    @app.task(name=contract.COMPUTE_SPAWN, shared=False, ignore_result=True,
              **limits[contract.COMPUTE_SPAWN])
    def spawn(spec: dict[str, Any]) -> None:
        manager.spawn(spec)

    @app.task(name=contract.COMPUTE_TERMINATE, shared=False, ignore_result=True,
              **limits[contract.COMPUTE_TERMINATE])
    def terminate(instance_uuid: str) -> None:
        manager.terminate(instance_uuid)

    @app.task(name=contract.COMPUTE_CONSOLE_OUTPUT, shared=False, ignore_result=False,
              **limits[contract.COMPUTE_CONSOLE_OUTPUT])
    def get_console_output(instance_uuid: str, lines: int | None = None) -> dict[str, str]:
        return manager.get_console_output(instance_uuid, lines)

    # Lifecycle: fire-and-forget like spawn; the outcome goes to the conductor.
    lifecycle = {"shared": False, "ignore_result": True}

    @app.task(name=contract.COMPUTE_REBOOT, **lifecycle, **limits[contract.COMPUTE_REBOOT])
    def reboot_instance(instance_uuid: str, action_id: int | None, reboot_type: str,
                        spec: dict[str, Any] | None = None) -> None:
        manager.reboot_instance(instance_uuid, action_id, reboot_type, spec)

    @app.task(name=contract.COMPUTE_POWER_OFF, **lifecycle, **limits[contract.COMPUTE_POWER_OFF])
    def power_off_instance(instance_uuid: str, action_id: int | None, timeout: float | None = None) -> None:
        manager.power_off_instance(instance_uuid, action_id, timeout)

    @app.task(name=contract.COMPUTE_POWER_ON, **lifecycle, **limits[contract.COMPUTE_POWER_ON])
    def power_on_instance(instance_uuid: str, action_id: int | None,
                          spec: dict[str, Any] | None = None) -> None:
        manager.power_on_instance(instance_uuid, action_id, spec)

    @app.task(name=contract.COMPUTE_PAUSE, **lifecycle, **limits[contract.COMPUTE_PAUSE])
    def pause_instance(instance_uuid: str, action_id: int | None) -> None:
        manager.pause_instance(instance_uuid, action_id)

    @app.task(name=contract.COMPUTE_UNPAUSE, **lifecycle, **limits[contract.COMPUTE_UNPAUSE])
    def unpause_instance(instance_uuid: str, action_id: int | None) -> None:
        manager.unpause_instance(instance_uuid, action_id)

    @app.task(name=contract.COMPUTE_SUSPEND, **lifecycle, **limits[contract.COMPUTE_SUSPEND])
    def suspend_instance(instance_uuid: str, action_id: int | None) -> None:
        manager.suspend_instance(instance_uuid, action_id)

    @app.task(name=contract.COMPUTE_RESUME, **lifecycle, **limits[contract.COMPUTE_RESUME])
    def resume_instance(instance_uuid: str, action_id: int | None) -> None:
        manager.resume_instance(instance_uuid, action_id)
