"""Evacuation (Nova's evacuate): a server whose host died, and was fenced, is rebuilt on this host.

rebuild_instance (the destination) builds it from what spawn uses (the base image in the cache, the
instance directory, the ports plugged with their filtering, the domain defined from the spec) and
on shared storage from the dead host's own disk, which is then its only copy: missing, it is an error
and nothing is created in its place; whatever fails, it is never removed. destroy_evacuated (the dead
host, once it is back) removes the stale domain without ever starting it, and the instance directory
unless it is the new host's (shared storage).

Each step runs as a migration step (:meth:`~compute_workers.operations.base.HostOperations.migration_step`:
journal key ``migration-<id>-<step>``, reports with ``conductor.migration_update``); a redelivered one
reports its journaled status again. A domain of the instance already here when a rebuild starts (a
redelivery whose journal was not written) is reported as it is: never a second domain.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import Task

from compute_workers import contract
from compute_workers.operations.base import OperationFamily

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)


class Evacuate(OperationFamily):
    """compute.rebuild_instance, compute.destroy_evacuated."""

    def rebuild_instance(self, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                         on_shared_storage: bool, power_on: bool) -> None:
        """Destination: build the instance here (see the module); reports "rebuilt" with ``values``
        ``{"power_state"}``, or "error" with ``error`` (nothing of it left defined here)."""
        shared = bool(on_shared_storage)

        def run() -> tuple[str, dict[str, Any] | None]:
            checked = self.migration_spec(instance_uuid, spec)
            existing = self.power_state_or_none(instance_uuid)
            if existing is not None:
                LOG.warning("rebuild of %s: its domain already exists on %s (%s); not built again",
                            instance_uuid, self.host, existing)
                return (f"domain {contract.domain_name(instance_uuid)} already exists on {self.host} "
                        f"({existing}); not built again"), {"power_state": existing}
            started = time.monotonic()
            base_image, fetched = self.fetch_base_image(checked)
            networks = checked.get("networks") or ()
            try:
                with self.plugged(checked) as made:
                    self.driver.rebuild(checked, base_image, shared, bool(power_on))
            except Exception:
                self._undo(instance_uuid, networks, shared)
                raise
            power_state = self.driver.get_info(instance_uuid)
            disk = ("on its disk on the storage shared with the host that died" if shared
                    else "from image " + str(checked["image"].get("name") or checked["image"]["id"])
                    + " (the old disk's data is lost)")
            done = "started" if power_on else "left shut off"
            parts = [f"domain {contract.domain_name(instance_uuid)} rebuilt on {self.host} {disk} and {done} "
                     f"in {time.monotonic() - started:.1f} s", fetched]
            if made:
                parts.append(f"made {', '.join(made)}")
            return "; ".join(filter(None, parts)), {"power_state": power_state}

        self.migration_step("rebuild_instance", instance_uuid, migration_id, contract.MIGRATION_REBUILT, run,
                            report_redelivery=True)

    def _undo(self, instance_uuid: str, networks: Any, shared: bool) -> None:
        """After a failed rebuild: no domain of it left here (the driver promises it; this is the belt to
        its braces), its directory removed unless ``shared`` (the dead host's disk, never removed), its
        taps' chains and the bridges no other guest uses. Failures are logged: the rebuild's error is
        what is reported."""
        try:
            self.driver.destroy(instance_uuid, destroy_disks=not shared)
        except Exception:
            LOG.exception("cleanup after the failed rebuild of %s failed", instance_uuid)
            return
        self.unplug(instance_uuid, [network["bridge"] for network in networks],
                    [network["tap"] for network in networks])

    def destroy_evacuated(self, instance_uuid: str, migration_id: int, keep_disks: bool) -> None:
        """The host that came back: the stale domain of an instance evacuated while this host was down
        is destroyed and undefined (never started), ``INSTANCES_PATH/<uuid>`` removed unless
        ``keep_disks``. Nothing there is success. Reports "source_cleaned"."""

        def run() -> tuple[str, dict[str, Any] | None]:
            state = self.power_state_or_none(instance_uuid)
            bridges, taps = self.instance_bridges(instance_uuid), self.instance_taps(instance_uuid)
            self.driver.destroy(instance_uuid, destroy_disks=not keep_disks)
            self.unplug(instance_uuid, bridges, taps)
            found = (f"stale domain {contract.domain_name(instance_uuid)} ({state}) destroyed and undefined"
                     if state is not None else "no stale domain was left")
            files = ("its directory is on storage shared with the host it was rebuilt on and is kept"
                     if keep_disks else "its directory removed")
            return f"host {self.host}: {found}; {files}", None

        self.migration_step("destroy_evacuated", instance_uuid, migration_id,
                            contract.MIGRATION_SOURCE_CLEANED, run, report_redelivery=True,
                            redelivered_values=False)  # as the first report: no values

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        # Fire-and-forget; each step reports conductor.migration_update.
        @tasks.task(contract.COMPUTE_REBUILD_INSTANCE, ignore_result=True)
        def rebuild_instance(self: Task, instance_uuid: str, migration_id: int, spec: dict[str, Any],
                             on_shared_storage: bool, power_on: bool = True) -> None:
            if family := tasks.family(self, cls):
                family.rebuild_instance(instance_uuid, migration_id, spec, on_shared_storage, power_on)

        @tasks.task(contract.COMPUTE_DESTROY_EVACUATED, ignore_result=True)
        def destroy_evacuated(self: Task, instance_uuid: str, migration_id: int, keep_disks: bool) -> None:
            if family := tasks.family(self, cls):
                family.destroy_evacuated(instance_uuid, migration_id, keep_disks)
