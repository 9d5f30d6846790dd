"""The heartbeat thread: ``conductor.host_heartbeat`` now, then every COMPUTE_HEARTBEAT_INTERVAL."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

LOG = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Calls ``beat`` at once and then every ``interval`` seconds until :meth:`stop`.

    A failing beat (broker away, libvirt restarting) is logged and the next one is tried on time.
    """

    def __init__(self, beat: Callable[[], None], interval: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.beat = beat
        self.interval = interval
        self._stopping = threading.Event()

    def run(self) -> None:
        failing = False
        while True:
            try:
                self.beat()
                if failing:
                    LOG.info("heartbeat sent again")
                failing = False
            except Exception as exc:
                if failing:
                    LOG.warning("heartbeat failed again: %s", exc)
                else:
                    LOG.exception("heartbeat failed")
                failing = True
            if self._stopping.wait(self.interval):
                return

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout)
