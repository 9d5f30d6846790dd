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
    """Register spawn, terminate and get_console_output on ``app``, bound to ``manager``."""
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
