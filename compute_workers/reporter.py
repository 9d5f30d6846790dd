"""How the compute manager tells the conductor what happened.

The manager only knows :class:`Reporter`; production sends Celery tasks to the ``conductor`` queue by
name (the conductor's code is never imported here), each signed with its host's key
(:mod:`compute_workers.credentials`); tests keep the reports in a list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from compute_workers import contract, credentials

if TYPE_CHECKING:
    from celery import Celery


class Reporter(Protocol):
    def report(self, task_name: str, **kwargs: Any) -> None:
        """Send conductor task ``task_name`` with keyword arguments ``kwargs`` (plain JSON)."""


LOG = logging.getLogger(__name__)

# The key of a host by its name; None: this worker has no key for it (its reports go unsigned).
HostKeys = Callable[[str], "str | None"]


def one_host_key(host: str, key: str) -> HostKeys:
    """The keys of a worker serving ``host`` alone: ``key`` for it, nothing for any other name."""
    return lambda name: key if key and name == host else None


def derived_host_keys(secret: str) -> HostKeys:
    """Every host's first key derived from the control plane's CLOUDCTL_HOST_KEY_SECRET: for a fleet of
    simulated hosts run beside the control plane (benchmarks), never for a real host."""
    return lambda name: credentials.host_key(secret, name, credentials.FIRST_GENERATION)


class CeleryReporter:
    """Sends ``conductor.*`` tasks through the worker's Celery app, each on its conductor queue and
    signed with the key of the host it speaks for (its ``host`` argument): message headers
    ``cloudctl_host``, ``cloudctl_ts``, ``cloudctl_sig`` (see :func:`credentials.sign`)."""

    # A heartbeat older than this is worthless: a conductor catching up after an outage skips it.
    HEARTBEAT_EXPIRES = 60.0

    def __init__(self, app: Celery, keys: HostKeys | None = None) -> None:
        self.app = app
        self.keys: HostKeys = keys or (lambda name: None)
        self._unsigned_warned: set[str] = set()

    def report(self, task_name: str, **kwargs: Any) -> None:
        options: dict[str, Any] = {}
        if task_name == contract.CONDUCTOR_HOST_HEARTBEAT:
            options["expires"] = self.HEARTBEAT_EXPIRES
        headers = self.headers(task_name, kwargs)
        if headers:
            options["headers"] = headers
        self.app.send_task(task_name, kwargs=kwargs, queue=contract.conductor_queue(task_name),
                           **options)

    def headers(self, task_name: str, kwargs: Mapping[str, Any]) -> dict[str, str]:
        """The signature headers of a report (empty when there is no key for its host)."""
        host = kwargs.get("host")
        key = self.keys(host) if isinstance(host, str) else None
        if key is None:
            if str(host) not in self._unsigned_warned:
                self._unsigned_warned.add(str(host))
                LOG.warning("no host key for host %s (COMPUTE_HOST_KEY): its reports go unsigned and the "
                            "conductor drops them", host)
            return {}
        return credentials.sign(key, task_name, str(host), kwargs)


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
