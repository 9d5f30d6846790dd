"""How the compute manager tells the conductor what happened.

The manager only knows :class:`Reporter`; production sends Celery tasks to the ``conductor`` queue by
name (the conductor's code is never imported here), tests keep the reports in a list.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

from compute_workers import contract

if TYPE_CHECKING:
    from celery import Celery


class Reporter(Protocol):
    def report(self, task_name: str, **kwargs: Any) -> None:
        """Send conductor task ``task_name`` with keyword arguments ``kwargs`` (plain JSON)."""


class CeleryReporter:
    """Sends ``conductor.*`` tasks through the worker's Celery app, each on its conductor queue."""

    # A heartbeat older than this is worthless: a conductor catching up after an outage skips it.
    HEARTBEAT_EXPIRES = 60.0

    def __init__(self, app: Celery) -> None:
        self.app = app

    def report(self, task_name: str, **kwargs: Any) -> None:
        options: dict[str, Any] = {}
        if task_name == contract.CONDUCTOR_HOST_HEARTBEAT:
            options["expires"] = self.HEARTBEAT_EXPIRES
        self.app.send_task(task_name, kwargs=kwargs, queue=contract.conductor_queue(task_name),
                           **options)


class ListReporter:
    """Keeps every report in :attr:`reports` as ``(task_name, kwargs)``; for tests and benchmarks."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def report(self, task_name: str, **kwargs: Any) -> None:
        with self._lock:
            self.reports.append((task_name, kwargs))

    def named(self, task_name: str) -> list[dict[str, Any]]:
        """The kwargs of every report of ``task_name``, in order."""
        with self._lock:
            return [kwargs for name, kwargs in self.reports if name == task_name]
