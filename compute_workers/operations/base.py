"""What every family of operations shares: the host's parts, the reports to the conductor, the checked
preamble of a journaled action, and the truth told after a failure.

A family (:class:`OperationFamily`) is constructed once per :class:`ComputeManager` and reaches the
host's config, driver, reporter, image cache, per-instance locks and journals through it; what only one
family needs (the snapshot slots, the running live migrations) it keeps itself. It never raises for an
operation's failure: that is reported, so a task is acknowledged once its outcome has been sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compute_workers import contract, migration_jobs
from compute_workers.config import ComputeConfig
from compute_workers.contract import EventResult, PowerState
from compute_workers.exception import ComputeError, InstanceNotFound, InvalidInstanceUUID
from compute_workers.images import ImageCache
from compute_workers.journal import ActionJournal, MigrationJournal
from compute_workers.locks import KeyedLock
from compute_workers.network.firewall import HostFirewall, RecordedFirewall
from compute_workers.network.host import AppliedPorts
from compute_workers.network.linuxbridge import HostBridges
from compute_workers.reporter import Reporter
from compute_workers.virt.driver import ComputeDriver, checked_uuid

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)

FAULT_DETAILS_MAX = 16 * 1024
MiB = 1024 * 1024

RUNNING, PAUSED, SUSPENDED = contract.POWER_RUNNING, contract.POWER_PAUSED, contract.POWER_SUSPENDED
SHUTDOWN = contract.POWER_SHUTDOWN



def target_values(power_state: str) -> dict[str, Any]:
    """The values of an instance whose domain is ``power_state`` and no task runs on."""
    return {"vm_state": contract.VM_STATE_OF_POWER_STATE[PowerState(power_state)], "task_state": None,
            "power_state": power_state}


def fault_from(exc: BaseException, host: str) -> dict[str, Any]:
    """The fault the conductor records: a message the user can act on, the traceback for admins."""
    if isinstance(exc, ComputeError | contract.SpecError):
        message = str(exc)
    else:
        message = f"unexpected error on host {host}: {type(exc).__name__}: {exc}"
    details = "".join(traceback.format_exception(exc))[-FAULT_DETAILS_MAX:]
    return {"message": message, "code": 500, "details": details}


@dataclasses.dataclass(frozen=True)
class HostContext:
    """The parts of a host every family of operations works with; the manager makes one and keeps it."""

    config: ComputeConfig
    driver: ComputeDriver
    reporter: Reporter
    images: ImageCache
    # Operations on one instance are serialized within the process.
    instance_locks: KeyedLock
    journal: ActionJournal
    migration_journal: MigrationJournal
    # The host's bridges (and VXLANs) the guests' taps go on: made before a domain starts.
    bridges: HostBridges
    # The filtering of the guests' taps (security groups, anti-spoofing): applied before a domain starts.
    firewall: HostFirewall = dataclasses.field(default_factory=RecordedFirewall)
    # The ports of the last host network state applied (compute.network_host_sync), awaited by a live
    # migration's destination.
    applied_ports: AppliedPorts = dataclasses.field(default_factory=AppliedPorts)

    @property
    def host(self) -> str:
        return self.config.host


class HostOperations:
    """Operations on a host's instances: the host's parts and the helpers the families share.

    Holds the :class:`HostContext`, never the manager: a family lives as long as its manager and
    references nothing that references it back, so a dropped manager is freed (and its hypervisor
    connection closed) at once, as before the operations were split from it.
    """

    def __init__(self, context: HostContext) -> None:
        self.context = context
        self.config = context.config
        self.host = context.host
        self.driver = context.driver
        self.reporter = context.reporter
        self.images = context.images
        self.instance_locks = context.instance_locks
        self.journal = context.journal
        self.migration_journal = context.migration_journal
        self.bridges = context.bridges
        self.firewall = context.firewall

    # Reports --------------------------------------------------------------------------------------

    @staticmethod
    def event(name: str, result: EventResult, message: str) -> contract.Event:
        """An instance action event of a report."""
        return {"name": name, "result": result, "message": message}

    def update(self, instance_uuid: str, expected_task_state: str | None, values: dict[str, Any], *,
               event: contract.Event | None = None, fault: dict[str, Any] | None = None,
               action_id: int | None = None) -> None:
        """``conductor.instance_update`` of the instance on this host."""
        self.reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, instance_uuid=instance_uuid, host=self.host,
                             expected_task_state=expected_task_state, values=values, event=event,
                             fault=fault, action_id=action_id)

    def migration_update(self, migration_id: int, status: str, *, error: str | None = None,
                         values: dict[str, Any] | None = None, event: contract.Event | None = None) -> None:
        """``conductor.migration_update`` of a step of a cold or live migration run here."""
        self.reporter.report(contract.CONDUCTOR_MIGRATION_UPDATE, migration_id=migration_id, host=self.host,
                             status=status, error=error, values=values, event=event)

    def failure_message(self, exc: BaseException) -> str:
        """What a user reads of a failure: our errors' own messages, anything else named as unexpected."""
        if isinstance(exc, ComputeError | contract.SpecError):
            return str(exc)
        return f"unexpected error on host {self.host}: {type(exc).__name__}: {exc}"

    def migration_done(self, migration_id: int, instance_uuid: str, step: str, status: str, *,
                        error: str | None = None, values: dict[str, Any] | None = None,
                        event: contract.Event | None = None, details: dict[str, Any] | None = None) -> None:
        """Journal the step's final ``status`` (with ``details``, what a later step wants to know), then
        report it."""
        result = EventResult.ERROR if status in migration_jobs.FAILED_STATUSES else EventResult.SUCCESS
        try:
            self.migration_journal.record(migration_id, step, instance_uuid, result,
                                          **{**(details or {}), "status": status})
        except OSError as exc:  # the outcome must still be reported
            LOG.error("cannot journal %s of migration %s (%s): a redelivery of it would run again", step,
                      migration_id, exc)
        self.migration_update(migration_id, status, error=error, values=values, event=event)

    def migration_redelivered(self, step: str, instance_uuid: str, migration_id: int, *,
                              values: bool = True) -> bool:
        """Whether ``step`` of this migration already ended here; if so its journaled status is reported
        again (with the power state read now when ``values``): the conductor drops what it already
        applied, so this only makes up for a report lost between the journal and the send."""
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
        self.migration_update(migration_id, status, error=message if failed else None,
                              values=self.migration_values(instance_uuid) if values else None)
        return True

    def migration_step(self, step: str, instance_uuid: str, migration_id: Any, status: str,
                       run: Callable[[], tuple[str, dict[str, Any] | None]], *,
                       details: dict[str, Any] | None = None, report_redelivery: bool = False,
                       redelivered_values: bool = True) -> None:
        """Run one step of a migration unless this host already did (journal), journal it, report it:
        ``status`` with the ``values`` and message ``run`` returns (event ``compute_<step>`` closed
        with "success"), or "error" with the message of what ``run`` raised, the power state read now
        and the event closed with "error". A redelivered step does nothing; with ``report_redelivery``
        it reports its journaled status again (with the power state read now when
        ``redelivered_values``). Never raises."""
        event = f"compute_{step}"
        if isinstance(migration_id, bool) or not isinstance(migration_id, int):
            LOG.error("%s of %r refused: migration id %r is not an integer (no report can name it)", event,
                      instance_uuid, migration_id)
            return
        try:
            checked_uuid(instance_uuid)
        except InvalidInstanceUUID as exc:
            LOG.error("%s of migration %s refused: %s", event, migration_id, exc)
            self.migration_update(migration_id, contract.MIGRATION_ERROR, error=str(exc),
                                  event=self.event(event, EventResult.ERROR, str(exc)))
            return
        with self.instance_locks.hold(instance_uuid):
            if report_redelivery:
                if self.migration_redelivered(step, instance_uuid, migration_id, values=redelivered_values):
                    return
            elif self.migration_journal.done(migration_id, step) is not None:
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
                self.migration_done(migration_id, instance_uuid, step, contract.MIGRATION_ERROR, error=error,
                                    values=self.migration_values(instance_uuid) or None,
                                    event=self.event(event, EventResult.ERROR, error), details=details)
                return
            LOG.info("%s of %s (migration %s): %s", event, instance_uuid, migration_id, message)
            self.migration_done(migration_id, instance_uuid, step, status, values=values,
                                event=self.event(event, EventResult.SUCCESS, message), details=details)

    def migration_spec(self, instance_uuid: str, spec: dict[str, Any] | None) -> dict[str, Any]:
        """The spec a migration step defines the domain from: valid, of this instance, for this host."""
        checked = self.checked_spec(instance_uuid, spec)
        if checked is None:
            raise contract.SpecError(f"no spec for instance {instance_uuid}: this step needs one")
        if checked["host"] != self.host:
            raise contract.SpecError(f"spec is for host {checked['host']}, not {self.host}")
        return checked

    def migration_values(self, instance_uuid: str) -> dict[str, Any]:
        """``{"power_state"}`` read now: ``nostate`` when the domain is not here; empty when the
        hypervisor cannot say (the conductor keeps what it has)."""
        try:
            return {"power_state": self.driver.get_info(instance_uuid)}
        except InstanceNotFound:
            return {"power_state": contract.POWER_NOSTATE}
        except Exception as exc:
            LOG.warning("cannot read the power state of %s: %s", instance_uuid, exc)
            return {}

    # Images ---------------------------------------------------------------------------------------

    def fetch_base_image(self, spec: dict[str, Any]) -> tuple[Path | None, str]:
        """The base image of a validated ``spec`` in the cache (downloaded when missing) and what was
        done, for an event; ``(None, "")`` when the driver needs no image. Raises ImageDownloadError."""
        if not self.driver.capabilities["needs_base_image"]:
            return None, ""
        image = spec["image"]
        label = image.get("name") or image["id"]
        fetched = self.images.fetch(image)
        if not fetched.downloaded_bytes:
            return fetched.path, f"image {label} already cached on {self.host}"
        return fetched.path, (f"image {label} downloaded to {self.host}: {fetched.downloaded_bytes} bytes in "
                              f"{fetched.seconds:.1f} s")

    # The host's bridges ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def plugged(self, spec: dict[str, Any] | None) -> Iterator[list[str]]:
        """Ensure the bridges of ``spec``'s networks (a definition regenerated from it names them) and
        hold them until the block ends, with each port's filtering (its ``security``) in place: run the
        domain's define and start inside it, so a guest never runs unfiltered. None: the current
        definition is kept, its bridges exist (or the start says they do not). Yields what was made;
        raises (PlugError, FirewallError) before the block when either cannot be done."""
        networks = list((spec or {}).get("networks") or ())
        with self.bridges.plugged(networks) as made:
            yield made + self.firewall.apply(networks)

    def instance_taps(self, instance_uuid: str) -> list[str]:
        """The taps of the instance's domain here, read before it goes ([] when it cannot be read: their
        chains then stay until the next host network sync)."""
        try:
            return self.driver.instance_taps(instance_uuid)
        except Exception as exc:
            LOG.warning("cannot read the taps of %s: %s", instance_uuid, exc)
            return []

    def remove_filtering(self, instance_uuid: str, taps: list[str]) -> None:
        """After the instance's domain is gone from this host: remove the firewall chains of its taps
        (and end their connections). A failure is logged, never raised."""
        if not taps:
            return
        try:
            self.firewall.remove(dict.fromkeys(taps))
        except Exception as exc:
            LOG.error("cannot remove the firewall chains of %s (%s) left by %s: %s", ", ".join(taps),
                      self.host, instance_uuid, exc)

    def unplug(self, instance_uuid: str, bridges: list[str], taps: list[str]) -> None:
        """After the instance's domain is gone from this host: its taps' chains, then the bridges no
        other guest uses. Failures are logged, never raised: the instance is gone all the same."""
        self.remove_filtering(instance_uuid, taps)
        self.remove_unused_bridges(instance_uuid, bridges)

    def instance_bridges(self, instance_uuid: str) -> list[str]:
        """The bridges of the instance's domain here, read before it goes ([] when it cannot be read:
        its bridges then stay until another guest's removal or a restart of the network side)."""
        try:
            return self.driver.instance_bridges(instance_uuid)
        except Exception as exc:
            LOG.warning("cannot read the bridges of %s: %s", instance_uuid, exc)
            return []

    def remove_unused_bridges(self, instance_uuid: str, bridges: list[str]) -> None:
        """After the instance's domain is gone from this host: remove those of ``bridges`` no other
        guest uses. A failure is logged, never raised: the instance is gone all the same."""
        for bridge in dict.fromkeys(bridges):
            try:
                self.bridges.remove_bridge_if_unused(bridge)
            except Exception as exc:
                LOG.error("cannot remove bridge %s left by %s: %s", bridge, instance_uuid, exc)

    # The hypervisor's truth -----------------------------------------------------------------------

    def power_state_or_none(self, instance_uuid: str) -> str | None:
        """The domain's power state; None when it is not defined here."""
        try:
            return self.driver.get_info(instance_uuid)
        except InstanceNotFound:
            return None

    def truth(self, instance_uuid: str) -> dict[str, Any]:
        """The values of a failed operation: what the hypervisor says now; only task_state None when
        it cannot say (the conductor keeps the rest as it was)."""
        try:
            return target_values(self.driver.get_info(instance_uuid))
        except InstanceNotFound:
            return target_values(contract.POWER_NOSTATE)
        except Exception as exc:
            LOG.warning("cannot read the power state of %s after a failure: %s", instance_uuid, exc)
            return {"task_state": None}

    # Arguments ------------------------------------------------------------------------------------

    def checked_spec(self, instance_uuid: str, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        """The spec to regenerate the definition from; None (or {}) keeps the current definition."""
        if not spec:
            LOG.warning("no spec for %s: its current domain definition is kept", instance_uuid)
            return None
        contract.validate_spec(spec)
        if spec["instance_uuid"] != instance_uuid:
            raise contract.SpecError(f"spec is for instance {spec['instance_uuid']}, not {instance_uuid}")
        return spec

    def shutdown_timeout(self, timeout: float | None) -> float:
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

    # The preamble of a journaled action (lifecycle operations, snapshots) -------------------------
    #
    # A redelivered action (its id in the journal) does nothing: a second reboot is not a no-op, so
    # convergence alone is not enough (see compute_workers.journal).

    @staticmethod
    def checked_action(event: str, instance_uuid: str, action_id: Any) -> int | bool | None:
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

    def redelivered(self, event: str, instance_uuid: str, action_id: int | None) -> bool:
        """Whether the action was already done here (called with the instance's lock held)."""
        if action_id is not None and self.journal.done(instance_uuid, action_id):
            LOG.info("action %s already done on this host; redelivered task ignored (%s of %s)",
                     action_id, event, instance_uuid)
            return True
        if action_id is None:
            LOG.warning("%s of %s carries no action id: a redelivery of it would run again", event,
                        instance_uuid)
        return False

    def journal_action(self, instance_uuid: str, action_id: int | None, result: str) -> None:
        """Journal the action's ``result``; a journal that cannot be written is logged, never raised."""
        if action_id is None:
            return
        try:
            self.journal.record(instance_uuid, action_id, result)
        except OSError as exc:  # the outcome must still be reported
            LOG.error("cannot journal action %s of %s (%s): a redelivery of it would run again",
                      action_id, instance_uuid, exc)


class OperationFamily(HostOperations):
    """One family of operations of a host (build, lifecycle, snapshot, ...): its tasks' methods.

    A new family is a subclass in a module of its own, listed in
    :data:`compute_workers.operations.FAMILIES`: every manager constructs it with its
    :class:`HostContext`, and :meth:`register_tasks` declares its Celery tasks.
    """

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        """Declare the family's Celery tasks on ``tasks`` (names from the contract, each a thin
        wrapper that calls one method of the family of the host the task is for)."""
        raise NotImplementedError
