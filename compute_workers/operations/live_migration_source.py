"""The source's side of a live migration: the libvirt job run in a thread of its own, its monitor (progress
reports, the completion timeout, the abort, the switch-over) and the outcome reported.

Split from :mod:`compute_workers.operations.live_migration` for its size: it is the part that runs as
long as the migration does, while the family's other steps are short.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from compute_workers import contract, migration_jobs
from compute_workers.contract import EventResult
from compute_workers.exception import InstanceInvalidState, InstanceNotFound, PostCopyUnsupported
from compute_workers.migration_jobs import (
    LiveMigrationJob,
    MigrationMonitor,
    ProgressSampler,
    ProgressThrottle,
)
from compute_workers.operations.base import PAUSED, RUNNING, HostOperations, MiB

LOG = logging.getLogger(__name__)


class LiveMigrationSource(HostOperations):
    """Runs the live migrations of a host (one :meth:`migrate` per compute.live_migration task) and sends
    their aborts to the hypervisor."""

    def migrate(self, job: LiveMigrationJob, dest_host: str, migration_uri: str,
                      migration_data_uri: str | None, block_migration: bool, shared: bool,
                      timeout: float) -> None:
        instance_uuid, migration_id = job.instance_uuid, job.migration_id
        step, event = "live_migration", "compute_live_migration"
        route = f"instance {instance_uuid} from host {self.host} to host {dest_host}"

        def end(status: str, message: str, result: EventResult = EventResult.ERROR) -> None:
            LOG.warning("live migration %s: %s", migration_id, message)
            self.migration_done(migration_id, instance_uuid, step, status,
                                error=None if status == contract.MIGRATION_MIGRATED else message,
                                values=self.migration_values(instance_uuid),
                                event=self.event(event, result, message))

        try:
            state = self.driver.get_info(instance_uuid)
        except InstanceNotFound:
            self._live_migration_domain_gone(job, dest_host, migration_uri, shared)
            return
        except Exception as exc:
            end(contract.MIGRATION_FAILED, f"live migration of {route} failed: the hypervisor of host "
                                           f"{self.host} does not answer: {exc}")
            return
        if job.abort_requested.is_set():
            end(contract.MIGRATION_CANCELLED, f"live migration of {route} cancelled before it started",
                EventResult.CANCELLED)
            return
        if state not in (RUNNING, PAUSED):
            end(contract.MIGRATION_FAILED, f"live migration of {route} refused: the instance is {state} "
                                           f"there; only a running or paused instance can be live-migrated",
                EventResult.ERROR)
            return
        if self._running_job(instance_uuid):
            # libvirt still runs the migration of an earlier attempt whose worker died (a peer-to-peer
            # migration goes on without its caller): follow it to its end rather than fail beside it.
            LOG.warning("live migration %s: a migration job of %s already runs on host %s; following it",
                        migration_id, instance_uuid, self.host)
            monitor = self._monitor_live_migration(job, None, time.monotonic() + timeout, route)
            try:
                state = self.driver.get_info(instance_uuid)
            except InstanceNotFound:
                self._live_migration_domain_gone(job, dest_host, migration_uri, shared, followed=True)
                return
            except Exception as exc:
                end(contract.MIGRATION_FAILED, f"live migration of {route} failed: the hypervisor of host "
                                               f"{self.host} does not answer: {exc}")
                return
            if job.in_post_copy:
                failure = "the migration job an earlier attempt left running failed"
                end(contract.MIGRATION_FAILED, self._post_copy_failure(route, dest_host, failure))
                return
            if monitor.aborting or state not in (RUNNING, PAUSED):
                status = (contract.MIGRATION_CANCELLED if job.abort_requested.is_set()
                          and not monitor.timed_out else contract.MIGRATION_FAILED)
                end(status, f"live migration of {route}: the migration job an earlier attempt left ended "
                            f"({monitor.why_aborted or 'it failed'}); the instance is {state} there",
                    EventResult.CANCELLED if status == contract.MIGRATION_CANCELLED else EventResult.ERROR)
                return
            LOG.info("live migration %s: the earlier attempt's job failed; migrating again", migration_id)
        unsafe = shared and self.config.migration_unsafe
        post_copy = self.config.live_migration_permit_post_copy
        auto_converge = self.config.live_migration_permit_auto_converge and not post_copy  # as Nova
        outcome: dict[str, Any] = {}

        def migrate() -> None:
            try:
                self.driver.live_migration(instance_uuid, migration_uri, migration_data_uri, block_migration,
                                           unsafe=unsafe, bandwidth_mib=self.config.live_migration_bandwidth,
                                           post_copy=post_copy, auto_converge=auto_converge)
            except BaseException as exc:
                outcome["error"] = exc

        LOG.info("live migration %s: %s to %s (data %s; block migration %s, shared storage %s, unsafe %s, "
                 "bandwidth %s MiB/s, post-copy %s, auto-converge %s, completion timeout %g s, then %s)",
                 migration_id, route, migration_uri, migration_data_uri, block_migration, shared, unsafe,
                 self.config.live_migration_bandwidth or "default", post_copy, auto_converge, timeout,
                 self.config.live_migration_timeout_action)
        started = time.monotonic()
        thread = threading.Thread(target=migrate, name=f"live-migration-{migration_id}", daemon=True)
        thread.start()

        def ended(wait: float) -> bool:
            thread.join(wait)
            return not thread.is_alive()

        monitor = self._monitor_live_migration(job, ended, started + timeout, route)
        seconds = time.monotonic() - started
        if not monitor.ended:
            end(contract.MIGRATION_FAILED, f"live migration of {route} did not end within "
                                           f"{migration_jobs.ABORT_GRACE:g} s after libvirt was asked to "
                                           f"abort it ({monitor.why_aborted}); its outcome is unknown",
                EventResult.ERROR)
            return
        error = outcome.get("error")
        if error is None:
            self._live_migration_succeeded(job, dest_host, shared, seconds, monitor)
            return
        if job.in_post_copy:  # never resume the guest here: part of its memory is only on the destination
            failure = f"it failed after {seconds:.1f} s: {error}"
            end(contract.MIGRATION_FAILED, self._post_copy_failure(route, dest_host, failure))
            return
        self._resume_if_left_paused(instance_uuid, state)
        if job.abort_requested.is_set() and not monitor.timed_out:
            end(contract.MIGRATION_CANCELLED, f"live migration of {route} cancelled on request after "
                                              f"{seconds:.1f} s: {error}", EventResult.CANCELLED)
        elif monitor.timed_out:
            end(contract.MIGRATION_FAILED, f"live migration of {route} did not complete within its "
                                           f"completion timeout of {timeout:g} s and was aborted: {error}",
                EventResult.ERROR)
        elif isinstance(error, PostCopyUnsupported):
            end(contract.MIGRATION_FAILED, self._post_copy_unsupported(route, dest_host, error))
        else:
            end(contract.MIGRATION_FAILED, f"live migration of {route} failed after {seconds:.1f} s: "
                                           f"{self.failure_message(error)}")

    def _post_copy_failure(self, route: str, dest_host: str, what: str) -> str:
        return (f"live migration of {route} failed in post-copy ({what}): the guest's memory is split "
                f"between host {self.host} and host {dest_host}, so it can run on neither; its domain here "
                "is left as libvirt left it (restore the instance from a snapshot, or rebuild it)")

    def _post_copy_unsupported(self, route: str, dest_host: str, error: BaseException) -> str:
        """What to do when the destination's QEMU cannot do post-copy (it fails every migration)."""
        return (f"live migration of {route} failed as it started: {error}. Post-copy is permitted on host "
                f"{self.host} (COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY=1) but the QEMU of host {dest_host} "
                f"cannot do it without userfaultfd: run `sysctl vm.unprivileged_userfaultfd=1` on host "
                f"{dest_host} and every other host that receives migrations (and keep it in /etc/sysctl.d/), "
                "or run QEMU as root there, or set COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY=0 on the hosts "
                "that send them")

    def _running_job(self, instance_uuid: str) -> bool:
        try:
            return self.driver.live_migration_progress(instance_uuid) is not None
        except Exception:
            return False

    def _monitor_live_migration(self, job: LiveMigrationJob, ended: Callable[[float], bool] | None,
                                deadline: float, route: str) -> MigrationMonitor:
        """Until the migration ended (``ended(wait)`` waits at most ``wait`` seconds for it; None: a job
        this worker did not start, which ended when libvirt shows it no more): report "running" once
        libvirt shows the job, then its progress at least every second; abort it when asked or when
        ``deadline`` (monotonic) passed, and give up on it ABORT_GRACE seconds later
        (``monitor.ended`` False). Switch it over once libvirt shows it when asked, or at ``deadline``
        with COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION=force_complete (instead of the abort); in post-copy,
        aborts and the deadline are logged and ignored. libvirt is read by a :class:`ProgressSampler`:
        its slow answers delay neither the reports nor the abort nor the switch-over."""
        monitor = MigrationMonitor()
        started = time.monotonic()
        throttle = ProgressThrottle(migration_jobs.PROGRESS_INTERVAL)
        instance_uuid, migration_id = job.instance_uuid, job.migration_id
        sampler = ProgressSampler(lambda: self.driver.live_migration_progress(instance_uuid),
                                  migration_jobs.POLL_INTERVAL, f"live-migration-{migration_id}-progress")

        def job_ended(wait: float) -> bool:
            time.sleep(wait)
            sample = sampler.latest()
            return sample is not None and (sample.gone or sample.progress is None)

        wait_for_end = ended or job_ended
        abort_deadline: float | None = None
        next_abort_attempt = next_switch_attempt = 0.0
        sampler.start()
        try:
            while True:
                if wait_for_end(migration_jobs.POLL_INTERVAL if monitor.running_reported
                                else migration_jobs.FIRST_POLL_INTERVAL):
                    monitor.ended = True
                    break
                now = time.monotonic()
                if not monitor.aborting and (job.abort_requested.is_set() or now >= deadline):
                    requested = job.abort_requested.is_set()
                    if self._abort_due(job, monitor, route, requested):
                        monitor.aborting = True
                        monitor.timed_out = not requested
                        monitor.why_aborted = ("completion timeout passed" if monitor.timed_out
                                               else "cancelled on request")
                        abort_deadline = now + migration_jobs.ABORT_GRACE
                        if monitor.timed_out:
                            LOG.warning("live migration %s of %s: completion timeout passed; aborting it",
                                        migration_id, route)
                if monitor.aborting:
                    if abort_deadline is not None and now >= abort_deadline:
                        LOG.error("live migration %s: still running %g s after its abort; giving up on it",
                                  migration_id, migration_jobs.ABORT_GRACE)
                        break
                    if now >= next_abort_attempt:
                        next_abort_attempt = now + migration_jobs.ABORT_RETRY_INTERVAL
                        self.send_abort(job)
                sample = sampler.latest()
                if sample is None or sample.progress is None:
                    continue  # no job yet: nothing to report, nor to switch over (a pause would last)
                if not monitor.running_reported:
                    self._report_running(job, route)
                    monitor.running_reported = True
                if job.force_complete_requested.is_set():
                    job.force_complete_requested.clear()
                    if monitor.aborting:
                        LOG.info("live migration %s: switch-over requested while it is being aborted; "
                                 "ignored", migration_id)
                    elif job.switched is None and not monitor.switch_over_requested:
                        monitor.switch_over_requested = True
                        next_switch_attempt = now
                # Retried until libvirt takes it: it refuses post-copy while a block migration copies
                # the disk, and takes it once memory is being copied.
                if ((monitor.switch_over_requested or monitor.switch_over_on_timeout) and not monitor.aborting
                        and job.switched is None and now >= next_switch_attempt):
                    next_switch_attempt = now + migration_jobs.SWITCH_OVER_RETRY_INTERVAL
                    why = "as requested" if monitor.switch_over_requested else "its completion timeout passed"
                    self._switch_over(job, monitor, route, why, started)
                if throttle.due(time.monotonic()):
                    monitor.progress_reports += 1
                    monitor.last_progress = sample.progress
                    self.reporter.report(contract.CONDUCTOR_MIGRATION_PROGRESS, migration_id=migration_id,
                                         host=self.host,
                                         progress={**sample.progress, "observed_at": sample.observed_at})
        finally:
            sampler.stop()
        return monitor

    def _report_running(self, job: LiveMigrationJob, route: str) -> None:
        self.migration_update(job.migration_id, contract.MIGRATION_RUNNING, event=self.event(
            "compute_live_migration", EventResult.START, f"live migration of {route} started"))

    def _abort_due(self, job: LiveMigrationJob, monitor: MigrationMonitor, route: str,
                   requested: bool) -> bool:
        """An abort was ``requested``, or else the completion timeout passed: whether to abort the job.
        Not in post-copy (logged once), nor on a timeout whose action is a switch-over (noted in
        ``monitor.switch_over_on_timeout``, which the monitor acts on)."""
        if job.in_post_copy:
            if not monitor.abort_ignored:
                monitor.abort_ignored = True
                LOG.warning("live migration %s of %s: %s in post-copy, where it can no longer be aborted; "
                            "ignored, it goes on to its end", job.migration_id, route,
                            "abort requested" if requested else "completion timeout passed")
            return False
        if requested or self.config.live_migration_timeout_action != "force_complete":
            return True
        if not monitor.switch_over_on_timeout:
            monitor.switch_over_on_timeout = True
            LOG.warning("live migration %s of %s: completion timeout passed; switching it over instead of "
                        "aborting it (COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION=force_complete)",
                        job.migration_id, route)
        return False

    def _switch_over(self, job: LiveMigrationJob, monitor: MigrationMonitor, route: str, why: str,
                     started: float) -> None:
        """Switch the job over (post-copy when permitted, else pause the guest) and report it: status
        "running (post-copy)" or "running" with the event. When libvirt refuses, the job goes on and
        the monitor retries; the first refusal is reported ("running" with the event: "progress" for a
        request, whose event stays open until the switch-over; "error" for the timeout's)."""
        post_copy = self.config.live_migration_permit_post_copy
        seconds = time.monotonic() - started
        refusal: Exception | None = None
        with job.lock:
            if job.abort_sent:  # the abort task's thread was first
                return
            try:
                job.switched = self.driver.live_migration_force_complete(job.instance_uuid, post_copy)
            except InstanceNotFound:  # the migration completed meanwhile
                return
            except Exception as exc:
                refusal = exc
        if refusal is not None:
            monitor.switch_refusals += 1
            message = (f"cannot {'switch to post-copy' if post_copy else 'pause the guest'} on {self.host} "
                       f"yet after {seconds:.1f} s ({why}): {self.failure_message(refusal)}; the migration "
                       f"goes on and the switch-over is retried every "
                       f"{migration_jobs.SWITCH_OVER_RETRY_INTERVAL:g} s until libvirt takes it")
            if monitor.switch_refusals == 1:
                LOG.warning("live migration %s of %s: %s", job.migration_id, route, message)
                result = EventResult.PROGRESS if monitor.switch_over_requested else EventResult.ERROR
                self.migration_update(job.migration_id, contract.MIGRATION_RUNNING,
                                      event=self.event(contract.FORCE_COMPLETE_EVENT, result, message))
            return
        monitor.switched_after = seconds
        if job.in_post_copy:
            status = contract.MIGRATION_RUNNING_POSTCOPY
            message = (f"switched to post-copy on {self.host} after {seconds:.1f} s ({why}): the guest "
                       "runs on the destination now, which fetches the memory not copied yet; the migration "
                       "can no longer be aborted")
        else:
            status = contract.MIGRATION_RUNNING
            message = (f"paused the guest on {self.host} after {seconds:.1f} s ({why}) so that the migration "
                       "converges; libvirt resumes it on the destination")
        LOG.info("live migration %s of %s: %s", job.migration_id, route, message)
        self.migration_update(job.migration_id, status,
                              event=self.event(contract.FORCE_COMPLETE_EVENT, EventResult.SUCCESS, message))

    def send_abort(self, job: LiveMigrationJob) -> None:
        """Ask the hypervisor to abort the job, once it took the request; logged, never raised. Never
        in post-copy (libvirt would refuse it anyway)."""
        with job.lock:
            if job.abort_sent:
                return
            if job.in_post_copy:
                LOG.warning("live migration %s of %s is in post-copy: it can no longer be aborted; abort "
                            "ignored", job.migration_id, job.instance_uuid)
                return
            try:
                job.abort_sent = self.driver.abort_live_migration(job.instance_uuid)
            except Exception as exc:
                LOG.warning("live migration %s: abort refused for now: %s", job.migration_id, exc)
                return
        if job.abort_sent:
            LOG.info("live migration %s of %s: libvirt aborts its job", job.migration_id, job.instance_uuid)

    def _live_migration_succeeded(self, job: LiveMigrationJob, dest_host: str, shared: bool, seconds: float,
                                  monitor: MigrationMonitor) -> None:
        """libvirt says the migration completed: the domain must be gone from here; then the source's
        files go (never on shared storage: the directory is the destination's)."""
        instance_uuid, migration_id = job.instance_uuid, job.migration_id
        event = "compute_live_migration"
        route = f"instance {instance_uuid} from host {self.host} to host {dest_host}"
        if not monitor.running_reported:  # it ended before a poll saw the job
            self._report_running(job, route)
        try:
            self.driver.post_live_migration_at_source(instance_uuid, shared)
            left = ("its directory is kept: it is on storage shared with the destination" if shared
                    else "its directory here was removed")
        except InstanceInvalidState as exc:
            message = (f"libvirt reported the live migration of {route} complete, but the domain still "
                       f"runs on host {self.host}: {exc}")
            LOG.error("%s", message)
            self.migration_done(migration_id, instance_uuid, "live_migration", contract.MIGRATION_FAILED,
                                error=message,
                                values=self.migration_values(instance_uuid),
                                event=self.event(event, EventResult.ERROR, message))
            return
        except Exception as exc:  # the instance is there now: only files are left here
            LOG.error("live migration %s: cleanup of instance %s on %s failed (remove it by hand): %s",
                      migration_id, instance_uuid, self.host, exc)
            left = f"the cleanup of its files here failed: {exc}"
        memory = (monitor.last_progress or {}).get("memory_total", 0)
        seen = f"{monitor.progress_reports} progress reports" + (f"; memory {memory / MiB:.0f} MiB" if memory
                                                                 else "")
        if job.switched is not None and monitor.switched_after is not None:
            how = ("switched to post-copy" if job.in_post_copy
                   else "the guest paused so that it converged")
            seen += f"; {how} after {monitor.switched_after:.1f} s"
        message = f"live migration of {route} completed in {seconds:.1f} s ({seen}); {left}"
        self.migration_done(migration_id, instance_uuid, "live_migration", contract.MIGRATION_MIGRATED,
                            values=self.migration_values(instance_uuid),
                            event=self.event(event, EventResult.SUCCESS, message))
        LOG.info("live migration %s: %s", migration_id, message)

    def _live_migration_domain_gone(self, job: LiveMigrationJob, dest_host: str, migration_uri: str,
                                    shared: bool, *, followed: bool = False) -> None:
        """The domain is not here and no outcome was journaled: a redelivered task whose first run
        died while libvirt went on (a peer-to-peer migration does not need its caller), or a wrong
        host. Ask the destination rather than guess."""
        instance_uuid, migration_id = job.instance_uuid, job.migration_id
        step, event = "live_migration", "compute_live_migration"
        route = f"instance {instance_uuid} from host {self.host} to host {dest_host}"
        try:
            there = self.driver.instance_power_state_at(migration_uri, instance_uuid)
        except Exception as exc:
            there = None
            asked = f"and host {dest_host} cannot be asked: {exc}"
        else:
            asked = f"nor on host {dest_host}" if there is None else ""
        if there in (RUNNING, PAUSED):
            with contextlib.suppress(Exception):
                self.driver.post_live_migration_at_source(instance_uuid, shared)
            how = ("the migration job an earlier attempt left running completed" if followed
                   else "an earlier attempt completed it")
            message = f"live migration of {route}: the domain runs on host {dest_host} ({how})"
            self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_MIGRATED,
                                values={"power_state": contract.POWER_NOSTATE},
                                event=self.event(event, EventResult.SUCCESS, message))
            LOG.warning("live migration %s: %s", migration_id, message)
            return
        if there is not None:
            asked = f"and on host {dest_host} it is {there}"
        message = (f"live migration of {route} failed: the domain of the instance is not on host {self.host} "
                   f"{asked}")
        LOG.error("live migration %s: %s", migration_id, message)
        self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_FAILED, error=message,
                            values={"power_state": contract.POWER_NOSTATE},
                            event=self.event(event, EventResult.ERROR, message))

    def _resume_if_left_paused(self, instance_uuid: str, state_before: str) -> None:
        """After a failed migration the guest must run here as before: libvirt resumes it itself, but a
        failure late in the switch-over can leave it paused (Nova's rollback resumes it too)."""
        if state_before != RUNNING:
            return
        try:
            if self.driver.get_info(instance_uuid) == PAUSED:
                LOG.warning("live migration of %s failed and left it paused; resuming it", instance_uuid)
                self.driver.unpause(instance_uuid)
        except Exception as exc:
            LOG.error("cannot resume %s after its failed live migration: %s", instance_uuid, exc)
