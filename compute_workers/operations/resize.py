"""Cold migration and resize: Nova's resize, one task per step.

prep_resize (destination: the image cached) -> resize_instance (source: powered off, its files kept as
<uuid>_resize, the disk copied) -> finish_resize (destination: defined with the new flavor, started) ->
confirm_resize (source: <uuid>_resize removed); or, instead of confirming, revert_resize (destination:
its copy removed) -> finish_revert_resize (source: the original back). A cold migration is a resize to
another host with the same flavor; a resize may stay on its host. Each step: a redelivered one (its
record in the migration journal) does nothing; otherwise it runs, is journaled, then reported with
conductor.migration_update: its status and the event compute_<step> closed with "success", or status
"error" with the error, the truthful power state and the event closed with "error". Never raises.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Task

from compute_workers import contract
from compute_workers.operations.base import MiB, OperationFamily

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)

# A cold migration reports its disk copy's progress at most this often.
MIGRATION_PROGRESS_INTERVAL = 2.0
# The name of the check task's shared-storage marker file in INSTANCES_PATH: never trust it as a path.
SHARED_MARKER = re.compile(r"\.shared-[A-Za-z0-9_-]{1,64}")


class Resize(OperationFamily):
    """compute.prep_resize, resize_instance, finish_resize, confirm_resize, revert_resize,
    finish_revert_resize."""

    def prep_resize(self, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                    shared_marker: str | None) -> None:
        """Destination: remove the shared-storage marker, cache the image of ``spec``; nothing is
        created in ``INSTANCES_PATH/<uuid>`` (on a same-host resize it is the source's). Reports
        "prepared"."""

        def run() -> tuple[str, dict[str, Any] | None]:
            checked = self.migration_spec(instance_uuid, spec)
            self._remove_shared_marker(shared_marker)
            _base_image, fetched = self.fetch_base_image(checked)
            return fetched or f"host {self.host} is ready to receive instance {instance_uuid}", None

        self.migration_step("prep_resize", instance_uuid, migration_id, contract.MIGRATION_PREPARED, run)

    def resize_instance(self, instance_uuid: str, migration_id: int, dest_host: str, migration_uri: str,
                        timeout: float | None) -> None:
        """Source: power off (clean shutdown for up to ``timeout`` seconds, then forced), keep the
        files as ``<uuid>_resize``, copy the disk to ``dest_host`` over ``migration_uri``. Reports
        "migrated"; on failure everything is put back and "error" carries the power state."""

        def run() -> tuple[str, dict[str, Any] | None]:
            if not isinstance(migration_uri, str) or not migration_uri:
                raise contract.SpecError(f"resize_instance needs the destination's migration_uri, got "
                                         f"{migration_uri!r}")
            wait = self.shutdown_timeout(timeout)
            started = time.monotonic()
            bridges = self.instance_bridges(instance_uuid)
            # confirm_resize removes their chains here once the instance runs elsewhere for good.
            details["taps"] = self.instance_taps(instance_uuid)
            moved = self.driver.migrate_disk_and_power_off(
                instance_uuid, migration_uri, wait, self._copy_progress(migration_id),
                self.config.resize_copy_timeout(wait))
            # The domain is undefined here now (a revert defines it again, plugging its bridges).
            self.remove_unused_bridges(instance_uuid, bridges)
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

        details: dict[str, Any] = {"dest_host": dest_host}
        self.migration_step("resize_instance", instance_uuid, migration_id, contract.MIGRATION_MIGRATED, run,
                             details=details)

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
            checked = self.migration_spec(instance_uuid, spec)
            started = time.monotonic()
            with self.plugged(checked):
                self.driver.finish_migration(checked, bool(power_on))
            power_state = self.driver.get_info(instance_uuid)
            flavor = checked["flavor"]
            done = f"started in {time.monotonic() - started:.1f} s" if power_on else "left shut off"
            return (f"domain {contract.domain_name(instance_uuid)} defined on {self.host} with flavor "
                    f"{flavor.get('name') or '?'} ({flavor['vcpus']} vCPU, {flavor['memory_mb']} MiB RAM, "
                    f"{flavor['root_gb']} GiB disk) and {done}"), {"power_state": power_state}

        self.migration_step("finish_resize", instance_uuid, migration_id, contract.MIGRATION_FINISHED, run)

    def confirm_resize(self, instance_uuid: str, migration_id: int) -> None:
        """Source: remove ``<uuid>_resize``, and a leftover definition of the domain when the instance
        moved to another host (never the domain of a same-host resize: that is the instance). Reports
        "confirmed"."""

        def run() -> tuple[str, dict[str, Any] | None]:
            record = self.migration_journal.done(migration_id, "resize_instance") or {}
            dest_host = record.get("dest_host")
            moved = dest_host != self.host if isinstance(dest_host, str) else None
            self.driver.confirm_migration(instance_uuid, moved)
            taps = record.get("taps")
            # Not on a same-host resize: the taps are the running instance's.
            if moved and isinstance(taps, list):
                self.remove_filtering(instance_uuid, [tap for tap in taps if isinstance(tap, str)])
            return (f"original files of instance {instance_uuid} removed from {self.host}"), None

        self.migration_step("confirm_resize", instance_uuid, migration_id, contract.MIGRATION_CONFIRMED, run)

    def revert_resize(self, instance_uuid: str, migration_id: int) -> None:
        """Destination: destroy and undefine the domain, remove ``INSTANCES_PATH/<uuid>`` (the copy; the
        original stays in ``<uuid>_resize`` on the source). Reports "reverted_dest"."""

        def run() -> tuple[str, dict[str, Any] | None]:
            bridges, taps = self.instance_bridges(instance_uuid), self.instance_taps(instance_uuid)
            self.driver.destroy(instance_uuid)
            self.unplug(instance_uuid, bridges, taps)  # finish_revert_resize plugs them again on the source
            return f"the resized instance {instance_uuid} was destroyed and removed from {self.host}", None

        self.migration_step("revert_resize", instance_uuid, migration_id, contract.MIGRATION_REVERTED_DEST,
                             run)

    def finish_revert_resize(self, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                             power_on: bool) -> None:
        """Source: the original files back from ``<uuid>_resize``, the domain defined from ``spec`` (the
        old flavor) and started when ``power_on``. Reports "reverted" with the power state."""

        def run() -> tuple[str, dict[str, Any] | None]:
            checked = self.migration_spec(instance_uuid, spec)
            started = time.monotonic()
            with self.plugged(checked):
                self.driver.finish_revert_migration(checked, bool(power_on))
            power_state = self.driver.get_info(instance_uuid)
            done = f"started in {time.monotonic() - started:.1f} s" if power_on else "left shut off"
            return (f"instance {instance_uuid} back on {self.host} on its original disk with flavor "
                    f"{checked['flavor'].get('name') or '?'}, {done}"), {"power_state": power_state}

        self.migration_step("finish_revert_resize", instance_uuid, migration_id, contract.MIGRATION_REVERTED,
                             run)

    def _remove_shared_marker(self, marker: str | None) -> None:
        if not marker:
            return
        if not isinstance(marker, str) or not SHARED_MARKER.fullmatch(marker):
            LOG.warning("ignoring shared-storage marker %r: not a marker's name", marker)
            return
        (self.config.instances_path / marker).unlink(missing_ok=True)

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        # Fire-and-forget; each step reports conductor.migration_update.
        @tasks.task(contract.COMPUTE_PREP_RESIZE, ignore_result=True)
        def prep_resize(self: Task, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                        shared_marker: str | None = None) -> None:
            if family := tasks.family(self, cls):
                family.prep_resize(instance_uuid, migration_id, spec, shared_marker)

        @tasks.task(contract.COMPUTE_RESIZE_INSTANCE, ignore_result=True)
        def resize_instance(self: Task, instance_uuid: str, migration_id: int, dest_host: str,
                            migration_uri: str, timeout: float | None = None) -> None:
            if family := tasks.family(self, cls):
                family.resize_instance(instance_uuid, migration_id, dest_host, migration_uri, timeout)

        @tasks.task(contract.COMPUTE_FINISH_RESIZE, ignore_result=True)
        def finish_resize(self: Task, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                          power_on: bool = True) -> None:
            if family := tasks.family(self, cls):
                family.finish_resize(instance_uuid, migration_id, spec, power_on)

        @tasks.task(contract.COMPUTE_CONFIRM_RESIZE, ignore_result=True)
        def confirm_resize(self: Task, instance_uuid: str, migration_id: int) -> None:
            if family := tasks.family(self, cls):
                family.confirm_resize(instance_uuid, migration_id)

        @tasks.task(contract.COMPUTE_REVERT_RESIZE, ignore_result=True)
        def revert_resize(self: Task, instance_uuid: str, migration_id: int) -> None:
            if family := tasks.family(self, cls):
                family.revert_resize(instance_uuid, migration_id)

        @tasks.task(contract.COMPUTE_FINISH_REVERT_RESIZE, ignore_result=True)
        def finish_revert_resize(self: Task, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                                 power_on: bool = True) -> None:
            if family := tasks.family(self, cls):
                family.finish_revert_resize(instance_uuid, migration_id, spec, power_on)
