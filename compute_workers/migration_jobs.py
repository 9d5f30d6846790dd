"""The live migrations running in this worker, so that an abort or a switch-over reaches its migration.

``compute.abort_live_migration`` arrives on the host's queue while ``compute.live_migration`` runs in
another worker thread (the pool has COMPUTE_CONCURRENCY threads): it finds the migration here by its
``migration_id``, sets its abort flag and asks the hypervisor to abort the job; the thread monitoring
the migration sees the flag (and retries the abort while the hypervisor has no job to abort yet) and
reports "cancelled" once libvirt gave up.

An abort that arrives before its migration started (its task still queued behind another) is kept for
:data:`EARLY_ABORT_TTL` seconds: the migration, when it starts, finds it and is cancelled at once
instead of running.

``compute.live_migration_force_complete`` sets the job's switch-over flag in the same way; the monitor
switches the job over (post-copy, or pausing the guest) once libvirt shows it. One that finds no job
is only logged: switching over a migration that has not started means nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from compute_workers import contract
from compute_workers.exception import InstanceNotFound
from compute_workers.virt.driver import SWITCHED_TO_POST_COPY

LOG = logging.getLogger(__name__)

EARLY_ABORT_TTL = 600.0
# The monitor of a migration looks at its job this often (the first looks sooner: "running" is
# reported when libvirt shows the job) and reports its progress at most every PROGRESS_INTERVAL, so at
# least every PROGRESS_INTERVAL + POLL_INTERVAL (+ the time libvirt takes to answer) while it runs.
POLL_INTERVAL = 0.2
FIRST_POLL_INTERVAL = 0.05
PROGRESS_INTERVAL = 0.6
# A progress read slower than this is logged (libvirt 9.0 took up to 5 s to answer jobStats while a
# migration was setting up); the reports go on meanwhile, repeating the last answer with its time.
SLOW_ANSWER = 0.5
# An abort the hypervisor refuses (no job yet, a job past its point of no return) is retried this often;
# a migration still running ABORT_GRACE seconds after its abort was asked for is given up on.
ABORT_RETRY_INTERVAL = 1.0
ABORT_GRACE = 60.0
# A switch-over libvirt refused (asked for by compute.live_migration_force_complete, or by the completion
# timeout with COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION=force_complete) is tried again this often: QEMU
# refuses post-copy while a block migration still copies the disk.
SWITCH_OVER_RETRY_INTERVAL = 1.0
# The statuses of a step that did not do what it was asked (journaled with result "error").
FAILED_STATUSES = (contract.MIGRATION_ERROR, contract.MIGRATION_FAILED, contract.MIGRATION_CANCELLED)
# The destination's check asks the image API whether it would serve an image it has not cached.
IMAGE_CHECK_TIMEOUT = 10.0


@dataclasses.dataclass
class LiveMigrationJob:
    migration_id: int
    instance_uuid: str
    abort_requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: float = dataclasses.field(default_factory=time.monotonic)
    # Whether the hypervisor took an abort request (the monitor retries until it does).
    abort_sent: bool = False
    # compute.live_migration_force_complete asked for a switch-over the monitor has not tried yet.
    force_complete_requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    # How the job was switched over, once it was: "post-copy" (no abort possible any more) or "paused".
    switched: str | None = None
    # Guards abort_sent and switched: an abort and a switch-over never both reach the hypervisor.
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def in_post_copy(self) -> bool:
        return self.switched == SWITCHED_TO_POST_COPY


class LiveMigrationJobs:
    """migration_id -> the running :class:`LiveMigrationJob` of this worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[int, LiveMigrationJob] = {}
        self._early_aborts: dict[int, tuple[str, float]] = {}  # migration_id -> (uuid, monotonic)

    def start(self, migration_id: int, instance_uuid: str) -> LiveMigrationJob | None:
        """Register a new job; None when this migration already runs here (a redelivered task while
        the first still runs). The job's abort flag is already set when an abort came first."""
        with self._lock:
            if migration_id in self._jobs:
                return None
            job = LiveMigrationJob(migration_id, instance_uuid)
            early = self._early_aborts.pop(migration_id, None)
            if early is not None and early[0] == instance_uuid:
                job.abort_requested.set()
            self._jobs[migration_id] = job
            return job

    def finish(self, job: LiveMigrationJob) -> None:
        with self._lock:
            if self._jobs.get(job.migration_id) is job:
                del self._jobs[job.migration_id]

    def get(self, migration_id: int) -> LiveMigrationJob | None:
        with self._lock:
            return self._jobs.get(migration_id)

    def request_abort(self, migration_id: int, instance_uuid: str) -> LiveMigrationJob | None:
        """Set the abort flag of the running job of ``migration_id`` (if it is ``instance_uuid``'s) and
        return it; None when none runs (the request is then kept for a migration about to start)."""
        with self._lock:
            now = time.monotonic()
            for key, (_uuid, at) in list(self._early_aborts.items()):
                if now - at > EARLY_ABORT_TTL:
                    del self._early_aborts[key]
            job = self._jobs.get(migration_id)
            if job is None:
                self._early_aborts[migration_id] = (instance_uuid, now)
                return None
            if job.instance_uuid != instance_uuid:
                return None
            job.abort_requested.set()
            return job

    def request_force_complete(self, migration_id: int, instance_uuid: str) -> LiveMigrationJob | None:
        """Ask the running job of ``migration_id`` (if it is ``instance_uuid``'s) to switch over and
        return it; None when none runs (nothing is kept for later). A job already switched over is
        returned with nothing asked of it."""
        with self._lock:
            job = self._jobs.get(migration_id)
            if job is None or job.instance_uuid != instance_uuid:
                return None
            if job.switched is None:
                job.force_complete_requested.set()
            return job

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)


class ProgressThrottle:
    """Says when the next progress report is due: at most one per ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: float | None = None

    def due(self, now: float) -> bool:
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True


@dataclasses.dataclass
class MigrationMonitor:
    """What the monitor of one live migration saw and did."""

    ended: bool = False  # False: given up on ABORT_GRACE after the abort, outcome unknown
    running_reported: bool = False
    aborting: bool = False
    timed_out: bool = False  # aborted because its completion timeout passed
    why_aborted: str = ""
    # The completion timeout passed with COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION=force_complete: the job
    # is switched over (retried until libvirt takes it) instead of aborted.
    switch_over_on_timeout: bool = False
    # A force-complete came: the job is switched over, retried until libvirt takes it.
    switch_over_requested: bool = False
    switched_after: float | None = None  # seconds from the start of the monitor to the switch-over
    abort_ignored: bool = False  # an abort (request or timeout) came in post-copy and was logged
    switch_refusals: int = 0  # switch-overs libvirt refused
    progress_reports: int = 0
    last_progress: dict[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class Sample:
    """The last answer of the hypervisor about a migration job."""

    progress: dict[str, int] | None  # None: no job (not yet, or no more)
    observed_at: float  # time.time() of the answer
    gone: bool  # the domain is not on this host (any more)
    reads: int  # answers so far


class ProgressSampler(threading.Thread):
    """Reads a migration job's progress every ``interval`` seconds in a thread of its own, so that a
    hypervisor slow to answer delays neither the progress reports nor an abort: the monitor reports
    the latest :class:`Sample` (its ``observed_at`` says how old it is) and goes on without waiting.

    ``read`` returns the job's counters, None without a job, and raises InstanceNotFound when the
    domain left. Other errors are logged (once) and leave the latest sample as it was.
    """

    def __init__(self, read: Callable[[], dict[str, int] | None], interval: float, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._read = read
        self.interval = interval
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._sample: Sample | None = None
        self.failed = False

    def run(self) -> None:
        reads = 0
        while not self._stopped.is_set():
            asked = time.monotonic()
            try:
                progress, gone = self._read(), False
            except InstanceNotFound:
                progress, gone = None, True
            except Exception as exc:
                if not self.failed:
                    LOG.warning("%s: cannot read the migration's progress: %s", self.name, exc)
                self.failed = True
                self._stopped.wait(self.interval)
                continue
            answered = time.monotonic() - asked
            if answered > SLOW_ANSWER:
                LOG.warning("%s: the hypervisor took %.1f s to tell the migration's progress", self.name,
                            answered)
            reads += 1
            with self._lock:
                self._sample = Sample(progress, time.time(), gone, reads)
            self._stopped.wait(self.interval)

    def latest(self) -> Sample | None:
        with self._lock:
            return self._sample

    def stop(self) -> None:
        self._stopped.set()
