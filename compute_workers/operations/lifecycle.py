"""Lifecycle: reboot (soft, hard), power off and on, pause and unpause, suspend and resume.

Each one: a redelivered action (its id in the journal) does nothing; otherwise the event is opened
("start"), the operation converges to its target (already there: nothing done, success), the action is
journaled, then the event is closed with "success" and the target values, or with "error", the truth
read from the hypervisor and a fault. Never raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from celery import Task

from compute_workers import contract
from compute_workers.contract import EventResult, TaskState
from compute_workers.exception import ComputeError, InstanceInvalidState, InstanceNotFound
from compute_workers.operations.base import (
    PAUSED,
    RUNNING,
    SHUTDOWN,
    SUSPENDED,
    OperationFamily,
    fault_from,
    target_values,
)

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)


class Lifecycle(OperationFamily):
    """compute.reboot_instance, power_off_instance, power_on_instance, pause_instance, unpause_instance,
    suspend_instance, resume_instance."""

    def reboot_instance(self, instance_uuid: str, action_id: int | None, reboot_type: str,
                        spec: dict[str, Any] | None) -> None:
        """SOFT: ACPI shutdown, wait up to COMPUTE_CLEAN_SHUTDOWN_TIMEOUT, start again from the
        definition regenerated from ``spec``; a guest that is not running or does not shut down in time
        is rebooted hard (event ``fallback_to_hard_reboot``). HARD: destroy, regenerate, start."""
        hard = reboot_type == contract.REBOOT_HARD
        task_state = TaskState.REBOOTING_HARD if hard else TaskState.REBOOTING

        def run() -> str:
            if reboot_type not in (contract.REBOOT_SOFT, contract.REBOOT_HARD):
                raise contract.SpecError(f"unknown reboot type {reboot_type!r}: expected "
                                         f"{contract.REBOOT_SOFT} or {contract.REBOOT_HARD}")
            checked = self.checked_spec(instance_uuid, spec)
            state = self.power_state_or_none(instance_uuid)
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
            with self.plugged(checked):
                self.driver.power_on(instance_uuid, checked)
            return (f"guest shut down cleanly in {shut_down:.1f} s and was started again; rebooted in "
                    f"{time.monotonic() - started:.1f} s")

        self._lifecycle(instance_uuid, action_id, "compute_reboot_instance", task_state,
                        f"{reboot_type} reboot of {contract.domain_name(instance_uuid)} on {self.host}",
                        target_values(RUNNING), run)

    def _fall_back_to_hard_reboot(self, instance_uuid: str, action_id: int | None, task_state: str,
                                  spec: dict[str, Any] | None, state: str | None, message: str) -> str:
        LOG.warning("soft reboot of %s: %s", instance_uuid, message)
        self.update(instance_uuid, task_state, {}, action_id=action_id,
                    event=self.event("fallback_to_hard_reboot", EventResult.SUCCESS, message))
        return self._hard_reboot(instance_uuid, spec, state)

    def _hard_reboot(self, instance_uuid: str, spec: dict[str, Any] | None, state: str | None) -> str:
        started = time.monotonic()
        with self.plugged(spec):
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
            wait = self.shutdown_timeout(timeout)
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

        self._lifecycle(instance_uuid, action_id, "compute_stop_instance", TaskState.POWERING_OFF,
                        f"powering off {contract.domain_name(instance_uuid)} on {self.host}",
                        target_values(SHUTDOWN), run)

    def power_on_instance(self, instance_uuid: str, action_id: int | None,
                          spec: dict[str, Any] | None) -> None:
        """Start from the definition regenerated from ``spec`` (a saved memory state, if any, is
        restored as it is); a paused domain is unpaused; a lost definition is recreated."""

        def run() -> str:
            checked = self.checked_spec(instance_uuid, spec)
            state = self.power_state_or_none(instance_uuid)
            if state == RUNNING:
                return f"domain was already running on host {self.host}; nothing to do"
            started = time.monotonic()
            with self.plugged(checked):
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

        self._lifecycle(instance_uuid, action_id, "compute_start_instance", TaskState.POWERING_ON,
                        f"powering on {contract.domain_name(instance_uuid)} on {self.host}",
                        target_values(RUNNING), run)

    def pause_instance(self, instance_uuid: str, action_id: int | None) -> None:
        """Freeze the vCPUs (libvirt suspend)."""
        self._simple_lifecycle(instance_uuid, action_id, "pause", TaskState.PAUSING, PAUSED, {
            RUNNING: (self.driver.pause, "vCPUs paused")}, hint="start or resume it first")

    def unpause_instance(self, instance_uuid: str, action_id: int | None) -> None:
        """Let the vCPUs run again (libvirt resume)."""
        self._simple_lifecycle(instance_uuid, action_id, "unpause", TaskState.UNPAUSING, RUNNING, {
            PAUSED: (self.driver.unpause, "vCPUs running again")},
            hint="only a paused instance can be unpaused")

    def suspend_instance(self, instance_uuid: str, action_id: int | None) -> None:
        """Save the memory to disk and stop the domain (libvirt managed save)."""
        self._simple_lifecycle(instance_uuid, action_id, "suspend", TaskState.SUSPENDING, SUSPENDED, {
            RUNNING: (self.driver.suspend, "memory saved to disk and domain stopped"),
            PAUSED: (self.driver.suspend, "memory of the paused guest saved to disk and domain stopped")},
            hint="a shut-off instance has no memory to save")

    def resume_instance(self, instance_uuid: str, action_id: int | None) -> None:
        """Restore a suspended domain from its saved memory; a paused one is unpaused."""
        self._simple_lifecycle(instance_uuid, action_id, "resume", TaskState.RESUMING, RUNNING, {
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
                        f"{verb} {contract.domain_name(instance_uuid)} on {self.host}", target_values(target),
                        run)

    def _lifecycle(self, instance_uuid: str, action_id: int | None, event: str, task_state: str,
                   start_message: str, target: dict[str, Any], run: Callable[[], str]) -> None:
        action_id = self.checked_action(event, instance_uuid, action_id)
        if action_id is False:
            return
        with self.instance_locks.hold(instance_uuid):
            if self.redelivered(event, instance_uuid, action_id):
                return
            self.update(instance_uuid, task_state, {}, action_id=action_id,
                        event=self.event(event, EventResult.START, start_message))
            try:
                message = run()
            except Exception as exc:
                values = self.truth(instance_uuid)
                fault = fault_from(exc, self.host)
                if isinstance(exc, InstanceNotFound):
                    fault["message"] = (f"domain {contract.domain_name(instance_uuid)} does not exist on "
                                        f"host {self.host}")
                LOG.error("%s of %s failed on %s: %s", event, instance_uuid, self.host, fault["message"],
                          exc_info=not isinstance(exc, ComputeError | contract.SpecError))
                self.journal_action(instance_uuid, action_id, "error")
                self.update(instance_uuid, task_state, values, action_id=action_id, fault=fault,
                            event=self.event(event, EventResult.ERROR, fault["message"]))
                return
            LOG.info("%s of %s: %s", event, instance_uuid, message)
            self.journal_action(instance_uuid, action_id, "success")
            self.update(instance_uuid, task_state, target, action_id=action_id,
                        event=self.event(event, EventResult.SUCCESS, message))

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        # Fire-and-forget like spawn; the outcome goes to the conductor.
        @tasks.task(contract.COMPUTE_REBOOT, ignore_result=True)
        def reboot_instance(self: Task, instance_uuid: str, action_id: int | None, reboot_type: str,
                            spec: dict[str, Any] | None = None) -> None:
            if family := tasks.family(self, cls):
                family.reboot_instance(instance_uuid, action_id, reboot_type, spec)

        @tasks.task(contract.COMPUTE_POWER_OFF, ignore_result=True)
        def power_off_instance(self: Task, instance_uuid: str, action_id: int | None,
                               timeout: float | None = None) -> None:
            if family := tasks.family(self, cls):
                family.power_off_instance(instance_uuid, action_id, timeout)

        @tasks.task(contract.COMPUTE_POWER_ON, ignore_result=True)
        def power_on_instance(self: Task, instance_uuid: str, action_id: int | None,
                              spec: dict[str, Any] | None = None) -> None:
            if family := tasks.family(self, cls):
                family.power_on_instance(instance_uuid, action_id, spec)

        @tasks.task(contract.COMPUTE_PAUSE, ignore_result=True)
        def pause_instance(self: Task, instance_uuid: str, action_id: int | None) -> None:
            if family := tasks.family(self, cls):
                family.pause_instance(instance_uuid, action_id)

        @tasks.task(contract.COMPUTE_UNPAUSE, ignore_result=True)
        def unpause_instance(self: Task, instance_uuid: str, action_id: int | None) -> None:
            if family := tasks.family(self, cls):
                family.unpause_instance(instance_uuid, action_id)

        @tasks.task(contract.COMPUTE_SUSPEND, ignore_result=True)
        def suspend_instance(self: Task, instance_uuid: str, action_id: int | None) -> None:
            if family := tasks.family(self, cls):
                family.suspend_instance(instance_uuid, action_id)

        @tasks.task(contract.COMPUTE_RESUME, ignore_result=True)
        def resume_instance(self: Task, instance_uuid: str, action_id: int | None) -> None:
            if family := tasks.family(self, cls):
                family.resume_instance(instance_uuid, action_id)
