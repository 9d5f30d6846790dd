"""Build: spawn an instance, terminate it, read its console; a failed build is reported to be
rescheduled (or not).

Spawn and terminate converge by the domain's name: a spawn that finds the domain (an earlier attempt
died before it finished) never builds twice; a terminate of an instance that is not here succeeds. A
spawn's outcome is journaled before it is reported (:class:`~compute_workers.journal.SpawnJournal`): a
redelivery of a spawn that completed does nothing to the hypervisor, however late it comes (it must not
start a server stopped since, nor build again one deleted or failed since). The bridges of the
spec's networks are made (compute_workers.network.linuxbridge: idempotent) before the domain is
defined and started, with the ports' filtering (compute_workers.network.firewall); a terminate removes,
after the domain is gone, its taps' chains and the bridges it leaves unused. A terminate that
arrives during a spawn waits for it (the instance's lock).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Task

from compute_workers import contract
from compute_workers.contract import EventResult, TaskState, VmState
from compute_workers.exception import ComputeError, ConsoleUnavailable, InstanceNotFound, InvalidInstanceUUID
from compute_workers.journal import SpawnJournal
from compute_workers.operations.base import HostContext, OperationFamily, fault_from, target_values
from compute_workers.virt.driver import checked_uuid

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)

SPAWNING = TaskState.SPAWNING
DELETING = TaskState.DELETING
MAX_CONSOLE_LINES = 10_000


def reschedule_after(exc: BaseException) -> bool:
    """Whether another host may succeed: not for a bad spec or a bad image, yes for host errors."""
    if isinstance(exc, contract.SpecError):
        return False
    if isinstance(exc, ComputeError):
        return exc.reschedule
    return True


class Build(OperationFamily):
    """compute.spawn, compute.terminate, compute.get_console_output."""

    def __init__(self, context: HostContext) -> None:
        super().__init__(context)
        self.spawns = SpawnJournal(context.config.instances_path, context.host)

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
        with self.instance_locks.hold(spec["instance_uuid"]):
            if not self._spawn_redelivered(spec):
                self._spawn_locked(spec)

    def _spawn_redelivered(self, spec: dict[str, Any]) -> bool:
        """Whether this host already completed this spawn (its journal says so): then the domain is left
        as it is, whatever it became since, and only its state is reported again (the conductor drops it
        unless the first report was lost)."""
        instance_uuid = spec["instance_uuid"]
        try:
            record = self.spawns.done(instance_uuid, str(spec.get("request_id") or ""))
        except OSError as exc:
            LOG.error("cannot read the spawn journal of %s (%s): running the spawn", instance_uuid, exc)
            return False
        if record is None:
            return False
        try:
            state = self.power_state_or_none(instance_uuid)
        except Exception as exc:
            state = None
            LOG.warning("cannot read the power state of %s: %s", instance_uuid, exc)
        domain = "absent" if state is None else f"{state}, left as it is"
        LOG.info("spawn of %s already done on this host (%s); redelivered task ignored, domain %s",
                 instance_uuid, record.get("result"), domain)
        if record.get("result") == "success" and state is not None:
            self.update(instance_uuid, SPAWNING, target_values(state), event=self.event(
                "compute_spawn", EventResult.SUCCESS,
                f"domain {contract.domain_name(instance_uuid)} spawned on {self.host} already; redelivered "
                f"spawn ignored"))
        return True

    def _journal_spawn(self, spec: dict[str, Any], result: str) -> None:
        """Journal the spawn's ``result`` before it is reported; a journal that cannot be written is
        logged, never raised."""
        try:
            self.spawns.record(spec["instance_uuid"], str(spec.get("request_id") or ""), result)
        except OSError as exc:  # the outcome must still be reported
            LOG.error("cannot journal the spawn of %s (%s): a redelivery of it would run again",
                      spec["instance_uuid"], exc)

    def _spawn_locked(self, spec: dict[str, Any]) -> None:
        instance_uuid = spec["instance_uuid"]
        started = time.monotonic()
        try:
            existing = self.power_state_or_none(instance_uuid)
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
            with self.plugged(spec) as made:
                self._plugged_event(spec, made)
                self.driver.spawn(spec, base_image)
            power_state = self.driver.get_info(instance_uuid)
        except Exception as exc:
            self._build_failed(spec, exc, cleanup=driver_called)
            return
        message = (f"domain {contract.domain_name(instance_uuid)} started on {self.host} in "
                   f"{time.monotonic() - started:.1f} s")
        self._journal_spawn(spec, "success")
        self._spawned(instance_uuid, power_state, message)

    def _plugged_event(self, spec: dict[str, Any], made: list[str]) -> None:
        """Report the plug of the spec's networks (called right after it, before the domain starts)."""
        networks = spec.get("networks") or []
        if not networks:
            return
        bridges = ", ".join(dict.fromkeys(network["bridge"] for network in networks))
        message = (f"bridges {bridges} ready on {self.host}" + (f"; made {', '.join(made)}" if made else
                                                                "; they existed"))
        self.update(spec["instance_uuid"], SPAWNING, {},
                    event=self.event("compute_plug_vifs", EventResult.SUCCESS, message))

    def _spawned(self, instance_uuid: str, power_state: str, message: str) -> None:
        LOG.info("spawn of %s: %s", instance_uuid, message)
        self.update(instance_uuid, SPAWNING,
                    {"vm_state": VmState.ACTIVE, "task_state": None, "power_state": power_state},
                    event=self.event("compute_spawn", EventResult.SUCCESS, message))

    def _spawn_existing(self, spec: dict[str, Any], power_state: str) -> None:
        """The domain exists, and no spawn of it completed here (the journal): an earlier attempt died
        before it finished (the redelivery of one that completed never gets here). Never rebuild nor
        remove it (the conductor drops our report if the instance moved on); start it if that attempt
        died between defining and starting it."""
        instance_uuid = spec["instance_uuid"]
        try:
            if power_state == contract.POWER_PAUSED:
                self.driver.unpause(instance_uuid)
            elif power_state != contract.POWER_RUNNING:
                LOG.warning("spawn of %s: its domain exists but is %s; starting it", instance_uuid,
                            power_state)
                with self.plugged(spec):
                    self.driver.power_on(instance_uuid, spec)
            power_state = self.driver.get_info(instance_uuid)
        except Exception as exc:
            # Not build_failed: that would reschedule while the domain stays here.
            LOG.error("spawn of %s: cannot start its existing domain: %s", instance_uuid, exc)
            self._journal_spawn(spec, "error")
            self.update(instance_uuid, SPAWNING, {"vm_state": VmState.ERROR, "task_state": None},
                        fault=fault_from(exc, self.host))
            return
        self._journal_spawn(spec, "success")
        self._spawned(instance_uuid, power_state, f"domain {contract.domain_name(instance_uuid)} already "
                                                  f"exists on {self.host}; not rebuilt")

    def _prepare_image(self, spec: dict[str, Any]) -> Path | None:
        if not self.driver.capabilities["needs_base_image"]:
            return None
        label = spec["image"].get("name") or spec["image"]["id"]
        self.update(spec["instance_uuid"], SPAWNING, {}, event=self.event(
            "compute_prep_image", EventResult.START, f"preparing image {label} on {self.host}"))
        path, message = self.fetch_base_image(spec)
        self.update(spec["instance_uuid"], SPAWNING, {},
                    event=self.event("compute_prep_image", EventResult.SUCCESS, message))
        return path

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
            else:  # the chains of its taps go, and a bridge this attempt made (or found) no other guest uses
                networks = spec.get("networks") or ()
                self.unplug(instance_uuid, [network["bridge"] for network in networks],
                            [network["tap"] for network in networks])
        self._journal_spawn(spec, "error")
        self.reporter.report(contract.CONDUCTOR_BUILD_FAILED, instance_uuid=instance_uuid, host=self.host,
                             fault=fault_from(exc, self.host), reschedule=reschedule)

    def terminate(self, instance_uuid: str) -> None:
        """Destroy the instance (success when it is not here) and report instance_destroyed; on
        failure report the instance in error with the fault."""
        with self.instance_locks.hold(str(instance_uuid)):
            started = time.monotonic()
            bridges, taps = self.instance_bridges(instance_uuid), self.instance_taps(instance_uuid)
            try:
                self.driver.destroy(instance_uuid)
            except Exception as exc:
                LOG.error("terminate of %s failed on %s: %s", instance_uuid, self.host, exc,
                          exc_info=not isinstance(exc, ComputeError))
                self.update(instance_uuid, DELETING, {"vm_state": VmState.ERROR, "task_state": None},
                            fault=fault_from(exc, self.host))
                return
            self.unplug(instance_uuid, bridges, taps)
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

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        @tasks.task(contract.COMPUTE_SPAWN, ignore_result=True)
        def spawn(self: Task, spec: dict[str, Any]) -> None:
            host = spec.get("host") if isinstance(spec, dict) and isinstance(spec.get("host"), str) else None
            if family := tasks.family(self, cls, host):
                family.spawn(spec)

        @tasks.task(contract.COMPUTE_TERMINATE, ignore_result=True)
        def terminate(self: Task, instance_uuid: str) -> None:
            if family := tasks.family(self, cls):
                family.terminate(instance_uuid)

        @tasks.task(contract.COMPUTE_CONSOLE_OUTPUT, ignore_result=False)
        def get_console_output(self: Task, instance_uuid: str, lines: int | None = None) -> dict[str, str]:
            if family := tasks.family(self, cls):
                return family.get_console_output(instance_uuid, lines)
            return {"error": "ConsoleUnavailable",
                    "message": f"no host of this worker consumes the queue {tasks.route(self)!r}"}
