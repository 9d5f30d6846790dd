"""Live migration: the pre-flight checks at the destination and the source, then pre_live_migration
(destination), live_migration (source: the job, its monitor, its abort and switch-over, run by
:class:`~compute_workers.operations.live_migration_source.LiveMigrationSource`),
post_live_migration_at_destination, or rollback_live_migration_at_destination; abort and force-complete
reach the running job through :class:`~compute_workers.migration_jobs.LiveMigrationJobs`.

Each step reports conductor.migration_update (never instance_update). Its outcome is journaled
(MigrationJournal, outside the instance directory, which leaves the source with the migration; the
record keeps the status reported) before it is reported, and a redelivered step does nothing but report
the journaled status again: the conductor drops what it already applied, so this only makes up for a
report lost between the journal and the send. Failures are reported with a message naming the host and
what the hypervisor said; nothing escapes as an exception.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import requests
from celery import Task

from compute_workers import contract, migration_jobs
from compute_workers import shared_storage as markers
from compute_workers.contract import EventResult
from compute_workers.exception import (
    ComputeError,
    CPUIncompatible,
    ImageDownloadError,
    InstanceNotFound,
    InvalidInstanceUUID,
)
from compute_workers.migration_jobs import LiveMigrationJobs
from compute_workers.operations.base import HostContext, MiB, OperationFamily
from compute_workers.operations.live_migration_source import LiveMigrationSource
from compute_workers.virt.driver import checked_uuid

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)
# How long a live migration's destination waits for the host network state holding the incoming ports.
NETWORK_STATE_WAIT = 10.0


class LiveMigration(OperationFamily):
    """compute.check_can_migrate_destination, check_can_migrate_source, pre_live_migration,
    live_migration, abort_live_migration, live_migration_force_complete,
    post_live_migration_at_destination, rollback_live_migration_at_destination."""

    def __init__(self, context: HostContext) -> None:
        super().__init__(context)
        self.jobs = LiveMigrationJobs()  # the running ones, for their abort
        self.source = LiveMigrationSource(context)
        # The taps an incoming guest's filtering was applied for (pre_live_migration), by instance: a
        # rollback removes their chains (a restart forgets them: the next host network sync does).
        self._incoming_taps: dict[str, list[str]] = {}

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
            state = self.power_state_or_none(instance_uuid)
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
        url = self.images.check_url(url, label)
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
        marker is visible here (shared storage) and the bytes its disk occupies. Changes nothing: asked
        twice, it answers the same."""
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
        # The marker stays: the next step (prep_resize, pre_live_migration) removes it, or the next check
        # once it is old. Removed here, a second delivery of this check (run while the first goes on, or
        # whose answer the result backend keeps instead) would answer "not shared".
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
        with self.instance_locks.hold(instance_uuid):
            if self.migration_redelivered(step, instance_uuid, migration_id, values=False):
                return
            started = time.monotonic()
            markers.remove_marker(self.config.instances_path, shared_marker)
            try:
                self._checked_spec_for(instance_uuid, spec)
                if not shared_storage and not block_migration:
                    raise ComputeError(f"the instance directory of {instance_uuid} is not on storage shared "
                                       f"with host {self.host} and this is no block migration: its disk "
                                       "would not reach the destination")
                base_image, _fetched = self.fetch_base_image(spec)
                # The guest arrives with taps on these bridges: they must be there before it moves,
                # and stay (held) until it has arrived or the migration is rolled back.
                networks = spec.get("networks") or ()
                plugged = self.bridges.hold(instance_uuid, networks)
                # Its filtering too: the guest runs here from the switch-over on.
                self._incoming_taps[instance_uuid] = [network["tap"] for network in networks]
                plugged += self.firewall.apply(networks)
                self.driver.pre_live_migration(spec, base_image, block_migration, shared_storage)
                peers = self._await_network_state(instance_uuid, networks)
            except Exception as exc:
                self.unplug(instance_uuid, self.bridges.release(instance_uuid),
                            self._incoming_taps.pop(instance_uuid, []))
                message = (f"cannot prepare host {self.host} for the live migration of instance "
                           f"{instance_uuid}: {self.failure_message(exc)}")
                LOG.error("%s", message, exc_info=not isinstance(exc, ComputeError | contract.SpecError))
                self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_ERROR,
                                    error=message,
                                    event=self.event(event, EventResult.ERROR, message))
                return
            made = ("nothing to create: the instance directory is shared with the source" if shared_storage
                    else "instance directory and disk overlay created" if block_migration
                    else "instance directory created")
            if plugged:
                made += f"; made {', '.join(plugged)}"
            made += peers
            message = f"host {self.host} prepared in {time.monotonic() - started:.1f} s: {made}"
            LOG.info("%s of %s (migration %s): %s", step, instance_uuid, migration_id, message)
            self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_PREPARED,
                                event=self.event(event, EventResult.SUCCESS, message))

    def _await_network_state(self, instance_uuid: str, networks: Any) -> str:
        """Wait (at most ``NETWORK_STATE_WAIT`` s) for the host network state that holds the incoming
        ports, sent with ``pre_live_migration``: until it is applied, their vxlan networks have no flood
        peers here, and a guest switched over meanwhile would be cut off. Not there in time: the
        migration goes on (the state still comes, or the periodic resync brings it); said in the event."""
        ports = [network["port_id"] for network in networks]
        if not ports or not self.driver.capabilities.get("plugs_host_bridges"):
            return ""
        started = time.monotonic()
        if self.context.applied_ports.wait(ports, NETWORK_STATE_WAIT):
            return f"; network state with its ports applied (waited {time.monotonic() - started:.2f} s)"
        LOG.warning("pre_live_migration of %s: no host network state with its ports %s within %.0f s; going "
                    "on without the networks' flood peers", instance_uuid, ", ".join(ports),
                    NETWORK_STATE_WAIT)
        return f"; no network state with its ports within {NETWORK_STATE_WAIT:.0f} s (flood peers missing)"

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
        if self.migration_redelivered(step, instance_uuid, migration_id):
            return
        job = self.jobs.start(migration_id, instance_uuid)
        if job is None:
            LOG.warning("live migration %s of %s already runs in this worker; redelivered task ignored",
                        migration_id, instance_uuid)
            return
        try:
            with self.instance_locks.hold(instance_uuid):
                # A run of this migration that ended while this one waited journaled its outcome.
                if self.migration_redelivered(step, instance_uuid, migration_id):
                    return
                bridges, taps = self.instance_bridges(instance_uuid), self.instance_taps(instance_uuid)
                self.source.migrate(job, dest_host, migration_uri, migration_data_uri, bool(block_migration),
                                    bool(shared_storage), self._completion_timeout(completion_timeout))
                if (bridges or taps) and self.power_state_or_none(instance_uuid) is None:  # the guest left
                    self.unplug(instance_uuid, bridges, taps)
        except Exception as exc:  # a bug: still report, and truthfully
            message = f"live migration of instance {instance_uuid} on host {self.host} failed: {exc}"
            LOG.exception("%s", message)
            self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_FAILED, error=message,
                                values=self.migration_values(instance_uuid),
                                event=self.event("compute_live_migration", EventResult.ERROR, message))
        finally:
            self.jobs.finish(job)
    def abort_live_migration(self, instance_uuid: str, migration_id: int) -> None:
        """Abort the running live migration ``migration_id``: its task then reports "cancelled". None
        running: a logged no-op (an abort that comes before its migration started cancels it)."""
        if not self._checked_migration("abort_live_migration", instance_uuid, migration_id, report=False):
            return
        job = self.jobs.request_abort(migration_id, instance_uuid)
        if job is None:
            LOG.info("abort of live migration %s of %s: no such migration runs on host %s; nothing to "
                     "abort (should it start within %.0f s, it is cancelled)", migration_id, instance_uuid,
                     self.host, migration_jobs.EARLY_ABORT_TTL)
            return
        LOG.info("abort of live migration %s of %s requested", migration_id, instance_uuid)
        self.source.send_abort(job)

    def live_migration_force_complete(self, instance_uuid: str, migration_id: int) -> None:
        """Have the running live migration ``migration_id`` switched over: its monitor does it (in its
        own thread, once libvirt shows the job, so that "running" is reported first) and reports it.
        None running, or already switched over: a logged no-op."""
        if not self._checked_migration("live_migration_force_complete", instance_uuid, migration_id,
                                       report=False):
            return
        job = self.jobs.request_force_complete(migration_id, instance_uuid)
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
        with self.instance_locks.hold(instance_uuid):
            if self.migration_redelivered(step, instance_uuid, migration_id):
                return
            try:
                self._checked_spec_for(instance_uuid, spec)
                figures = self.driver.post_live_migration_at_destination(instance_uuid, spec)
                power_state = self.driver.get_info(instance_uuid)
                self.bridges.release(instance_uuid)  # the guest's taps are on them now
                self._incoming_taps.pop(instance_uuid, None)
            except Exception as exc:
                message = (f"the live-migrated instance {instance_uuid} is not usable on host {self.host}: "
                           f"{self.failure_message(exc)}")
                LOG.error("%s", message, exc_info=not isinstance(exc, ComputeError | contract.SpecError))
                self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_ERROR,
                                    error=message,
                                    values=self.migration_values(instance_uuid),
                                    event=self.event(event, EventResult.ERROR, message))
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
            self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_COMPLETED,
                                values=values,
                                event=self.event(event, EventResult.SUCCESS, message))

    def rollback_live_migration_at_destination(self, instance_uuid: str, migration_id: int,
                                               shared_storage: bool) -> None:
        """On the destination after a failed migration: remove any domain of the instance here that does
        not run and, unless ``shared_storage``, the instance directory; report "rolled_back"."""
        step = "rollback_live_migration_at_destination"
        event = f"compute_{step}"
        if not self._checked_migration(step, instance_uuid, migration_id):
            return
        with self.instance_locks.hold(instance_uuid):
            if self.migration_redelivered(step, instance_uuid, migration_id):
                return
            try:
                removed = self.driver.rollback_live_migration_at_destination(instance_uuid,
                                                                             destroy_disks=not shared_storage)
                self.unplug(instance_uuid, self.bridges.release(instance_uuid),
                            self._incoming_taps.pop(instance_uuid, []))
            except Exception as exc:
                message = (f"cannot roll back the live migration of instance {instance_uuid} on host "
                           f"{self.host}: {self.failure_message(exc)}")
                LOG.error("%s", message, exc_info=not isinstance(exc, ComputeError))
                self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_ERROR,
                                    error=message,
                                    values=self.migration_values(instance_uuid),
                                    event=self.event(event, EventResult.ERROR, message))
                return
            message = (f"host {self.host}: " + ("domain removed" if removed else "no domain was left")
                       + ("; the instance directory is shared with the source and kept" if shared_storage
                          else "; instance directory removed"))
            LOG.info("%s of %s (migration %s): %s", step, instance_uuid, migration_id, message)
            self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_ROLLED_BACK,
                                event=self.event(event, EventResult.SUCCESS, message))

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
                self.migration_update(migration_id, status,
                                      error=f"{step} refused on host {self.host}: {exc}")
            return False
        return True

    def _checked_spec_for(self, instance_uuid: str, spec: dict[str, Any]) -> None:
        contract.validate_spec(spec)
        if spec["instance_uuid"] != instance_uuid:
            raise contract.SpecError(f"spec is for instance {spec['instance_uuid']}, not {instance_uuid}")

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

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        # The checks are synchronous calls (the control plane waits on the result backend with a
        # timeout): they return their answer, like get_console_output. The steps report to the
        # conductor; compute.abort_live_migration runs in another worker thread while
        # compute.live_migration runs, and reaches it through the family's jobs.

        def no_host(task: Task) -> dict[str, Any]:
            return {"ok": False, "check": "hypervisor",
                    "message": f"no host of this worker consumes the queue {tasks.route(task)!r}"}

        @tasks.task(contract.COMPUTE_CHECK_MIGRATE_DESTINATION, ignore_result=False)
        def check_can_migrate_destination(self: Task, instance_uuid: str, source_host: str,
                                          source_cpu_info: dict[str, Any] | None,
                                          image: dict[str, Any] | None, live: bool = True) -> dict[str, Any]:
            if family := tasks.family(self, cls):
                return family.check_can_migrate_destination(instance_uuid, source_host, source_cpu_info,
                                                            image, live)
            return no_host(self)

        @tasks.task(contract.COMPUTE_CHECK_MIGRATE_SOURCE, ignore_result=False)
        def check_can_migrate_source(self: Task, instance_uuid: str,
                                     shared_marker: str | None = None) -> dict[str, Any]:
            if family := tasks.family(self, cls):
                return family.check_can_migrate_source(instance_uuid, shared_marker)
            return {**no_host(self), "check": "source"}

        @tasks.task(contract.COMPUTE_PRE_LIVE_MIGRATION, ignore_result=True)
        def pre_live_migration(self: Task, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                               block_migration: bool, shared_storage: bool,
                               shared_marker: str | None = None) -> None:
            if family := tasks.family(self, cls):
                family.pre_live_migration(instance_uuid, migration_id, spec, block_migration, shared_storage,
                                          shared_marker)

        @tasks.task(contract.COMPUTE_LIVE_MIGRATION, ignore_result=True)
        def live_migration(self: Task, instance_uuid: str, migration_id: int, dest_host: str,
                           migration_uri: str, migration_data_uri: str | None, block_migration: bool,
                           shared_storage: bool, completion_timeout: float | None = None) -> None:
            if family := tasks.family(self, cls):
                family.live_migration(instance_uuid, migration_id, dest_host, migration_uri,
                                      migration_data_uri, block_migration, shared_storage, completion_timeout)

        @tasks.task(contract.COMPUTE_ABORT_LIVE_MIGRATION, ignore_result=True)
        def abort_live_migration(self: Task, instance_uuid: str, migration_id: int) -> None:
            if family := tasks.family(self, cls):
                family.abort_live_migration(instance_uuid, migration_id)

        @tasks.task(contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE, ignore_result=True)
        def live_migration_force_complete(self: Task, instance_uuid: str, migration_id: int) -> None:
            if family := tasks.family(self, cls):
                family.live_migration_force_complete(instance_uuid, migration_id)

        @tasks.task(contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST, ignore_result=True)
        def post_live_migration_at_destination(self: Task, instance_uuid: str, migration_id: int,
                                               spec: dict[str, Any]) -> None:
            if family := tasks.family(self, cls):
                family.post_live_migration_at_destination(instance_uuid, migration_id, spec)

        @tasks.task(contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST, ignore_result=True)
        def rollback_live_migration_at_destination(self: Task, instance_uuid: str, migration_id: int,
                                                   shared_storage: bool) -> None:
            if family := tasks.family(self, cls):
                family.rollback_live_migration_at_destination(instance_uuid, migration_id, shared_storage)
