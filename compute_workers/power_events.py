"""Power-state updates: ``conductor.power_state_update`` whenever a domain changes lifecycle state.

The driver calls :meth:`PowerStateEvents.notify` from the hypervisor's event thread (libvirt's event
loop), which must never wait on the broker: notify only queues the instance uuid, and a sender thread
reads the power state from the hypervisor *when it sends* (so a burst of events ends in the state the
domain is in now, never in one inferred from an event) and reports it with ``observed_at`` =
``time.time()`` of that read. An instance already queued is not queued twice.

A failed read or send is logged and dropped: the heartbeat's ``instances`` reports every power state a
few seconds later anyway.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from compute_workers import contract
from compute_workers.exception import InstanceNotFound
from compute_workers.reporter import Reporter
from compute_workers.virt.driver import ComputeDriver

LOG = logging.getLogger(__name__)

_STOP = ""


class PowerStateEvents(threading.Thread):
    def __init__(self, host: str, driver: ComputeDriver, reporter: Reporter) -> None:
        super().__init__(name="power-state-events", daemon=True)
        self.host = host
        self.driver = driver
        self.reporter = reporter
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    def notify(self, instance_uuid: str) -> None:
        """The domain of ``instance_uuid`` changed. Never blocks."""
        with self._lock:
            if instance_uuid in self._pending:
                return
            self._pending.add(instance_uuid)
        self._queue.put(instance_uuid)

    def run(self) -> None:
        while True:
            instance_uuid = self._queue.get()
            if instance_uuid == _STOP:
                return
            with self._lock:
                self._pending.discard(instance_uuid)  # an event from now on queues it again
            try:
                self._send(instance_uuid)
            except Exception:
                LOG.exception("power state update of %s not sent", instance_uuid)

    def _send(self, instance_uuid: str) -> None:
        try:
            power_state = self.driver.get_info(instance_uuid)
        except InstanceNotFound:
            power_state = contract.POWER_NOSTATE  # undefined: deleted, or lost behind our back
        observed_at = time.time()
        LOG.info("instance %s is %s (lifecycle event)", instance_uuid, power_state)
        self.reporter.report(contract.CONDUCTOR_POWER_STATE_UPDATE, host=self.host,
                             instance_uuid=instance_uuid, power_state=power_state,
                             observed_at=observed_at)

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(_STOP)
        if self.is_alive():
            self.join(timeout)
