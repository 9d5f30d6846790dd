"""How the compute manager tells the conductor what happened.

The manager only knows :class:`Reporter`; production sends Celery tasks to the ``conductor`` queue by
name (the conductor's code is never imported here), each signed with its host's key
(:mod:`compute_workers.credentials`); tests keep the reports in a list.

Delivery: a report is published with a few short retries (:data:`CeleryReporter.RETRY_POLICY`); one
the broker still does not take is kept in the host's outbox (:mod:`compute_workers.outbox`) and sent
again, in order, as soon as the broker answers. Heartbeats, ``host_init``, ``host_stopping`` and
migration progress are not kept: a newer one supersedes them (``host_init`` is retried by its caller),
so they fail and the next one goes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from compute_workers import contract, credentials
from compute_workers.outbox import Outbox, OutboxSender

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
    # Celery's publish retry (kombu's ensure: reconnect, publish again): a broker blip of about a
    # second is ridden out in the calling thread; a longer outage sends the report to the outbox.
    RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.4}
    # Superseded by the next of their kind (or retried by their caller): never kept in the outbox.
    NOT_KEPT = frozenset({contract.CONDUCTOR_HOST_HEARTBEAT, contract.CONDUCTOR_HOST_INIT,
                          contract.CONDUCTOR_HOST_STOPPING, contract.CONDUCTOR_MIGRATION_PROGRESS})

    def __init__(self, app: Celery, keys: HostKeys | None = None, outbox: Outbox | None = None) -> None:
        self.app = app
        self.keys: HostKeys = keys or (lambda name: None)
        self._unsigned_warned: set[str] = set()
        self.outbox = outbox
        self._flushing = threading.Lock()
        self.sender = OutboxSender(outbox, self.flush) if outbox is not None else None

    def start(self) -> None:
        """Start sending the outbox in the background (what an earlier run left, and what the broker
        will not take from now on)."""
        if self.sender is not None and not self.sender.is_alive():
            self.sender.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self.sender is not None:
            self.sender.stop(timeout)

    def report(self, task_name: str, **kwargs: Any) -> None:
        """Publish report ``task_name``; when the broker does not take it (after the retries), keep it
        in the outbox (reports the outbox does not keep raise instead). While the outbox holds
        anything, a new report goes behind it, so reports keep their order."""
        if self.outbox is None or task_name in self.NOT_KEPT:
            self.publish(task_name, kwargs)
            if task_name == contract.CONDUCTOR_HOST_HEARTBEAT and self.sender is not None and \
                    self.outbox is not None and not self.outbox.empty():
                self.sender.wake()  # the broker answers again: send the outbox now
            return
        if self.outbox.empty():
            try:
                self.publish(task_name, kwargs)
                return
            except Exception as exc:
                LOG.warning("report %s of %s not sent (%s): kept in the outbox and sent when the broker "
                            "answers", task_name, kwargs.get("instance_uuid") or kwargs.get("host"), exc)
        self.outbox.append(task_name, kwargs)
        if self.sender is not None:
            self.sender.nudge()

    def flush(self) -> int:
        """Send the outbox, oldest first, each report signed now; returns how many were sent. Raises
        (leaving that report and those after it in the outbox) when the broker does not take one."""
        if self.outbox is None:
            return 0
        sent = 0
        with self._flushing:
            for pending in self.outbox.pending():
                self.publish(pending.task, pending.kwargs)
                self.outbox.remove(pending)
                sent += 1
        return sent

    def publish(self, task_name: str, kwargs: dict[str, Any]) -> None:
        """One ``send_task`` of report ``task_name``, signed now, with :data:`RETRY_POLICY`; raises
        when the broker does not take it."""
        options: dict[str, Any] = {}
        if task_name == contract.CONDUCTOR_HOST_HEARTBEAT:
            options["expires"] = self.HEARTBEAT_EXPIRES
        headers = self.headers(task_name, kwargs)
        if headers:
            options["headers"] = headers
        self.app.send_task(task_name, kwargs=kwargs, queue=contract.conductor_queue(task_name),
                           retry=True, retry_policy=self.RETRY_POLICY, **options)

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
