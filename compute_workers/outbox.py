"""The report outbox: reports the broker did not take, kept on the host's disk until it does.

A compute worker's report (``conductor.instance_update`` and its siblings) is the only way the
control plane learns what the hypervisor did; a report lost while Redis restarts leaves a server in
BUILD (or any task state) although its domain runs. So :class:`~compute_workers.reporter.CeleryReporter`
appends a report it cannot publish here, and sends the outbox again, oldest first, as soon as the
broker answers (:class:`OutboxSender`, woken at once by a heartbeat that got through). While the
outbox holds anything, new reports queue behind it: reports keep their order.

Layout: ``INSTANCES_PATH/_reports/<host>/<sequence>.json``, one file per report, ``{"task", "kwargs",
"queued_at"}``. Each is written whole to a hidden temporary file, fsync'd, renamed into place and its
directory fsync'd: a crash leaves either the complete report or none, and a restarted worker finds
the outbox and sends it (before its ``host_init``, so the conductor's restart handling sees the
reports first). A file is removed only after the broker took its report; a crash between the two
sends the report twice, which the conductor drops as stale (every report is a compare-and-swap).

No signature is stored: a report is signed when it is published, so one sent late still passes the
conductor's ``REPORT_MAX_SKEW`` check; the times inside a report (``observed_at``) stay the original
ones.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compute_workers.durable import replace_durably

LOG = logging.getLogger(__name__)

OUTBOX_DIR = "_reports"
_SUFFIX = ".json"


@dataclass(frozen=True)
class PendingReport:
    path: Path
    sequence: int
    task: str
    kwargs: dict[str, Any]
    queued_at: float


class Outbox:
    """The reports waiting for the broker, in the order they were appended. Thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._next = max((sequence for sequence, _ in self._files()), default=0) + 1

    @classmethod
    def under(cls, instances_path: Path, name: str) -> Outbox:
        """The outbox of worker ``name`` (its host) whose INSTANCES_PATH is ``instances_path``: its own
        directory, so workers that share an INSTANCES_PATH (tests) never send each other's reports."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid outbox name {name!r}")
        return cls(instances_path / OUTBOX_DIR / name)

    def _files(self) -> list[tuple[int, Path]]:
        found = []
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    stem = entry.name.removesuffix(_SUFFIX)
                    if entry.name.endswith(_SUFFIX) and stem.isdigit():
                        found.append((int(stem), Path(entry.path)))
        except FileNotFoundError:  # made by the first report kept
            return []
        return sorted(found)

    def append(self, task: str, kwargs: dict[str, Any]) -> Path:
        """Keep report ``task(**kwargs)`` durably; returns its file. Raises TypeError/ValueError for
        kwargs that are not JSON (they could never be sent either), OSError when the disk fails."""
        data = json.dumps({"task": task, "kwargs": kwargs, "queued_at": time.time()},
                          separators=(",", ":")).encode()
        with self._lock:  # the file of sequence n is in place before n+1 is written: order holds
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            sequence = self._next
            path = self.directory / f"{sequence:012d}{_SUFFIX}"
            replace_durably(path, data)
            self._next = sequence + 1
        return path

    def pending(self) -> list[PendingReport]:
        """Every report waiting, oldest first. A file that is not a report (cannot happen with files
        renamed into place whole; a hand edit) is renamed ``*.bad`` and logged, never sent."""
        reports = []
        for sequence, path in self._files():
            try:
                record = json.loads(path.read_bytes())
                task, kwargs = record["task"], record["kwargs"]
                if not isinstance(task, str) or not isinstance(kwargs, dict):
                    raise ValueError("task must be a string and kwargs an object")
            except FileNotFoundError:
                continue  # sent and removed meanwhile
            except (ValueError, KeyError, TypeError) as exc:
                LOG.error("report outbox: %s is not a report (%s); set aside as %s.bad", path, exc, path.name)
                path.rename(path.with_name(path.name + ".bad"))
                continue
            reports.append(PendingReport(path, sequence, task, kwargs, float(record.get("queued_at", 0))))
        return reports

    def remove(self, report: PendingReport) -> None:
        report.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._files())

    def empty(self) -> bool:
        return not self._files()


class OutboxSender(threading.Thread):
    """Sends the outbox (``flush``: raises when the broker does not take a report) whenever it holds
    anything: at once when woken (:meth:`wake`: a report was appended, a heartbeat got through), else
    again after a backoff that doubles from ``min_delay`` to ``max_delay`` while the broker stays
    away. Stops with :meth:`stop`."""

    def __init__(self, outbox: Outbox, flush: Callable[[], int], *, min_delay: float = 0.5,
                 max_delay: float = 5.0, idle_poll: float = 30.0) -> None:
        super().__init__(name="report-outbox", daemon=True)
        self.outbox = outbox
        self.flush = flush
        self.min_delay, self.max_delay, self.idle_poll = min_delay, max_delay, idle_poll
        self._wake = threading.Event()
        self._stopping = False
        self.failing = False

    def wake(self) -> None:
        """Send now: the broker answers again (a heartbeat got through)."""
        self._wake.set()

    def nudge(self) -> None:
        """A report was appended: send it now, unless the broker is known away (the backoff runs)."""
        if not self.failing:
            self._wake.set()

    def run(self) -> None:
        delay = self.min_delay
        while not self._stopping:
            self._wake.clear()  # before looking: a wake from now on ends the wait below at once
            wait = self.idle_poll
            if not self.outbox.empty():
                try:
                    sent = self.flush()
                except Exception as exc:
                    if not self.failing:
                        LOG.warning("report outbox: %d report(s) wait for the broker (%s); trying again "
                                    "with backoff", len(self.outbox), exc)
                    self.failing = True
                    wait, delay = delay, min(delay * 2, self.max_delay)
                else:
                    if sent:
                        LOG.info("report outbox: %d report(s) sent", sent)
                    self.failing, delay = False, self.min_delay
                    if not self.outbox.empty():
                        continue  # appended while we sent
            self._wake.wait(wait)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self.is_alive():
            self.join(timeout)
