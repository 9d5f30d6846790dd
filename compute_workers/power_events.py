"""Power-state updates: ``conductor.power_state_update`` whenever a domain changes lifecycle state.

The driver calls the callback :meth:`PowerStateEvents.watch` gave it from the hypervisor's event thread
(libvirt's event loop), which must never wait on the broker: it only queues the host and instance uuid,
and a sender thread reads the power state from the hypervisor *when it sends* (so a burst of events
ends in the state the domain is in now, never in one inferred from an event) and reports it with
``observed_at`` = ``time.time()`` of that read. An instance already queued is not queued twice.

One sender thread serves one host (``python -m compute_workers``) or every simulated host of a fleet
(``python -m compute_workers.fleet``): a thousand hosts need no thousand threads.

A failed read or send is logged and dropped: the heartbeat's ``instances`` reports every power state a
few seconds later anyway.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time

from compute_workers import contract
from compute_workers.exception import InstanceNotFound
from compute_workers.reporter import Reporter
from compute_workers.virt.driver import ComputeDriver

LOG = logging.getLogger(__name__)

_STOP = ("", "")


class PowerStateEvents(threading.Thread):
    def __init__(self, reporter: Reporter) -> None:
        super().__init__(name="power-state-events", daemon=True)
        self.reporter = reporter
        self._drivers: dict[str, ComputeDriver] = {}
        self._queue: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._pending: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def watch(self, host: str, driver: ComputeDriver) -> None:
        """Report the lifecycle events of ``driver``'s domains as those of ``host``."""
        with self._lock:
            self._drivers[host] = driver
        driver.register_lifecycle_callback(functools.partial(self.notify, host))

    def unwatch(self, host: str) -> None:
        with self._lock:
            driver = self._drivers.pop(host, None)
        if driver is not None:
            driver.register_lifecycle_callback(None)

    def notify(self, host: str, instance_uuid: str) -> None:
        """The domain of ``instance_uuid`` on ``host`` changed. Never blocks."""
        key = (host, instance_uuid)
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        self._queue.put(key)

    def run(self) -> None:
        while True:
            key = self._queue.get()
            if key == _STOP:
                return
            with self._lock:
                self._pending.discard(key)  # an event from now on queues it again
                driver = self._drivers.get(key[0])
            if driver is None:
                continue  # the host stopped watching
            try:
                self._send(*key, driver)
            except Exception:
                LOG.exception("power state update of %s on %s not sent", key[1], key[0])

    def _send(self, host: str, instance_uuid: str, driver: ComputeDriver) -> None:
        try:
            power_state = driver.get_info(instance_uuid)
        except InstanceNotFound:
            power_state = contract.POWER_NOSTATE  # undefined: deleted, or lost behind our back
        observed_at = time.time()
        LOG.info("instance %s is %s on %s (lifecycle event)", instance_uuid, power_state, host)
        self.reporter.report(contract.CONDUCTOR_POWER_STATE_UPDATE, host=host,
                             instance_uuid=instance_uuid, power_state=power_state,
                             observed_at=observed_at)

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(_STOP)
        if self.is_alive():
            self.join(timeout)
