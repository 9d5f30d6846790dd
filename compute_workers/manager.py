"""The compute manager: every operation of a compute worker, in plain Python.

Tasks (``tasks.py``) only unpack their arguments and call one method here. The manager drives the
driver, classifies failures, and reports to the conductor through a :class:`Reporter`; it never
raises for an operation's failure (that is reported), so a task is acknowledged once its outcome has
been sent. Operations on one instance are serialized within the process (a terminate that arrives
during a spawn waits for it), and every operation is safe to run twice: Redis redelivers
unacknowledged tasks. Spawn and terminate converge by the domain's name; lifecycle operations also
converge (starting a running domain does nothing) and a completed action is never run again (see
:mod:`compute_workers.journal`): a second reboot is not a no-op, so convergence alone is not enough.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import requests

from compute_workers import contract, migration_jobs
from compute_workers import shared_storage as markers
from compute_workers.config import ComputeConfig
from compute_workers.exception import (
    ComputeError,
    ConsoleUnavailable,
    CPUIncompatible,
    ImageDownloadError,
    ImageUploadError,
    InstanceInvalidState,
    InstanceNotFound,
    InvalidInstanceUUID,
    PostCopyUnsupported,
)
from compute_workers.images import ImageCache, qcow2_backing_file
from compute_workers.journal import ActionJournal, MigrationJournal
from compute_workers.locks import KeyedLock
from compute_workers.migration_jobs import (
    LiveMigrationJob,
    LiveMigrationJobs,
    MigrationMonitor,
    ProgressSampler,
    ProgressThrottle,
)
from compute_workers.power_events import PowerStateEvents
from compute_workers.reporter import Reporter
from compute_workers.virt.driver import ComputeDriver, checked_uuid

LOG = logging.getLogger(__name__)

SPAWNING = "spawning"
DELETING = "deleting"
FAULT_DETAILS_MAX = 16 * 1024
MiB = 1024 * 1024
# A snapshot reports its copy's progress at most this often.
SNAPSHOT_PROGRESS_INTERVAL = 2.0
SNAPSHOTS_DIR = "snapshots"
# A cold migration reports its disk copy's progress at most this often.
MIGRATION_PROGRESS_INTERVAL = 2.0
# The name of the check task's shared-storage marker file in INSTANCES_PATH: never trust it as a path.
SHARED_MARKER = re.compile(r"\.shared-[A-Za-z0-9_-]{1,64}")
MAX_CONSOLE_LINES = 10_000

RUNNING, PAUSED, SUSPENDED = contract.POWER_RUNNING, contract.POWER_PAUSED, contract.POWER_SUSPENDED
SHUTDOWN = contract.POWER_SHUTDOWN

# The contract's truth after a failure: vm_state from the domain's real power state.
VM_STATE_OF_POWER_STATE = {
    RUNNING: "active",
    PAUSED: "paused",
    SUSPENDED: "suspended",
    SHUTDOWN: "stopped",
    contract.POWER_CRASHED: "stopped",
    contract.POWER_NOSTATE: "error",
}


def _target(power_state: str) -> dict[str, Any]:
    return {"vm_state": VM_STATE_OF_POWER_STATE[power_state], "task_state": None,
            "power_state": power_state}



def fault_from(exc: BaseException, host: str) -> dict[str, Any]:
    """The fault the conductor records: a message the user can act on, the traceback for admins."""
    if isinstance(exc, ComputeError | contract.SpecError):
        message = str(exc)
    else:
        message = f"unexpected error on host {host}: {type(exc).__name__}: {exc}"
    details = "".join(traceback.format_exception(exc))[-FAULT_DETAILS_MAX:]
    return {"message": message, "code": 500, "details": details}


def reschedule_after(exc: BaseException) -> bool:
    """Whether another host may succeed: not for a bad spec or a bad image, yes for host errors."""
    if isinstance(exc, contract.SpecError):
        return False
    if isinstance(exc, ComputeError):
        return exc.reschedule
    return True


class ComputeManager:
    def __init__(self, config: ComputeConfig, driver: ComputeDriver, reporter: Reporter) -> None:
        self.config = config
        self.host = config.host
        self.driver = driver
        self.reporter = reporter
        self.images = ImageCache(config.instances_path / "_base", token=config.service_token,
                                 timeout=config.image_download_timeout)
        self._instance_locks = KeyedLock()
        self.journal = ActionJournal(config.instances_path)
        self.migration_journal = MigrationJournal(config.instances_path)
        self._power_events: PowerStateEvents | None = None
        self._owns_power_events = False
        self._snapshot_slots = threading.BoundedSemaphore(config.max_concurrent_snapshots)
        self._next_cache_cleanup = 0.0  # monotonic; the first heartbeat cleans up
        self._live_migrations = LiveMigrationJobs()  # the running ones, for their abort

    def init_host(self) -> None:
        """Connect the driver and log what the host runs; raises if the hypervisor is unusable."""
        self.driver.init_host()
        instances = self.driver.list_instances()
        LOG.info("host %s ready: driver %s, %d instance(s) found", self.host, self.driver.name,
                 len(instances))
        if self.driver.capabilities["needs_base_image"] and not self.config.service_token:
            LOG.warning("CLOUDCTL_SERVICE_TOKEN is not set: spawns that need to download an image "
                        "will fail")

    # Reports ---------------------------------------------------------------------------------------

    def _update(self, instance_uuid: str, expected_task_state: str | None, values: dict[str, Any], *,
                event: dict[str, Any] | None = None, fault: dict[str, Any] | None = None,
                action_id: int | None = None) -> None:
        self.reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, instance_uuid=instance_uuid, host=self.host,
                             expected_task_state=expected_task_state, values=values, event=event,
                             fault=fault, action_id=action_id)

    @staticmethod
    def _event(name: str, result: str, message: str) -> dict[str, Any]:
        return {"name": name, "result": result, "message": message}

    # Operations ------------------------------------------------------------------------------------

    def spawn(self, spec: dict[str, Any]) -> None:
        """Converge to "this instance runs here", then report active; or clean up and report
        build_failed. A redelivered spawn finds the domain and reports it again, never builds twice."""
        instance_uuid = spec.get("instance_uuid") if isinstance(spec, dict) else None
        try:
            contract.validate_spec(spec)
            checked_uuid(spec["instance_uuid"])
            if spec["host"] != self.host:
                raise contract.SpecError(f"spec is for host {spec['host']}, not {self.host}")
        except (contract.SpecError, InvalidInstanceUUID) as exc:
            LOG.error("refusing spawn of %r: %s", instance_uuid, exc)
            if isinstance(instance_uuid, str):
                self.reporter.report(contract.CONDUCTOR_BUILD_FAILED, instance_uuid=instance_uuid,
                                     host=self.host, fault=fault_from(exc, self.host), reschedule=False)
            return
        with self._instance_locks.hold(spec["instance_uuid"]):
            self._spawn_locked(spec)

    def _spawn_locked(self, spec: dict[str, Any]) -> None:
        instance_uuid = spec["instance_uuid"]
        started = time.monotonic()
        try:
            existing = self._power_state_or_none(instance_uuid)
        except Exception as exc:
            self._build_failed(spec, exc, cleanup=False)  # nothing was made
            return
        if existing is not None:
            self._spawn_existing(spec, existing)
            return
        driver_called = False
        try:
            base_image = self._prepare_image(spec)
            driver_called = True
            self.driver.spawn(spec, base_image)
            power_state = self.driver.get_info(instance_uuid)
        except Exception as exc:
            self._build_failed(spec, exc, cleanup=driver_called)
            return
        message = (f"domain {contract.domain_name(instance_uuid)} started on {self.host} in "
                   f"{time.monotonic() - started:.1f} s")
        self._spawned(instance_uuid, power_state, message)

    def _spawned(self, instance_uuid: str, power_state: str, message: str) -> None:
        LOG.info("spawn of %s: %s", instance_uuid, message)
        self._update(instance_uuid, SPAWNING,
                     {"vm_state": "active", "task_state": None, "power_state": power_state},
                     event=self._event("compute_spawn", "success", message))

    def _spawn_existing(self, spec: dict[str, Any], power_state: str) -> None:
        """The domain exists: this is a redelivered spawn. Never rebuild nor remove it (it may be an
        instance in use: the conductor drops our report if the instance moved on); start it if an
        earlier attempt died between defining and starting it."""
        instance_uuid = spec["instance_uuid"]
        try:
            if power_state == contract.POWER_PAUSED:
                self.driver.unpause(instance_uuid)
            elif power_state != contract.POWER_RUNNING:
                LOG.warning("spawn of %s: its domain exists but is %s; starting it", instance_uuid,
                            power_state)
                self.driver.power_on(instance_uuid, spec)
            power_state = self.driver.get_info(instance_uuid)
        except Exception as exc:
            # Not build_failed: that would reschedule while the domain stays here.
            LOG.error("spawn of %s: cannot start its existing domain: %s", instance_uuid, exc)
            self._update(instance_uuid, SPAWNING, {"vm_state": "error", "task_state": None},
                         fault=fault_from(exc, self.host))
            return
        self._spawned(instance_uuid, power_state, f"domain {contract.domain_name(instance_uuid)} already "
                                                  f"exists on {self.host}; not rebuilt")

    def _power_state_or_none(self, instance_uuid: str) -> str | None:
        try:
            return self.driver.get_info(instance_uuid)
        except InstanceNotFound:
            return None

    def _prepare_image(self, spec: dict[str, Any]) -> Path | None:
        if not self.driver.capabilities["needs_base_image"]:
            return None
        image = spec["image"]
        label = image.get("name") or image["id"]
        self._update(spec["instance_uuid"], SPAWNING, {}, event=self._event(
            "compute_prep_image", "start", f"preparing image {label} on {self.host}"))
        fetched = self.images.fetch(image)
        message = (f"image {label} already cached on {self.host}" if not fetched.downloaded_bytes else
                   f"image {label} downloaded to {self.host}: {fetched.downloaded_bytes} bytes in "
                   f"{fetched.seconds:.1f} s")
        self._update(spec["instance_uuid"], SPAWNING, {},
                     event=self._event("compute_prep_image", "success", message))
        return fetched.path

    def _build_failed(self, spec: dict[str, Any], exc: Exception, *, cleanup: bool) -> None:
        """Report a failed build; ``cleanup``: this attempt called driver.spawn, make sure nothing of
        it is left (the driver cleans up after itself, this is the belt to its braces)."""
        instance_uuid = spec["instance_uuid"]
        reschedule = reschedule_after(exc)
        LOG.error("spawn of %s failed on %s (reschedule=%s): %s", instance_uuid, self.host, reschedule, exc,
                  exc_info=not isinstance(exc, ComputeError))
        if cleanup:
            try:
                self.driver.destroy(instance_uuid)
            except Exception:
                LOG.exception("cleanup after the failed spawn of %s failed", instance_uuid)
        self.reporter.report(contract.CONDUCTOR_BUILD_FAILED, instance_uuid=instance_uuid, host=self.host,
                             fault=fault_from(exc, self.host), reschedule=reschedule)

    def terminate(self, instance_uuid: str) -> None:
        """Destroy the instance (success when it is not here) and report instance_destroyed; on
        failure report the instance in error with the fault."""
        with self._instance_locks.hold(str(instance_uuid)):
            started = time.monotonic()
            try:
                self.driver.destroy(instance_uuid)
            except Exception as exc:
                LOG.error("terminate of %s failed on %s: %s", instance_uuid, self.host, exc,
                          exc_info=not isinstance(exc, ComputeError))
                self._update(instance_uuid, DELETING, {"vm_state": "error", "task_state": None},
                             fault=fault_from(exc, self.host))
                return
        LOG.info("terminated %s in %.1f s", instance_uuid, time.monotonic() - started)
        self.reporter.report(contract.CONDUCTOR_INSTANCE_DESTROYED, instance_uuid=instance_uuid,
                             host=self.host)

    def get_console_output(self, instance_uuid: str, lines: int | None) -> dict[str, str]:
        """``{"output": str}`` or ``{"error": "InstanceNotFound" | "ConsoleUnavailable", "message"}``.

        ``lines`` None means all the driver keeps (the last 100 KiB). Expected failures are answers,
        not exceptions: the caller waits on the result backend.
        """
        try:
            count = MAX_CONSOLE_LINES if lines is None else max(0, min(int(lines), MAX_CONSOLE_LINES))
            return {"output": self.driver.get_console_output(instance_uuid, count)}
        except (InstanceNotFound, InvalidInstanceUUID) as exc:
            return {"error": "InstanceNotFound", "message": str(exc)}
        except (ConsoleUnavailable, ValueError, TypeError) as exc:
            return {"error": "ConsoleUnavailable", "message": str(exc)}
        except (ComputeError, OSError) as exc:
            LOG.error("console output of %s failed: %s", instance_uuid, exc)
            return {"error": "ConsoleUnavailable", "message": str(exc)}

    # Lifecycle operations ----------------------------------------------------------------------------
    #
    # Each one: a redelivered action (its id in the journal) does nothing; otherwise the event is
    # opened ("start"), the operation converges to its target (already there: nothing done, success),
    # the action is journaled, then the event is closed with "success" and the target values, or with
    # "error", the truth read from the hypervisor and a fault. Never raises.

    def reboot_instance(self, instance_uuid: str, action_id: int | None, reboot_type: str,
                        spec: dict[str, Any] | None) -> None:
        """SOFT: ACPI shutdown, wait up to COMPUTE_CLEAN_SHUTDOWN_TIMEOUT, start again from the
        definition regenerated from ``spec``; a guest that is not running or does not shut down in time
        is rebooted hard (event ``fallback_to_hard_reboot``). HARD: destroy, regenerate, start."""
        hard = reboot_type == contract.REBOOT_HARD
        task_state = "rebooting_hard" if hard else "rebooting"

        def run() -> str:
            if reboot_type not in (contract.REBOOT_SOFT, contract.REBOOT_HARD):
                raise contract.SpecError(f"unknown reboot type {reboot_type!r}: expected "
                                         f"{contract.REBOOT_SOFT} or {contract.REBOOT_HARD}")
            checked = self._checked_spec(instance_uuid, spec)
            state = self._power_state_or_none(instance_uuid)
            if hard:
                return self._hard_reboot(instance_uuid, checked, state)
            if state != RUNNING:
                why = (f"domain {contract.domain_name(instance_uuid)} is not defined on host {self.host}"
                       if state is None else f"guest is {state}, not running")
                return self._fall_back_to_hard_reboot(instance_uuid, action_id, task_state, checked,
                                                      state, f"{why}; hard rebooting")
            timeout = self.config.clean_shutdown_timeout
            started = time.monotonic()
            if not self.driver.shutdown(instance_uuid, timeout):
                return self._fall_back_to_hard_reboot(
                    instance_uuid, action_id, task_state, checked, state,
                    f"guest did not shut down within {timeout:g} s after the ACPI request; hard rebooting")
            shut_down = time.monotonic() - started
            self.driver.power_on(instance_uuid, checked)
            return (f"guest shut down cleanly in {shut_down:.1f} s and was started again; rebooted in "
                    f"{time.monotonic() - started:.1f} s")

        self._lifecycle(instance_uuid, action_id, "compute_reboot_instance", task_state,
                        f"{reboot_type} reboot of {contract.domain_name(instance_uuid)} on {self.host}",
                        _target(RUNNING), run)

    def _fall_back_to_hard_reboot(self, instance_uuid: str, action_id: int | None, task_state: str,
                                  spec: dict[str, Any] | None, state: str | None, message: str) -> str:
        LOG.warning("soft reboot of %s: %s", instance_uuid, message)
        self._update(instance_uuid, task_state, {}, action_id=action_id,
                     event=self._event("fallback_to_hard_reboot", "success", message))
        return self._hard_reboot(instance_uuid, spec, state)

    def _hard_reboot(self, instance_uuid: str, spec: dict[str, Any] | None, state: str | None) -> str:
        started = time.monotonic()
        self.driver.hard_reboot(instance_uuid, spec)
        seconds = time.monotonic() - started
        if state is None:
            return (f"domain {contract.domain_name(instance_uuid)} was not defined on host {self.host}; "
                    f"defined again from the spec and started in {seconds:.1f} s")
        return f"domain destroyed and started again from its regenerated definition in {seconds:.1f} s"

    def power_off_instance(self, instance_uuid: str, action_id: int | None, timeout: float | None) -> None:
        """ACPI shutdown, wait up to ``timeout`` seconds (0: none), then force the domain off; it
        stays defined. A suspended instance's saved memory is discarded (it ends shut off)."""

        def run() -> str:
            wait = self._shutdown_timeout(timeout)
            state = self.driver.get_info(instance_uuid)
            if state == SHUTDOWN:
                return f"domain was already shut off on host {self.host}; nothing to do"
            started = time.monotonic()
            clean = self.driver.power_off(instance_uuid, wait)
            seconds = time.monotonic() - started
            if state == SUSPENDED:
                return f"saved memory state discarded; domain shut off in {seconds:.1f} s"
            if clean:
                return f"guest shut down cleanly in {seconds:.1f} s"
            if state != RUNNING:
                return f"guest was {state} and cannot act on an ACPI request; forced off in {seconds:.1f} s"
            if wait == 0:
                return f"forced off in {seconds:.1f} s (timeout 0: no clean shutdown asked)"
            return f"guest did not shut down within {wait:g} s; forced off"

        self._lifecycle(instance_uuid, action_id, "compute_stop_instance", "powering_off",
                        f"powering off {contract.domain_name(instance_uuid)} on {self.host}",
                        _target(SHUTDOWN), run)

    def power_on_instance(self, instance_uuid: str, action_id: int | None,
                          spec: dict[str, Any] | None) -> None:
        """Start from the definition regenerated from ``spec`` (a saved memory state, if any, is
        restored as it is); a paused domain is unpaused; a lost definition is recreated."""

        def run() -> str:
            checked = self._checked_spec(instance_uuid, spec)
            state = self._power_state_or_none(instance_uuid)
            if state == RUNNING:
                return f"domain was already running on host {self.host}; nothing to do"
            started = time.monotonic()
            self.driver.power_on(instance_uuid, checked)
            seconds = time.monotonic() - started
            if state is None:
                return (f"domain {contract.domain_name(instance_uuid)} was not defined on host {self.host}; "
                        f"defined again from the spec and started in {seconds:.1f} s")
            if state == SUSPENDED:
                return f"started from its saved memory state in {seconds:.1f} s"
            if state == PAUSED:
                return f"guest was paused; unpaused in {seconds:.1f} s"
            return f"domain started from its regenerated definition in {seconds:.1f} s"

        self._lifecycle(instance_uuid, action_id, "compute_start_instance", "powering_on",
                        f"powering on {contract.domain_name(instance_uuid)} on {self.host}",
                        _target(RUNNING), run)

    def pause_instance(self, instance_uuid: str, action_id: int | None) -> None:
        """Freeze the vCPUs (libvirt suspend)."""
        self._simple_lifecycle(instance_uuid, action_id, "pause", "pausing", PAUSED, {
            RUNNING: (self.driver.pause, "vCPUs paused")}, hint="start or resume it first")

    def unpause_instance(self, instance_uuid: str, action_id: int | None) -> None:
        """Let the vCPUs run again (libvirt resume)."""
        self._simple_lifecycle(instance_uuid, action_id, "unpause", "unpausing", RUNNING, {
            PAUSED: (self.driver.unpause, "vCPUs running again")},
            hint="only a paused instance can be unpaused")

    def suspend_instance(self, instance_uuid: str, action_id: int | None) -> None:
        """Save the memory to disk and stop the domain (libvirt managed save)."""
        self._simple_lifecycle(instance_uuid, action_id, "suspend", "suspending", SUSPENDED, {
            RUNNING: (self.driver.suspend, "memory saved to disk and domain stopped"),
            PAUSED: (self.driver.suspend, "memory of the paused guest saved to disk and domain stopped")},
            hint="a shut-off instance has no memory to save")

    def resume_instance(self, instance_uuid: str, action_id: int | None) -> None:
        """Restore a suspended domain from its saved memory; a paused one is unpaused."""
        self._simple_lifecycle(instance_uuid, action_id, "resume", "resuming", RUNNING, {
            SUSPENDED: (self.driver.resume, "memory restored from disk; guest running again"),
            PAUSED: (self.driver.unpause, "guest was paused, not suspended; unpaused")},
            hint="it has no saved memory state; start it instead")

    def _simple_lifecycle(self, instance_uuid: str, action_id: int | None, verb: str, task_state: str,
                          target: str, moves: Mapping[str, tuple[Callable[[str], None], str]], *,
                          hint: str) -> None:
        """An operation that only moves the domain from the states in ``moves`` to ``target``."""

        def run() -> str:
            state = self.driver.get_info(instance_uuid)
            if state == target:
                return f"domain was already {target} on host {self.host}; nothing to do"
            if state not in moves:
                raise InstanceInvalidState(f"cannot {verb} instance {instance_uuid}: its domain is {state} "
                                           f"on host {self.host}; {hint}")
            operation, done = moves[state]
            started = time.monotonic()
            operation(instance_uuid)
            return f"{done} in {time.monotonic() - started:.1f} s"

        self._lifecycle(instance_uuid, action_id, f"compute_{verb}_instance", task_state,
                        f"{verb} {contract.domain_name(instance_uuid)} on {self.host}", _target(target), run)

    def _lifecycle(self, instance_uuid: str, action_id: int | None, event: str, task_state: str,
                   start_message: str, target: dict[str, Any], run: Callable[[], str]) -> None:
        action_id = self._checked_action(event, instance_uuid, action_id)
        if action_id is False:
            return
        with self._instance_locks.hold(instance_uuid):
            if self._redelivered(event, instance_uuid, action_id):
                return
            self._update(instance_uuid, task_state, {}, action_id=action_id,
                         event=self._event(event, "start", start_message))
            try:
                message = run()
            except Exception as exc:
                values = self._truth(instance_uuid)
                fault = fault_from(exc, self.host)
                if isinstance(exc, InstanceNotFound):
                    fault["message"] = (f"domain {contract.domain_name(instance_uuid)} does not exist on "
                                        f"host {self.host}")
                LOG.error("%s of %s failed on %s: %s", event, instance_uuid, self.host, fault["message"],
                          exc_info=not isinstance(exc, ComputeError | contract.SpecError))
                self._journal(instance_uuid, action_id, "error")
                self._update(instance_uuid, task_state, values, action_id=action_id, fault=fault,
                             event=self._event(event, "error", fault["message"]))
                return
            LOG.info("%s of %s: %s", event, instance_uuid, message)
            self._journal(instance_uuid, action_id, "success")
            self._update(instance_uuid, task_state, target, action_id=action_id,
                         event=self._event(event, "success", message))

    @staticmethod
    def _checked_action(event: str, instance_uuid: str, action_id: Any) -> int | bool | None:
        """The action id to journal (None: none); False when the task must be refused."""
        try:
            checked_uuid(instance_uuid)
        except InvalidInstanceUUID:
            LOG.error("%s refused: invalid instance uuid %r (no instance can have it)", event, instance_uuid)
            return False
        if action_id is not None and (not isinstance(action_id, int) or isinstance(action_id, bool)):
            LOG.error("%s of %s: action id %r is not an integer; running it without the redelivery "
                      "journal", event, instance_uuid, action_id)
            return None
        return int(action_id) if action_id is not None else None

    def _redelivered(self, event: str, instance_uuid: str, action_id: int | None) -> bool:
        """Whether the action was already done here (called with the instance's lock held)."""
        if action_id is not None and self.journal.done(instance_uuid, action_id):
            LOG.info("action %s already done on this host; redelivered task ignored (%s of %s)",
                     action_id, event, instance_uuid)
            return True
        if action_id is None:
            LOG.warning("%s of %s carries no action id: a redelivery of it would run again", event,
                        instance_uuid)
        return False

    # Cold migration and resize -------------------------------------------------------------------------
    #
    # Nova's resize, one task per step: prep_resize (destination: the image cached) -> resize_instance
    # (source: powered off, its files kept as <uuid>_resize, the disk copied) -> finish_resize
    # (destination: defined with the new flavor, started) -> confirm_resize (source: <uuid>_resize
    # removed); or, instead of confirming, revert_resize (destination: its copy removed) ->
    # finish_revert_resize (source: the original back). A cold migration is a resize to another host
    # with the same flavor; a resize may stay on its host. Each step: a redelivered one (its record in
    # the migration journal) does nothing; otherwise it runs, is journaled, then reported with
    # conductor.migration_update: its status and the event compute_<step> closed with "success", or
    # status "error" with the error, the truthful power state and the event closed with "error".
    # Never raises.

    def prep_resize(self, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                    shared_marker: str | None) -> None:
        """Destination: remove the shared-storage marker, cache the image of ``spec``; nothing is
        created in ``INSTANCES_PATH/<uuid>`` (on a same-host resize it is the source's). Reports
        "prepared"."""

        def run() -> tuple[str, dict[str, Any] | None]:
            checked = self._migration_spec(instance_uuid, spec)
            self._remove_shared_marker(shared_marker)
            if not self.driver.capabilities["needs_base_image"]:
                return f"host {self.host} is ready to receive instance {instance_uuid}", None
            image = checked["image"]
            label = image.get("name") or image["id"]
            fetched = self.images.fetch(image)
            if not fetched.downloaded_bytes:
                return f"image {label} already cached on {self.host}", None
            return (f"image {label} downloaded to {self.host}: {fetched.downloaded_bytes} bytes in "
                    f"{fetched.seconds:.1f} s"), None

        self._migration_step("prep_resize", instance_uuid, migration_id, contract.MIGRATION_PREPARED, run)

    def resize_instance(self, instance_uuid: str, migration_id: int, dest_host: str, migration_uri: str,
                        timeout: float | None) -> None:
        """Source: power off (clean shutdown for up to ``timeout`` seconds, then forced), keep the
        files as ``<uuid>_resize``, copy the disk to ``dest_host`` over ``migration_uri``. Reports
        "migrated"; on failure everything is put back and "error" carries the power state."""

        def run() -> tuple[str, dict[str, Any] | None]:
            if not isinstance(migration_uri, str) or not migration_uri:
                raise contract.SpecError(f"resize_instance needs the destination's migration_uri, got "
                                         f"{migration_uri!r}")
            wait = self._shutdown_timeout(timeout)
            started = time.monotonic()
            moved = self.driver.migrate_disk_and_power_off(
                instance_uuid, migration_uri, wait, self._copy_progress(migration_id),
                self.config.resize_copy_timeout(wait))
            if moved.resumed:
                stopped = "resumed a resize that was interrupted after the power off"
            elif moved.clean_shutdown is None:
                stopped = "guest was already shut off"
            elif moved.clean_shutdown:
                stopped = "guest shut down cleanly"
            else:
                stopped = "guest forced off" + (f" after {wait:g} s without a clean shutdown" if wait else "")
            rate = moved.disk_bytes / MiB / moved.copy_seconds if moved.copy_seconds > 0 else 0.0
            return (f"{stopped}; disk of {moved.disk_bytes / MiB:.1f} MiB ({moved.sent_bytes / MiB:.1f} MiB "
                    f"of data) copied to {dest_host} in {moved.copy_seconds:.1f} s ({rate:.0f} MiB/s); "
                    f"resize_instance took {time.monotonic() - started:.1f} s"), None

        self._migration_step("resize_instance", instance_uuid, migration_id, contract.MIGRATION_MIGRATED, run,
                             details={"dest_host": dest_host})

    def _copy_progress(self, migration_id: int) -> Callable[[int, int], None]:
        """``conductor.migration_progress`` of a disk copy, at most every MIGRATION_PROGRESS_INTERVAL
        seconds (a small disk is copied before the first one is due: no report at all)."""
        last_report = [time.monotonic()]

        def progress(copied: int, total: int) -> None:
            now = time.monotonic()
            if now - last_report[0] < MIGRATION_PROGRESS_INTERVAL:
                return
            last_report[0] = now
            report = {"memory_total": 0, "memory_processed": 0, "memory_remaining": 0, "disk_total": total,
                      "disk_processed": copied, "disk_remaining": max(total - copied, 0),
                      "observed_at": time.time()}
            try:
                self.reporter.report(contract.CONDUCTOR_MIGRATION_PROGRESS, migration_id=migration_id,
                                     host=self.host, progress=report)
            except Exception:  # a lost progress report must not fail the copy
                LOG.exception("cannot report the progress of migration %s", migration_id)

        return progress

    def finish_resize(self, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                      power_on: bool) -> None:
        """Destination: grow the copied disk to ``spec``'s root_gb, define the domain from ``spec``
        (the new flavor), start it when ``power_on``. Reports "finished" with the power state."""

        def run() -> tuple[str, dict[str, Any] | None]:
            checked = self._migration_spec(instance_uuid, spec)
            started = time.monotonic()
            self.driver.finish_migration(checked, bool(power_on))
            power_state = self.driver.get_info(instance_uuid)
            flavor = checked["flavor"]
            done = f"started in {time.monotonic() - started:.1f} s" if power_on else "left shut off"
            return (f"domain {contract.domain_name(instance_uuid)} defined on {self.host} with flavor "
                    f"{flavor.get('name') or '?'} ({flavor['vcpus']} vCPU, {flavor['memory_mb']} MiB RAM, "
                    f"{flavor['root_gb']} GiB disk) and {done}"), {"power_state": power_state}

        self._migration_step("finish_resize", instance_uuid, migration_id, contract.MIGRATION_FINISHED, run)

    def confirm_resize(self, instance_uuid: str, migration_id: int) -> None:
        """Source: remove ``<uuid>_resize``, and a leftover definition of the domain when the instance
        moved to another host (never the domain of a same-host resize: that is the instance). Reports
        "confirmed"."""

        def run() -> tuple[str, dict[str, Any] | None]:
            record = self.migration_journal.done(migration_id, "resize_instance") or {}
            dest_host = record.get("dest_host")
            moved = dest_host != self.host if isinstance(dest_host, str) else None
            self.driver.confirm_migration(instance_uuid, moved)
            return (f"original files of instance {instance_uuid} removed from {self.host}"), None

        self._migration_step("confirm_resize", instance_uuid, migration_id, contract.MIGRATION_CONFIRMED, run)

    def revert_resize(self, instance_uuid: str, migration_id: int) -> None:
        """Destination: destroy and undefine the domain, remove ``INSTANCES_PATH/<uuid>`` (the copy; the
        original stays in ``<uuid>_resize`` on the source). Reports "reverted_dest"."""

        def run() -> tuple[str, dict[str, Any] | None]:
            self.driver.destroy(instance_uuid)
            return f"the resized instance {instance_uuid} was destroyed and removed from {self.host}", None

        self._migration_step("revert_resize", instance_uuid, migration_id, contract.MIGRATION_REVERTED_DEST,
                             run)

    def finish_revert_resize(self, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                             power_on: bool) -> None:
        """Source: the original files back from ``<uuid>_resize``, the domain defined from ``spec`` (the
        old flavor) and started when ``power_on``. Reports "reverted" with the power state."""

        def run() -> tuple[str, dict[str, Any] | None]:
            checked = self._migration_spec(instance_uuid, spec)
            started = time.monotonic()
            self.driver.finish_revert_migration(checked, bool(power_on))
            power_state = self.driver.get_info(instance_uuid)
            done = f"started in {time.monotonic() - started:.1f} s" if power_on else "left shut off"
            return (f"instance {instance_uuid} back on {self.host} on its original disk with flavor "
                    f"{checked['flavor'].get('name') or '?'}, {done}"), {"power_state": power_state}

        self._migration_step("finish_revert_resize", instance_uuid, migration_id, contract.MIGRATION_REVERTED,
                             run)

    def _migration_step(self, step: str, instance_uuid: str, migration_id: Any, status: str,
                        run: Callable[[], tuple[str, dict[str, Any] | None]], *,
                        details: dict[str, Any] | None = None) -> None:
        """Run one step of a migration unless this host already did (journal), journal it, report it."""
        event = f"compute_{step}"
        if isinstance(migration_id, bool) or not isinstance(migration_id, int):
            LOG.error("%s of %r refused: migration id %r is not an integer (no report can name it)", event,
                      instance_uuid, migration_id)
            return
        try:
            checked_uuid(instance_uuid)
        except InvalidInstanceUUID as exc:
            LOG.error("%s of migration %s refused: %s", event, migration_id, exc)
            self._migration_update(migration_id, contract.MIGRATION_ERROR, error=str(exc),
                                   event=self._event(event, "error", str(exc)))
            return
        with self._instance_locks.hold(instance_uuid):
            if self.migration_journal.done(migration_id, step) is not None:
                LOG.info("%s of migration %s already done on this host; redelivered task ignored (%s)", step,
                         migration_id, instance_uuid)
                return
            try:
                message, values = run()
            except Exception as exc:
                error = fault_from(exc, self.host)["message"]
                if isinstance(exc, NotImplementedError):
                    error = f"the {self.driver.name} driver of host {self.host} cannot do {step}"
                LOG.error("%s of %s (migration %s) failed on %s: %s", event, instance_uuid, migration_id,
                          self.host, error, exc_info=not isinstance(exc, ComputeError | contract.SpecError))
                self._journal_migration(migration_id, step, instance_uuid, "error", details)
                self._migration_update(migration_id, contract.MIGRATION_ERROR, error=error,
                                       values=self._migration_truth(instance_uuid),
                                       event=self._event(event, "error", error))
                return
            LOG.info("%s of %s (migration %s): %s", event, instance_uuid, migration_id, message)
            self._journal_migration(migration_id, step, instance_uuid, "success", details)
            self._migration_update(migration_id, status, values=values,
                                   event=self._event(event, "success", message))

    def _migration_update(self, migration_id: int, status: str, *, error: str | None = None,
                          values: dict[str, Any] | None = None, event: dict[str, Any] | None = None) -> None:
        self.reporter.report(contract.CONDUCTOR_MIGRATION_UPDATE, migration_id=migration_id, host=self.host,
                             status=status, error=error, values=values, event=event)

    def _journal_migration(self, migration_id: int, step: str, instance_uuid: str, result: str,
                           details: dict[str, Any] | None) -> None:
        try:
            self.migration_journal.record(migration_id, step, instance_uuid, result, **(details or {}))
        except OSError as exc:  # the outcome must still be reported
            LOG.error("cannot journal step %s of migration %s (%s): a redelivery of it would run again", step,
                      migration_id, exc)

    def _migration_truth(self, instance_uuid: str) -> dict[str, Any] | None:
        """``{"power_state"}`` of the instance on this host now (nostate: no domain here)."""
        try:
            return {"power_state": self._power_state_or_none(instance_uuid) or contract.POWER_NOSTATE}
        except Exception as exc:
            LOG.warning("cannot read the power state of %s after a failure: %s", instance_uuid, exc)
            return None

    def _migration_spec(self, instance_uuid: str, spec: dict[str, Any] | None) -> dict[str, Any]:
        """The spec a migration step defines the domain from: valid, of this instance, for this host."""
        checked = self._checked_spec(instance_uuid, spec)
        if checked is None:
            raise contract.SpecError(f"no spec for instance {instance_uuid}: this step needs one")
        if checked["host"] != self.host:
            raise contract.SpecError(f"spec is for host {checked['host']}, not {self.host}")
        return checked

    def _remove_shared_marker(self, marker: str | None) -> None:
        if not marker:
            return
        if not isinstance(marker, str) or not SHARED_MARKER.fullmatch(marker):
            LOG.warning("ignoring shared-storage marker %r: not a marker's name", marker)
            return
        (self.config.instances_path / marker).unlink(missing_ok=True)

    # Snapshot ------------------------------------------------------------------------------------------

    def snapshot_instance(self, instance_uuid: str, action_id: int | None, image_id: str, upload_url: str,
                          image_name: str) -> None:
        """Snapshot the root disk into a standalone qcow2 (live when the domain runs, cold when it is
        shut off) and upload it with ``PUT upload_url``. task_state image_snapshot -> image_uploading
        -> None. At most COMPUTE_MAX_CONCURRENT_SNAPSHOTS at once; the others wait. Never raises."""
        event = "compute_snapshot_instance"
        checked_action = self._checked_action(event, instance_uuid, action_id)
        if checked_action is False:
            return
        action = None if checked_action is None else int(checked_action)
        label = image_name or image_id
        with self._instance_locks.hold(instance_uuid):
            if self._redelivered(event, instance_uuid, action):
                return
            phase = {"task_state": "image_snapshot", "upload_open": False}
            self._update(instance_uuid, "image_snapshot", {}, action_id=action, event=self._event(
                event, "start", f"snapshot of {contract.domain_name(instance_uuid)} on {self.host} as image "
                                f"{label}"))
            target: Path | None = None
            try:
                with self._snapshot_slot(instance_uuid):
                    target = self._snapshot_path(instance_uuid)
                    message = self._snapshot_and_upload(instance_uuid, action, target, upload_url, label,
                                                        phase)
                values = _target(self.driver.get_info(instance_uuid))
            except Exception as exc:
                self._snapshot_failed(instance_uuid, action, event, phase, exc)
                return
            finally:
                if target is not None:
                    target.unlink(missing_ok=True)
                    target.with_name(target.name + ".delta").unlink(missing_ok=True)
            LOG.info("%s of %s: %s", event, instance_uuid, message)
            self._journal(instance_uuid, action, "success")
            self._update(instance_uuid, "image_uploading", values, action_id=action,
                         event=self._event(event, "success", message))

    @contextlib.contextmanager
    def _snapshot_slot(self, instance_uuid: str) -> Iterator[None]:
        if not self._snapshot_slots.acquire(blocking=False):
            LOG.info("snapshot of %s waits: %d snapshot(s) already run on this host (COMPUTE_MAX_CONCURRENT_"
                     "SNAPSHOTS)", instance_uuid, self.config.max_concurrent_snapshots)
            self._snapshot_slots.acquire()
        try:
            yield
        finally:
            self._snapshot_slots.release()

    def _snapshot_path(self, instance_uuid: str) -> Path:
        """A new file name under INSTANCES_PATH/snapshots/, a directory QEMU can traverse."""
        directory = self.config.instances_path / SNAPSHOTS_DIR
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        directory.chmod(0o755)
        return directory / f"{instance_uuid}-{secrets.token_hex(6)}.qcow2"

    def _snapshot_and_upload(self, instance_uuid: str, action_id: int | None, target: Path, upload_url: str,
                             label: str, phase: dict[str, Any]) -> str:
        event = "compute_snapshot_instance"
        state = self.driver.get_info(instance_uuid)
        kind = "live" if state in (RUNNING, PAUSED) else "cold"
        started = time.monotonic()
        last_report = [started]

        def progress(copied: int, total: int) -> None:
            now = time.monotonic()
            if now - last_report[0] < SNAPSHOT_PROGRESS_INTERVAL:
                return
            last_report[0] = now
            self._update(instance_uuid, "image_snapshot", {}, action_id=action_id, event=self._event(
                event, "progress", f"copied {copied / MiB:.1f} of {total / MiB:.1f} MiB"))

        self.driver.snapshot(instance_uuid, target, progress)
        copied = time.monotonic() - started
        size = target.stat().st_size
        self._update(instance_uuid, "image_snapshot", {"task_state": "image_uploading"}, action_id=action_id,
                     event=self._event(event, "progress", f"{kind} snapshot made: {size / MiB:.1f} MiB in "
                                                          f"{copied:.1f} s; uploading"))
        phase["task_state"] = "image_uploading"
        upload_started = time.monotonic()
        self._update(instance_uuid, "image_uploading", {}, action_id=action_id, event=self._event(
            "compute_upload_image", "start", f"uploading {size / MiB:.1f} MiB as image {label}"))
        phase["upload_open"] = True
        self._upload(target, upload_url, label)
        uploaded = time.monotonic() - upload_started
        phase["upload_open"] = False
        self._update(instance_uuid, "image_uploading", {}, action_id=action_id, event=self._event(
            "compute_upload_image", "success", f"uploaded {size / MiB:.1f} MiB in {uploaded:.1f} s"))
        return (f"{kind} snapshot of {contract.domain_name(instance_uuid)} uploaded as image {label}: "
                f"{size / MiB:.1f} MiB; copy and convert {copied:.1f} s, upload {uploaded:.1f} s, total "
                f"{time.monotonic() - started:.1f} s")

    def _upload(self, path: Path, upload_url: str, label: str) -> None:
        """Stream ``path`` to the image service; a non-2xx answer is a failure with its message."""
        if not self.config.service_token:
            raise ImageUploadError(f"cannot upload image {label}: CLOUDCTL_SERVICE_TOKEN is not set on "
                                   f"host {self.host}")
        headers = {"Authorization": f"Token {self.config.service_token}",
                   "Content-Type": "application/octet-stream"}
        timeout = self.config.image_upload_timeout
        try:
            with open(path, "rb") as body:
                response = requests.put(upload_url, data=body, headers=headers,
                                        timeout=(min(10.0, timeout), timeout))
        except requests.RequestException as exc:
            raise ImageUploadError(f"cannot upload image {label} to the image service: {exc}") from exc
        if not 200 <= response.status_code < 300:
            raise ImageUploadError(f"the image service refused image {label}: HTTP {response.status_code}: "
                                   f"{_answer_message(response)}")

    def _snapshot_failed(self, instance_uuid: str, action_id: int | None, event: str, phase: dict[str, Any],
                         exc: Exception) -> None:
        fault = fault_from(exc, self.host)
        if isinstance(exc, InstanceNotFound):
            fault["message"] = (f"domain {contract.domain_name(instance_uuid)} does not exist on host "
                                f"{self.host}")
        LOG.error("%s of %s failed on %s: %s", event, instance_uuid, self.host, fault["message"],
                  exc_info=not isinstance(exc, ComputeError))
        task_state = phase["task_state"]
        if phase["upload_open"]:
            self._update(instance_uuid, task_state, {}, action_id=action_id,
                         event=self._event("compute_upload_image", "error", fault["message"]))
        values = self._truth(instance_uuid)
        self._journal(instance_uuid, action_id, "error")
        self._update(instance_uuid, task_state, values, action_id=action_id, fault=fault,
                     event=self._event(event, "error", fault["message"]))

    def _journal(self, instance_uuid: str, action_id: int | None, result: str) -> None:
        if action_id is None:
            return
        try:
            self.journal.record(instance_uuid, action_id, result)
        except OSError as exc:  # the outcome must still be reported
            LOG.error("cannot journal action %s of %s (%s): a redelivery of it would run again",
                      action_id, instance_uuid, exc)

    def _truth(self, instance_uuid: str) -> dict[str, Any]:
        """The values of a failed operation: what the hypervisor says now; only task_state None when
        it cannot say (the conductor keeps the rest as it was)."""
        try:
            return _target(self.driver.get_info(instance_uuid))
        except InstanceNotFound:
            return _target(contract.POWER_NOSTATE)
        except Exception as exc:
            LOG.warning("cannot read the power state of %s after a failure: %s", instance_uuid, exc)
            return {"task_state": None}

    def _checked_spec(self, instance_uuid: str, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        """The spec to regenerate the definition from; None (or {}) keeps the current definition."""
        if not spec:
            LOG.warning("no spec for %s: its current domain definition is kept", instance_uuid)
            return None
        contract.validate_spec(spec)
        if spec["instance_uuid"] != instance_uuid:
            raise contract.SpecError(f"spec is for instance {spec['instance_uuid']}, not {instance_uuid}")
        return spec

    def _shutdown_timeout(self, timeout: float | None) -> float:
        """A power off's wait: the task's ``timeout``, COMPUTE_CLEAN_SHUTDOWN_TIMEOUT when it has none,
        capped so that the task ends within its time limit."""
        if timeout is None:
            return self.config.clean_shutdown_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
            LOG.warning("invalid power off timeout %r; waiting COMPUTE_CLEAN_SHUTDOWN_TIMEOUT (%g s)",
                        timeout, self.config.clean_shutdown_timeout)
            return self.config.clean_shutdown_timeout
        if timeout > self.config.max_shutdown_timeout:
            LOG.warning("power off timeout %g s capped at %g s (COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT - 30)",
                        timeout, self.config.max_shutdown_timeout)
            return self.config.max_shutdown_timeout
        return float(timeout)

    # Live migration ---------------------------------------------------------------------------------
    #
    # Each step reports conductor.migration_update (never instance_update). Its outcome is journaled
    # (MigrationJournal, outside the instance directory, which leaves the source with the migration;
    # the record keeps the status reported) before it is reported, and a redelivered step does nothing
    # but report the journaled status again:
    # the conductor drops what it already applied, so this only makes up for a report lost between the
    # journal and the send. Failures are reported with a message naming the host and what the
    # hypervisor said; nothing escapes as an exception.

    def check_can_migrate_destination(self, instance_uuid: str, source_host: str,
                                      source_cpu_info: Mapping[str, Any] | None,
                                      image: Mapping[str, Any] | None, live: bool) -> dict[str, Any]:
        """Can this host receive the instance from ``source_host``? Checks, in this order, the
        hypervisor, that no domain of the instance is here, the source's CPU (``live`` only), the base
        image; then creates the shared-storage marker. An answer, never an exception (the control
        plane waits for it)."""
        def refused(check: str, message: str) -> dict[str, Any]:
            LOG.warning("migration of %s from %s to this host (%s) refused, check %s: %s", instance_uuid,
                        source_host, self.host, check, message)
            return {"ok": False, "check": check, "message": message}

        try:
            checked_uuid(instance_uuid)
            state = self._power_state_or_none(instance_uuid)
        except InvalidInstanceUUID as exc:
            return refused("instance_exists", str(exc))
        except Exception as exc:
            return refused("hypervisor", f"the hypervisor of host {self.host} does not answer: {exc}")
        if state is not None and (live or source_host != self.host):
            return refused("instance_exists", f"a domain of instance {instance_uuid} already exists on host "
                                              f"{self.host} ({state})")
        cpu = "skipped"
        if live:
            try:
                cpu_info = source_cpu_info if isinstance(source_cpu_info, Mapping) else {}
                cpu = self.driver.compare_cpu(cpu_info)
            except CPUIncompatible as exc:
                return refused("cpu", f"the CPU of host {self.host} cannot run a guest live-migrated from "
                                      f"host {source_host}: {exc}")
            except Exception as exc:
                return refused("cpu", f"host {self.host} cannot compare its CPU with host {source_host}'s: "
                                      f"{exc}")
        try:
            image_cached = self._check_migration_image(image)
        except Exception as exc:
            return refused("image", str(exc))
        try:
            marker = markers.create_marker(self.config.instances_path)
            free = shutil.disk_usage(self.config.instances_path).free
        except OSError as exc:
            return refused("hypervisor", f"cannot write in INSTANCES_PATH {self.config.instances_path} on "
                                         f"host {self.host}: {exc}")
        return {"ok": True, "migration_uri": self.config.migration_uri,
                "migration_data_uri": self.config.migration_data_uri, "shared_marker": marker,
                "disk_free_bytes": free, "image_cached": image_cached, "cpu": cpu}

    def _check_migration_image(self, image: Mapping[str, Any] | None) -> bool:
        """Whether the base image is cached here; raises (with a message for users) when it is not
        and cannot be fetched. Drivers without images have nothing to cache: False."""
        if not self.driver.capabilities["needs_base_image"]:
            return False
        if not isinstance(image, Mapping) or not isinstance(image.get("id"), str):
            raise contract.SpecError(f"no valid image given to check on host {self.host}: {image!r}")
        label = image.get("name") or image["id"]
        if self.images.path(image["id"]).exists():
            return True
        url = image.get("url")
        if not isinstance(url, str) or not url:
            raise contract.SpecError(f"image {label} has no url to fetch it from on host {self.host}")
        if not self.config.service_token:
            raise ImageDownloadError(f"image {label} is not cached on host {self.host} and CLOUDCTL_SERVICE_"
                                     "TOKEN is not set there to download it")
        headers = {"Authorization": f"Token {self.config.service_token}", "Range": "bytes=0-0"}
        try:
            with requests.get(url, headers=headers, stream=True,
                              timeout=migration_jobs.IMAGE_CHECK_TIMEOUT) as answer:
                status = answer.status_code
        except requests.RequestException as exc:
            raise ImageDownloadError(f"image {label} is not cached on host {self.host}, which cannot reach "
                                     f"the image API: {exc}") from exc
        if status not in (200, 206):
            raise ImageDownloadError(f"image {label} is not cached on host {self.host} and the image API "
                                     f"answered HTTP {status} for it")
        return False

    def check_can_migrate_source(self, instance_uuid: str, shared_marker: str | None) -> dict[str, Any]:
        """Can the instance leave this host? Its domain must be here; says whether the destination's
        marker is visible here (then removes it: shared storage) and the bytes its disk occupies."""
        def refused(message: str) -> dict[str, Any]:
            LOG.warning("migration of %s from this host (%s) refused: %s", instance_uuid, self.host, message)
            return {"ok": False, "check": "source", "message": message}

        try:
            checked_uuid(instance_uuid)
            power_state = self.driver.get_info(instance_uuid)
        except (InvalidInstanceUUID, InstanceNotFound):
            return refused(f"instance {instance_uuid} has no domain on host {self.host}")
        except Exception as exc:
            return refused(f"the hypervisor of host {self.host} does not answer: {exc}")
        try:
            shared = bool(shared_marker) and markers.marker_visible(self.config.instances_path,
                                                                    str(shared_marker))
        except markers.InvalidMarker as exc:
            return refused(str(exc))
        if shared:
            markers.remove_marker(self.config.instances_path, shared_marker)
        try:
            disk_bytes = (self.config.instances_path / instance_uuid / "disk").stat().st_blocks * 512
        except FileNotFoundError:
            disk_bytes = 0  # a driver without disk files
        except OSError as exc:
            return refused(f"cannot read the disk of instance {instance_uuid} on host {self.host}: {exc}")
        return {"ok": True, "shared_storage": shared, "power_state": power_state, "disk_bytes": disk_bytes}

    def pre_live_migration(self, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                           block_migration: bool, shared_storage: bool, shared_marker: str | None) -> None:
        """On the destination: remove the marker, fetch the base image, make the instance directory and
        its empty console log and, for block migration, the disk overlay; report "prepared"."""
        step, event = "pre_live_migration", "compute_pre_live_migration"
        if not self._checked_migration(step, instance_uuid, migration_id):
            return
        with self._instance_locks.hold(instance_uuid):
            if self._migration_redelivered(step, instance_uuid, migration_id):
                return
            started = time.monotonic()
            markers.remove_marker(self.config.instances_path, shared_marker)
            try:
                self._checked_spec_for(instance_uuid, spec)
                if not shared_storage and not block_migration:
                    raise ComputeError(f"the instance directory of {instance_uuid} is not on storage shared "
                                       f"with host {self.host} and this is no block migration: its disk "
                                       "would not reach the destination")
                base_image = None
                if self.driver.capabilities["needs_base_image"]:
                    base_image = self.images.fetch(spec["image"]).path
                self.driver.pre_live_migration(spec, base_image, block_migration, shared_storage)
            except Exception as exc:
                message = (f"cannot prepare host {self.host} for the live migration of instance "
                           f"{instance_uuid}: {self._failure_message(exc)}")
                LOG.error("%s", message, exc_info=not isinstance(exc, ComputeError | contract.SpecError))
                self._migration_done(migration_id, instance_uuid, step, contract.MIGRATION_ERROR,
                                     error=message,
                                     event=self._event(event, "error", message))
                return
            made = ("nothing to create: the instance directory is shared with the source" if shared_storage
                    else "instance directory and disk overlay created" if block_migration
                    else "instance directory created")
            message = f"host {self.host} prepared in {time.monotonic() - started:.1f} s: {made}"
            LOG.info("%s of %s (migration %s): %s", step, instance_uuid, migration_id, message)
            self._migration_done(migration_id, instance_uuid, step, contract.MIGRATION_PREPARED,
                                 event=self._event(event, "success", message))

    def live_migration(self, instance_uuid: str, migration_id: int, dest_host: str, migration_uri: str,
                       migration_data_uri: str | None, block_migration: bool, shared_storage: bool,
                       completion_timeout: float | None) -> None:
        """On the source: live-migrate the domain to ``dest_host`` while reporting its progress; report
        "running", then "migrated", "cancelled" or "failed" (see the contract). Runs as long as the
        migration does; :meth:`abort_live_migration` (another thread) can stop it, and
        :meth:`live_migration_force_complete` have it switched over."""
        step = "live_migration"
        if not self._checked_migration(step, instance_uuid, migration_id):
            return
        if self._migration_redelivered(step, instance_uuid, migration_id):
            return
        job = self._live_migrations.start(migration_id, instance_uuid)
        if job is None:
            LOG.warning("live migration %s of %s already runs in this worker; redelivered task ignored",
                        migration_id, instance_uuid)
            return
        try:
            with self._instance_locks.hold(instance_uuid):
                # A run of this migration that ended while this one waited journaled its outcome.
                if self._migration_redelivered(step, instance_uuid, migration_id):
                    return
                self._live_migrate(job, dest_host, migration_uri, migration_data_uri, bool(block_migration),
                                   bool(shared_storage), self._completion_timeout(completion_timeout))
        except Exception as exc:  # a bug: still report, and truthfully
            message = f"live migration of instance {instance_uuid} on host {self.host} failed: {exc}"
            LOG.exception("%s", message)
            self._migration_done(migration_id, instance_uuid, step, contract.MIGRATION_FAILED, error=message,
                                 values=self._migration_values(instance_uuid),
                                 event=self._event("compute_live_migration", "error", message))
        finally:
            self._live_migrations.finish(job)

    def _live_migrate(self, job: LiveMigrationJob, dest_host: str, migration_uri: str,
                      migration_data_uri: str | None, block_migration: bool, shared: bool,
                      timeout: float) -> None:
        instance_uuid, migration_id = job.instance_uuid, job.migration_id
        step, event = "live_migration", "compute_live_migration"
        route = f"instance {instance_uuid} from host {self.host} to host {dest_host}"

        def end(status: str, message: str, result: str) -> None:
            LOG.warning("live migration %s: %s", migration_id, message)
            self._migration_done(migration_id, instance_uuid, step, status,
                                 error=None if status == contract.MIGRATION_MIGRATED else message,
                                 values=self._migration_values(instance_uuid),
                                 event=self._event(event, result, message))

        try:
            state = self.driver.get_info(instance_uuid)
        except InstanceNotFound:
            self._live_migration_domain_gone(job, dest_host, migration_uri, shared)
            return
        except Exception as exc:
            end(contract.MIGRATION_FAILED, f"live migration of {route} failed: the hypervisor of host "
                                           f"{self.host} does not answer: {exc}", "error")
            return
        if job.abort_requested.is_set():
            end(contract.MIGRATION_CANCELLED, f"live migration of {route} cancelled before it started",
                "cancelled")
            return
        if state not in (RUNNING, PAUSED):
            end(contract.MIGRATION_FAILED, f"live migration of {route} refused: the instance is {state} "
                                           f"there; only a running or paused instance can be live-migrated",
                "error")
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
                                               f"{self.host} does not answer: {exc}", "error")
                return
            if job.in_post_copy:
                failure = "the migration job an earlier attempt left running failed"
                end(contract.MIGRATION_FAILED, self._post_copy_failure(route, dest_host, failure), "error")
                return
            if monitor.aborting or state not in (RUNNING, PAUSED):
                status = (contract.MIGRATION_CANCELLED if job.abort_requested.is_set()
                          and not monitor.timed_out else contract.MIGRATION_FAILED)
                end(status, f"live migration of {route}: the migration job an earlier attempt left ended "
                            f"({monitor.why_aborted or 'it failed'}); the instance is {state} there",
                    "cancelled" if status == contract.MIGRATION_CANCELLED else "error")
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
                "error")
            return
        error = outcome.get("error")
        if error is None:
            self._live_migration_succeeded(job, dest_host, shared, seconds, monitor)
            return
        if job.in_post_copy:  # never resume the guest here: part of its memory is only on the destination
            failure = f"it failed after {seconds:.1f} s: {error}"
            end(contract.MIGRATION_FAILED, self._post_copy_failure(route, dest_host, failure), "error")
            return
        self._resume_if_left_paused(instance_uuid, state)
        if job.abort_requested.is_set() and not monitor.timed_out:
            end(contract.MIGRATION_CANCELLED, f"live migration of {route} cancelled on request after "
                                              f"{seconds:.1f} s: {error}", "cancelled")
        elif monitor.timed_out:
            end(contract.MIGRATION_FAILED, f"live migration of {route} did not complete within its "
                                           f"completion timeout of {timeout:g} s and was aborted: {error}",
                "error")
        elif isinstance(error, PostCopyUnsupported):
            end(contract.MIGRATION_FAILED, self._post_copy_unsupported(route, dest_host, error), "error")
        else:
            end(contract.MIGRATION_FAILED, f"live migration of {route} failed after {seconds:.1f} s: "
                                           f"{self._failure_message(error)}", "error")

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
                        self._send_abort(job)
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
        self._migration_update(job.migration_id, contract.MIGRATION_RUNNING, event=self._event(
            "compute_live_migration", "start", f"live migration of {route} started"))

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
                       f"yet after {seconds:.1f} s ({why}): {self._failure_message(refusal)}; the migration "
                       f"goes on and the switch-over is retried every "
                       f"{migration_jobs.SWITCH_OVER_RETRY_INTERVAL:g} s until libvirt takes it")
            if monitor.switch_refusals == 1:
                LOG.warning("live migration %s of %s: %s", job.migration_id, route, message)
                result = "progress" if monitor.switch_over_requested else "error"
                self._migration_update(job.migration_id, contract.MIGRATION_RUNNING,
                                       event=self._event(contract.FORCE_COMPLETE_EVENT, result, message))
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
        self._migration_update(job.migration_id, status,
                               event=self._event(contract.FORCE_COMPLETE_EVENT, "success", message))

    def _send_abort(self, job: LiveMigrationJob) -> None:
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
            self._migration_done(migration_id, instance_uuid, "live_migration", contract.MIGRATION_FAILED,
                                 error=message,
                                 values=self._migration_values(instance_uuid),
                                 event=self._event(event, "error", message))
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
        self._migration_done(migration_id, instance_uuid, "live_migration", contract.MIGRATION_MIGRATED,
                             values=self._migration_values(instance_uuid),
                             event=self._event(event, "success", message))
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
            self._migration_done(migration_id, instance_uuid, step, contract.MIGRATION_MIGRATED,
                                 values={"power_state": contract.POWER_NOSTATE},
                                 event=self._event(event, "success", message))
            LOG.warning("live migration %s: %s", migration_id, message)
            return
        if there is not None:
            asked = f"and on host {dest_host} it is {there}"
        message = (f"live migration of {route} failed: the domain of the instance is not on host {self.host} "
                   f"{asked}")
        LOG.error("live migration %s: %s", migration_id, message)
        self._migration_done(migration_id, instance_uuid, step, contract.MIGRATION_FAILED, error=message,
                             values={"power_state": contract.POWER_NOSTATE},
                             event=self._event(event, "error", message))

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

    def abort_live_migration(self, instance_uuid: str, migration_id: int) -> None:
        """Abort the running live migration ``migration_id``: its task then reports "cancelled". None
        running: a logged no-op (an abort that comes before its migration started cancels it)."""
        if not self._checked_migration("abort_live_migration", instance_uuid, migration_id, report=False):
            return
        job = self._live_migrations.request_abort(migration_id, instance_uuid)
        if job is None:
            LOG.info("abort of live migration %s of %s: no such migration runs on host %s; nothing to "
                     "abort (should it start within %.0f s, it is cancelled)", migration_id, instance_uuid,
                     self.host, migration_jobs.EARLY_ABORT_TTL)
            return
        LOG.info("abort of live migration %s of %s requested", migration_id, instance_uuid)
        self._send_abort(job)

    def live_migration_force_complete(self, instance_uuid: str, migration_id: int) -> None:
        """Have the running live migration ``migration_id`` switched over: its monitor does it (in its
        own thread, once libvirt shows the job, so that "running" is reported first) and reports it.
        None running, or already switched over: a logged no-op."""
        if not self._checked_migration("live_migration_force_complete", instance_uuid, migration_id,
                                       report=False):
            return
        job = self._live_migrations.request_force_complete(migration_id, instance_uuid)
        if job is None:
            LOG.info("force-complete of live migration %s of %s: no such migration runs on host %s; nothing "
                     "to switch over", migration_id, instance_uuid, self.host)
        elif job.switched is not None:
            LOG.info("force-complete of live migration %s of %s: already switched over (%s); nothing to do",
                     migration_id, instance_uuid, job.switched)
        else:
            LOG.info("force-complete of live migration %s of %s requested", migration_id, instance_uuid)

    def post_live_migration_at_destination(self, instance_uuid: str, migration_id: int,
                                           spec: dict[str, Any]) -> None:
        """On the destination after "migrated": the domain must run here; record its definition; report
        "completed" with its power state and libvirt's figures of the finished job (final counters and
        downtime in ``values``, a summary in the event)."""
        step, event = "post_live_migration_at_destination", "compute_post_live_migration_at_destination"
        if not self._checked_migration(step, instance_uuid, migration_id):
            return
        with self._instance_locks.hold(instance_uuid):
            if self._migration_redelivered(step, instance_uuid, migration_id):
                return
            try:
                self._checked_spec_for(instance_uuid, spec)
                figures = self.driver.post_live_migration_at_destination(instance_uuid, spec)
                power_state = self.driver.get_info(instance_uuid)
            except Exception as exc:
                message = (f"the live-migrated instance {instance_uuid} is not usable on host {self.host}: "
                           f"{self._failure_message(exc)}")
                LOG.error("%s", message, exc_info=not isinstance(exc, ComputeError | contract.SpecError))
                self._migration_done(migration_id, instance_uuid, step, contract.MIGRATION_ERROR,
                                     error=message,
                                     values=self._migration_values(instance_uuid),
                                     event=self._event(event, "error", message))
                return
            message = f"domain {contract.domain_name(instance_uuid)} is {power_state} on host {self.host}"
            if "downtime_ms" in figures:
                message += f"; libvirt: downtime {figures['downtime_ms']} ms"
                if "elapsed_ms" in figures:
                    message += f", migration {figures['elapsed_ms'] / 1000:.1f} s"
                if "transferred_bytes" in figures:
                    message += f", {figures['transferred_bytes'] / MiB:.1f} MiB transferred"
            LOG.info("%s of %s (migration %s): %s", step, instance_uuid, migration_id, message)
            values: dict[str, Any] = {"power_state": power_state}
            final = {key: figures[key] for key in contract.MIGRATION_PROGRESS_KEYS if key in figures}
            if not final.get("disk_total"):
                # The destination's libvirt does not count a block migration's disk copy (a mirror job of
                # its own): the source's progress reports keep theirs.
                for key in ("disk_total", "disk_processed", "disk_remaining"):
                    final.pop(key, None)
            if final:
                values["progress"] = final
            if "downtime_ms" in figures:
                values["downtime_ms"] = figures["downtime_ms"]
            self._migration_done(migration_id, instance_uuid, step, contract.MIGRATION_COMPLETED,
                                 values=values,
                                 event=self._event(event, "success", message))

    def rollback_live_migration_at_destination(self, instance_uuid: str, migration_id: int,
                                               shared_storage: bool) -> None:
        """On the destination after a failed migration: remove any domain of the instance here that does
        not run and, unless ``shared_storage``, the instance directory; report "rolled_back"."""
        step = "rollback_live_migration_at_destination"
        event = f"compute_{step}"
        if not self._checked_migration(step, instance_uuid, migration_id):
            return
        with self._instance_locks.hold(instance_uuid):
            if self._migration_redelivered(step, instance_uuid, migration_id):
                return
            try:
                removed = self.driver.rollback_live_migration_at_destination(instance_uuid,
                                                                             destroy_disks=not shared_storage)
            except Exception as exc:
                message = (f"cannot roll back the live migration of instance {instance_uuid} on host "
                           f"{self.host}: {self._failure_message(exc)}")
                LOG.error("%s", message, exc_info=not isinstance(exc, ComputeError))
                self._migration_done(migration_id, instance_uuid, step, contract.MIGRATION_ERROR,
                                     error=message,
                                     values=self._migration_values(instance_uuid),
                                     event=self._event(event, "error", message))
                return
            message = (f"host {self.host}: " + ("domain removed" if removed else "no domain was left")
                       + ("; the instance directory is shared with the source and kept" if shared_storage
                          else "; instance directory removed"))
            LOG.info("%s of %s (migration %s): %s", step, instance_uuid, migration_id, message)
            self._migration_done(migration_id, instance_uuid, step, contract.MIGRATION_ROLLED_BACK,
                                 event=self._event(event, "success", message))

    def _migration_done(self, migration_id: int, instance_uuid: str, step: str, status: str, *,
                        error: str | None = None, values: dict[str, Any] | None = None,
                        event: dict[str, Any] | None = None) -> None:
        """Journal the step's final ``status``, then report it."""
        result = "error" if status in migration_jobs.FAILED_STATUSES else "success"
        try:
            self.migration_journal.record(migration_id, step, instance_uuid, result, status=status)
        except OSError as exc:  # the outcome must still be reported
            LOG.error("cannot journal %s of migration %s (%s): a redelivery of it would run again", step,
                      migration_id, exc)
        self._migration_update(migration_id, status, error=error, values=values, event=event)

    def _migration_redelivered(self, step: str, instance_uuid: str, migration_id: int) -> bool:
        """Whether ``step`` of this migration already ended here; if so its status is reported again."""
        try:
            record = self.migration_journal.done(migration_id, step)
        except OSError as exc:
            LOG.error("cannot read the migration journal (%s): running %s of migration %s", exc, step,
                      migration_id)
            return False
        if record is None:
            return False
        status = str(record.get("status") or (contract.MIGRATION_ERROR if record.get("result") == "error"
                                              else "done"))
        message = (f"{step} of migration {migration_id} already ended on host {self.host} with status "
                   f"{status}; redelivered task ignored")
        LOG.info("%s (instance %s)", message, instance_uuid)
        failed = status in migration_jobs.FAILED_STATUSES
        values = None if step == "pre_live_migration" else self._migration_values(instance_uuid)
        self._migration_update(migration_id, status, error=message if failed else None, values=values)
        return True

    def _checked_migration(self, step: str, instance_uuid: str, migration_id: Any, *,
                           report: bool = True) -> bool:
        """Whether the task's ids are usable; a bad instance uuid is reported as the step's failure, a
        bad migration id (no record to report to) is only logged."""
        if isinstance(migration_id, bool) or not isinstance(migration_id, int) or migration_id < 0:
            LOG.error("%s of %r refused: invalid migration id %r", step, instance_uuid, migration_id)
            return False
        try:
            checked_uuid(instance_uuid)
        except InvalidInstanceUUID as exc:
            LOG.error("%s of migration %s refused: %s", step, migration_id, exc)
            if report:
                status = contract.MIGRATION_FAILED if step == "live_migration" else contract.MIGRATION_ERROR
                self._migration_update(migration_id, status,
                                       error=f"{step} refused on host {self.host}: {exc}")
            return False
        return True

    def _checked_spec_for(self, instance_uuid: str, spec: dict[str, Any]) -> None:
        contract.validate_spec(spec)
        if spec["instance_uuid"] != instance_uuid:
            raise contract.SpecError(f"spec is for instance {spec['instance_uuid']}, not {instance_uuid}")

    def _migration_values(self, instance_uuid: str) -> dict[str, Any]:
        """``{"power_state"}`` read now: ``nostate`` when the domain is not here; empty when the
        hypervisor cannot say (the conductor keeps what it has)."""
        try:
            return {"power_state": self.driver.get_info(instance_uuid)}
        except InstanceNotFound:
            return {"power_state": contract.POWER_NOSTATE}
        except Exception as exc:
            LOG.warning("cannot read the power state of %s: %s", instance_uuid, exc)
            return {}

    def _failure_message(self, exc: BaseException) -> str:
        """What a user reads of a failure: our errors' own messages, anything else named as unexpected."""
        if isinstance(exc, ComputeError | contract.SpecError):
            return str(exc)
        return f"unexpected error on host {self.host}: {type(exc).__name__}: {exc}"

    def _completion_timeout(self, completion_timeout: Any) -> float:
        """The task's ``completion_timeout``, capped so that the task ends within its time limit."""
        longest = self.config.max_live_migration_timeout
        if isinstance(completion_timeout, bool) or not isinstance(completion_timeout, int | float) or not (
                completion_timeout > 0):
            LOG.warning("invalid live migration completion timeout %r; using %g s", completion_timeout,
                        longest)
            return longest
        if completion_timeout > longest:
            LOG.warning("live migration completion timeout %g s capped at %g s (COMPUTE_LIVE_MIGRATION_SOFT_"
                        "TIME_LIMIT - 30)", completion_timeout, longest)
            return longest
        return float(completion_timeout)

    # Host ------------------------------------------------------------------------------------------

    def watch_power_states(self, events: PowerStateEvents | None = None) -> None:
        """Send ``conductor.power_state_update`` on every lifecycle event of an instance's domain.

        ``events``: a sender thread shared by several hosts (a fleet), which its owner starts and
        stops; without it the manager runs its own, stopped by :meth:`close`.
        """
        if self._power_events is not None:
            return
        if not self.driver.capabilities["supports_lifecycle_events"]:
            LOG.warning("driver %s has no lifecycle events: power states reach the conductor only with "
                        "the heartbeat", self.driver.name)
            return
        self._owns_power_events = events is None
        if events is None:
            events = PowerStateEvents(self.reporter)
            events.start()
        events.watch(self.host, self.driver)
        self._power_events = events

    def close(self) -> None:
        """Stop the power-state events and release the hypervisor connection."""
        if self._power_events is not None:
            self._power_events.unwatch(self.host)
            if self._owns_power_events:
                self._power_events.stop()
            self._power_events = None
        self.driver.close()

    def host_init(self) -> None:
        """``conductor.host_init``: what this host runs, once at start, before any task is consumed."""
        self.reporter.report(contract.CONDUCTOR_HOST_INIT, host=self.host, resources=self.resources())

    def resources(self) -> dict[str, Any]:
        """The heartbeat's resources: the driver's totals plus what only the worker knows."""
        resources = self.driver.get_available_resource()
        observed_at = time.time()  # before reading the domains: the list is at least this fresh
        resources.update({
            "libvirt_uri": self.config.libvirt_uri,
            "driver": self.driver.name,
            "memory_mb_reserved": self.config.reserved_host_memory_mb,
            "disk_gb_reserved": self.config.reserved_host_disk_gb,
            "instances": self.driver.list_instances(),
            "observed_at": observed_at,
        })
        return resources

    def heartbeat(self) -> None:
        """Report the heartbeat, then clean the image cache when COMPUTE_IMAGE_CACHE_CLEANUP_INTERVAL
        has passed (a failing cleanup is logged, never fails the heartbeat)."""
        self.reporter.report(contract.CONDUCTOR_HOST_HEARTBEAT, host=self.host, resources=self.resources())
        if not self.driver.capabilities["needs_base_image"] or time.monotonic() < self._next_cache_cleanup:
            return
        self._next_cache_cleanup = time.monotonic() + self.config.image_cache_cleanup_interval
        try:
            self.cleanup_image_cache()
        except Exception:
            LOG.exception("image cache cleanup failed")

    def images_in_use(self) -> set[str]:
        """Ids of the cached images some instance disk of this host is backed by."""
        base_dir = self.images.base_dir.resolve()
        used = set()
        for disk in self.config.instances_path.glob("*/disk"):
            backing = qcow2_backing_file(disk)
            if backing and Path(backing).resolve().parent == base_dir:
                used.add(Path(backing).name)
        return used

    def cleanup_image_cache(self) -> list[str]:
        """Remove the cached images no instance uses and no spawn used for COMPUTE_IMAGE_CACHE_MAX_AGE
        seconds; returns their ids."""
        removed = self.images.cleanup(self.config.image_cache_max_age, self.images_in_use())
        if removed:
            LOG.info("image cache cleanup removed %d image(s): %s", len(removed), ", ".join(removed))
        return removed


def _answer_message(response: requests.Response) -> str:
    """The message of an HTTP error answer: its JSON ``detail``/``error``/``message``, else its text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            if isinstance(body.get(key), str):
                return body[key][:1000]
    return (response.text or response.reason or "").strip()[:1000]
