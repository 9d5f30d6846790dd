"""The heartbeat threads: ``conductor.host_heartbeat`` now, then every COMPUTE_HEARTBEAT_INTERVAL; and
the heartbeats of a fleet of simulated hosts, spread over their interval."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

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


class SpreadHeartbeat(threading.Thread):
    """Calls each of ``beats`` once every ``interval`` seconds, spread evenly over the interval: beat
    ``i`` of ``n`` at ``i * interval / n`` into each round (a fleet of 1,000 hosts sends one heartbeat
    every 10 ms, not 1,000 in the same millisecond), until :meth:`stop`.

    A round that takes longer than ``interval`` (a slow broker) is logged and the next one starts at
    once, spread again. Failures are logged once per round, not once per host.
    """

    def __init__(self, beats: Sequence[Callable[[], None]], interval: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.beats = list(beats)
        self.interval = interval
        self._stopping = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        step = self.interval / max(len(self.beats), 1)
        failing = False
        round_start = time.monotonic()
        while True:
            failed, first_error = 0, None
            for index, beat in enumerate(self.beats):
                delay = round_start + index * step - time.monotonic()
                if self._stopping.wait(max(delay, 0)):
                    return
                try:
                    beat()
                except Exception as exc:
                    failed += 1
                    first_error = first_error or exc
            self.rounds += 1
            if failed:
                LOG.log(logging.WARNING if failing else logging.ERROR,
                        "%d of %d heartbeats failed in this round, the first with: %r", failed,
                        len(self.beats), first_error)
            elif failing:
                LOG.info("heartbeats sent again")
            failing = bool(failed)
            round_start += self.interval
            late = time.monotonic() - round_start
            if late > step:  # behind by more than one beat: start the next round now
                LOG.warning("a round of %d heartbeats took %.1f s, longer than the interval (%g s)",
                            len(self.beats), self.interval + late, self.interval)
                round_start = time.monotonic()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout)
