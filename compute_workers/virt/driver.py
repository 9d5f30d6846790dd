"""The interface between the compute manager and a hypervisor.

A driver knows one hypervisor; it never talks to the conductor (the manager reports) and keeps no
state that the hypervisor does not have: after a worker restart, ``list_instances`` tells the truth.
Each method's docstring says what holds afterwards and what happens on failure, as Nova's
``nova/virt/driver.py`` does. Errors are :mod:`compute_workers.exception` classes; a driver wraps its
library's errors (``libvirtError``) in :class:`~compute_workers.exception.HypervisorError`.

Instances are named by their uuid; the domain is ``contract.domain_name(uuid)`` and the files live in
``INSTANCES_PATH/<uuid>/``. Optional features are declared in :attr:`ComputeDriver.capabilities`.
"""

from __future__ import annotations

import abc
import dataclasses
import uuid as uuid_lib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from compute_workers import contract
from compute_workers.exception import InvalidInstanceUUID

# Keys of get_available_resource(); the manager adds libvirt_uri, driver, the reserved amounts and
# instances to make contract.HEARTBEAT_RESOURCE_KEYS.
DRIVER_RESOURCE_KEYS = ("virt_type", "hypervisor_type", "hypervisor_version", "vcpus", "memory_mb",
                        "disk_gb", "cpu_info")

# Every capability a driver declares, False until a driver says otherwise.
CAPABILITY_NAMES = (
    "needs_base_image",     # spawn() wants the image downloaded into the cache (base_image argument)
    "supports_reboot",      # shutdown, hard_reboot (and soft reboot, made of shutdown and power_on)
    "supports_power_ops",   # shutdown, power_off, power_on
    "supports_pause",       # pause, unpause
    "supports_suspend",     # suspend, resume
    "supports_lifecycle_events",  # register_lifecycle_callback
    "supports_snapshot",
    "supports_live_migration",
    # Guests' NICs are taps on this host's Linux bridges: the worker must make the bridges (and VXLANs)
    # before a domain starts (compute_workers.network.linuxbridge). False: the hypervisor needs no
    # host device (libvirt's test driver, the fake), the bridges are only recorded.
    "plugs_host_bridges",
)

# What live_migration_force_complete() did to make a migration converge.
SWITCHED_TO_POST_COPY = "post-copy"
SWITCHED_BY_PAUSING = "paused"


def checked_uuid(instance_uuid: str) -> str:
    """Return ``instance_uuid`` if it is a canonical lower-case UUID, else raise InvalidInstanceUUID.

    The uuid names a directory that destroy() deletes: nothing else may get that far.
    """
    try:
        canonical = str(uuid_lib.UUID(instance_uuid))
    except (ValueError, TypeError, AttributeError):
        canonical = None
    if canonical != instance_uuid:
        raise InvalidInstanceUUID(f"invalid instance uuid {instance_uuid!r}")
    return instance_uuid


def instance_uuid_of(domain_name: str) -> str | None:
    """The instance uuid of a cloudctl domain name, None for any other domain."""
    prefix = contract.domain_name("")
    if not domain_name.startswith(prefix):
        return None
    try:
        return checked_uuid(domain_name[len(prefix):])
    except InvalidInstanceUUID:
        return None


@dataclasses.dataclass(frozen=True)
class DiskMigration:
    """What :meth:`ComputeDriver.migrate_disk_and_power_off` did, for the report."""

    power_state: str             # the instance's power state before (what a revert returns to)
    clean_shutdown: bool | None  # None: it was already shut off
    disk_bytes: int              # size of the disk file copied (holes included)
    sent_bytes: int              # bytes that travelled as data
    copy_seconds: float
    resumed: bool = False        # an earlier run had powered off and moved the files already


class ComputeDriver(abc.ABC):
    """A hypervisor as the compute manager sees it. Methods are called from several threads at once,
    but never two at once for the same instance (the manager holds a per-instance lock)."""

    #: Name used by COMPUTE_DRIVER and reported in heartbeats.
    name: str = ""

    def __init__(self) -> None:
        self.capabilities: Mapping[str, bool] = {name: False for name in CAPABILITY_NAMES}

    @abc.abstractmethod
    def init_host(self) -> None:
        """Connect to the hypervisor and prepare the host (directories, virt type).

        Afterwards every other method can be called. Raises HypervisorError when the hypervisor
        cannot be used; the worker then refuses to start.
        """

    @abc.abstractmethod
    def get_available_resource(self) -> dict[str, Any]:
        """The host's totals, keys :data:`DRIVER_RESOURCE_KEYS` (see contract.HEARTBEAT_RESOURCE_KEYS).

        Totals, not what is free: the scheduler subtracts its allocations. Raises HypervisorError.
        """

    @abc.abstractmethod
    def list_instances(self) -> dict[str, str]:
        """instance uuid -> power state (``contract.POWER_*``) of every cloudctl domain on the host.

        Domains not named ``instance-<uuid>`` are someone else's and are left out.
        """

    @abc.abstractmethod
    def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
        """Create and start the instance of a validated ``spec``.

        ``base_image`` is the cached image file when ``capabilities["needs_base_image"]``, else None.
        Afterwards the domain exists and runs. Raises InstanceExists if a domain of that instance is
        already defined (the manager checks first). If this fails, any partial instance is completely
        cleaned up (no domain, no instance directory) before the error propagates.
        """

    @abc.abstractmethod
    def destroy(self, instance_uuid: str, destroy_disks: bool = True) -> None:
        """Stop the domain at once, undefine it (managed save included), delete its directory unless
        ``destroy_disks`` is False (Nova's: the directory is on storage another host now uses).

        Afterwards no domain of the instance is left on the host (and, with ``destroy_disks``, none of its
        files). Never starts anything. If the instance is not found, this still succeeds. Raises
        HypervisorError when the hypervisor refuses; what was removed stays removed and a second call
        finishes the job.
        """

    def instance_bridges(self, instance_uuid: str) -> list[str]:
        """The Linux bridges the instance's NICs are plugged into (its domain's ``<interface
        type='bridge'>``), in order; [] when it has none or is not here. Read before :meth:`destroy`, so
        that the bridges it leaves unused can be removed afterwards."""
        return []

    def instance_taps(self, instance_uuid: str) -> list[str]:
        """The taps of the instance's NICs (its domain's ``<interface type='bridge'>`` target devices), in
        order; [] when it has none or is not here. Read before the domain goes, so that their firewall
        chains can be removed afterwards."""
        return []

    @abc.abstractmethod
    def get_info(self, instance_uuid: str) -> str:
        """The power state (``contract.POWER_*``) of the instance, read from the hypervisor now: a
        domain shut off with a saved memory state is ``suspended``. Raises InstanceNotFound."""

    @abc.abstractmethod
    def get_console_output(self, instance_uuid: str, lines: int) -> str:
        """The last ``lines`` lines of the serial console (at most the last 100 KiB of it).

        Raises InstanceNotFound when there is no such instance, ConsoleUnavailable when it exists
        but has no console log.
        """

    # Lifecycle. Soft reboot is not a driver method: the manager composes it from shutdown() and
    # power_on(), and falls back to hard_reboot(), so that it can report the fallback as an event.

    def register_lifecycle_callback(self, callback: Callable[[str], None] | None) -> None:
        """From now on call ``callback(instance_uuid)`` whenever the domain of an instance changes
        lifecycle state (started, stopped, paused, saved...), whoever changed it; None stops it.

        The callback only learns that something happened, not what: the receiver reads the state
        itself. It is called from a hypervisor thread and must not block. A driver that reconnects
        to its hypervisor registers again, and calls back for every instance (events may have been
        missed meanwhile).
        """
        raise NotImplementedError

    @abc.abstractmethod
    def close(self) -> None:
        """Release the hypervisor connection and stop calling back; other methods may reconnect."""

    def shutdown(self, instance_uuid: str, timeout: float) -> bool:
        """Ask the guest to shut down (ACPI power button, pressed again every few seconds while it
        still runs: a guest still booting misses the first press) and wait up to ``timeout``
        seconds. Never forces.

        Returns True when the domain is shut off afterwards (it already was, or the guest complied),
        False when it still runs; a paused or crashed guest cannot act on the request: False at
        once. Raises InstanceNotFound."""
        raise NotImplementedError

    def power_off(self, instance_uuid: str, timeout: float) -> bool:
        """:meth:`shutdown` with ``timeout`` (skipped when it is 0), then force the domain off.

        Afterwards the domain is defined and shut off, with no saved memory state (a suspended
        instance's is discarded). Returns True when nothing had to be forced. Raises
        InstanceNotFound."""
        raise NotImplementedError

    def power_on(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
        """Start the instance. Afterwards its domain runs.

        A shut-off domain is started from the definition regenerated from ``spec`` (so a changed
        flavor applies; None keeps the current definition); a domain with a saved memory state is
        started from it as it is; a paused one is unpaused; a running one is left alone. A domain
        whose definition is lost but whose disk is here is defined again from ``spec``. Raises
        InstanceNotFound when there is neither."""
        raise NotImplementedError

    def hard_reboot(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
        """Force the domain off whatever its state, discard any saved memory state, define it again
        from ``spec`` (None: keep the definition) and start it: a fresh boot on the same disks.

        Afterwards the domain runs. A lost definition is recreated as in :meth:`power_on`. Raises
        InstanceNotFound when neither the domain nor its disk is here."""
        raise NotImplementedError

    def pause(self, instance_uuid: str) -> None:
        """Freeze the vCPUs, memory kept. Afterwards the domain is paused; already paused is
        success. Raises InstanceNotFound, InstanceInvalidState when the domain does not run."""
        raise NotImplementedError

    def unpause(self, instance_uuid: str) -> None:
        """Let a paused domain run again. Afterwards it runs; already running is success.
        Raises InstanceNotFound, InstanceInvalidState when the domain is not active."""
        raise NotImplementedError

    def suspend(self, instance_uuid: str) -> None:
        """Save the memory to disk and stop the domain (libvirt managed save). Afterwards the
        domain is shut off with a saved state (power state ``suspended``) that :meth:`resume`
        restores, running; already suspended is success. Raises InstanceNotFound,
        InstanceInvalidState when the domain is shut off without a saved state."""
        raise NotImplementedError

    def resume(self, instance_uuid: str) -> None:
        """Restore a suspended domain from its saved memory. Afterwards it runs; already running is
        success. Raises InstanceNotFound, InstanceInvalidState when there is no saved state."""
        raise NotImplementedError

    def rebuild(self, spec: dict[str, Any], base_image: Path | None, on_shared_storage: bool,
                power_on: bool) -> None:
        """Evacuation's destination: build the instance of a validated ``spec`` here because the host it
        ran on died (Nova's ``rebuild`` with ``recreate``).

        With ``on_shared_storage`` the instance directory is the dead host's, on storage both mount: its
        disk is used as it is (the console log is created if missing); without the disk it raises
        InstanceNotFound and creates nothing in its place. Without it the directory is made as
        :meth:`spawn` makes it (a leftover one is replaced: the old disk's data is lost). Then the domain
        is defined from ``spec`` and started when ``power_on``.

        Afterwards the domain is defined (running if ``power_on``). Raises InstanceExists if a domain of
        the instance is already defined here (the manager checks first). On failure no domain of the
        instance is left defined here; the directory is removed unless ``on_shared_storage`` (then it is
        never touched: the disk is the instance's only copy)."""
        raise NotImplementedError

    # Cold migration and resize, as Nova's migrate_disk_and_power_off / finish_migration /
    # confirm_migration / finish_revert_migration. The source keeps the instance's original files in
    # ``INSTANCES_PATH/<uuid>_resize/`` until the move is confirmed or reverted; the destination's copy
    # is ``INSTANCES_PATH/<uuid>/`` (on a same-host resize both are on this host). Reverting on the
    # destination is :meth:`destroy` (it never touches ``<uuid>_resize``).

    def migrate_disk_and_power_off(self, instance_uuid: str, dest_uri: str, shutdown_timeout: float,
                                   progress: Callable[[int, int], None],
                                   copy_timeout: float) -> DiskMigration:
        """Power the instance off (clean shutdown for up to ``shutdown_timeout`` seconds, 0: none, then
        forced), undefine its domain (files kept), rename ``<uuid>`` to ``<uuid>_resize`` and copy its
        root disk to ``<uuid>/disk`` on the hypervisor at ``dest_uri`` (this one's own URI, or another
        way to reach it, for a same-host resize). The copy is the same file: a qcow2 overlay keeps its
        backing file reference, which the destination must have cached. ``progress(copied, total)`` is
        called while copying (often; the caller throttles); the copy must end within ``copy_timeout``.

        A run that died after undefining the domain is resumed where it stopped (the definition and
        power state saved before undefining are in the directory).

        Afterwards no domain of the instance is defined here and the destination has the disk. On
        failure everything is put back as it was (directory, definition, running again if it ran), a
        partial destination copy is removed, and the error propagates: InstanceNotFound,
        InstanceInvalidState (a ``<uuid>_resize`` of an earlier resize is still here), HypervisorError
        (its message says what failed and whether putting it back did)."""
        raise NotImplementedError

    def finish_migration(self, spec: dict[str, Any], power_on: bool) -> None:
        """On the destination, after :meth:`migrate_disk_and_power_off` copied the disk here: grow the
        disk to ``spec``'s root_gb when that is larger (never shrinks), create the console log, define
        the domain from ``spec`` (the new flavor) and start it when ``power_on``.

        Afterwards the domain is defined (running if ``power_on``). Running it again converges. On
        failure no domain of the instance is left defined here (the files are kept: reverting removes
        them) and the error propagates (HypervisorError; InstanceNotFound when the disk is not here)."""
        raise NotImplementedError

    def confirm_migration(self, instance_uuid: str, instance_moved: bool | None) -> None:
        """On the source, once the move is confirmed: remove ``<uuid>_resize``. ``instance_moved``:
        True when the instance now runs on another host (a domain of it still defined here is a
        leftover: stopped and undefined), False when it runs here (same-host resize: its domain is left
        alone), None when unknown (a domain is a leftover only when ``<uuid>`` is not here).

        Afterwards nothing of the old instance is left here. Running it again does nothing. Raises
        HypervisorError when a removal fails (a second call finishes the job)."""
        raise NotImplementedError

    def finish_revert_migration(self, spec: dict[str, Any], power_on: bool) -> None:
        """On the source, after the destination's copy was removed (:meth:`destroy` there): rename
        ``<uuid>_resize`` back to ``<uuid>``, define the domain from ``spec`` (the old flavor) and start
        it when ``power_on``: the instance as it was before, on its original disk.

        Afterwards the domain is defined (running if ``power_on``); running it again converges. Raises
        InstanceInvalidState when ``<uuid>`` still exists beside ``<uuid>_resize`` (the destination's
        copy, on the same host or shared storage, was not removed: nothing is changed),
        InstanceNotFound when neither is here, HypervisorError."""
        raise NotImplementedError

    def snapshot(self, instance_uuid: str, target_path: Path,
                 progress: Callable[[int, int], None]) -> None:
        """Write the instance's root disk, as it is now, to ``target_path``: a standalone qcow2 (no
        backing file, no external data file) that boots as the instance would.

        Live when the domain is active (running or paused): the guest keeps running (libvirt block
        copy of the top layer, aborted without pivot once in sync; QEMU may pause it briefly), and
        stays in the state it had. Cold when it is shut off (suspended included): the disk is converted
        directly and the domain is left alone. ``progress(copied_bytes, total_bytes)`` is called while
        copying (often; the caller throttles). ``target_path``'s directory exists and is traversable
        by the hypervisor; temporary files go next to ``target_path`` and are removed whatever happens.

        Afterwards ``target_path`` is complete and the domain is in the power state it had. On failure
        (InstanceNotFound, HypervisorError) the block job is aborted, the domain keeps its state and
        disk, and ``target_path`` may be partial (the caller deletes it)."""
        raise NotImplementedError

    # Live migration. The manager runs live_migration() in a thread of its own and meanwhile polls
    # live_migration_progress() and may call abort_live_migration() or live_migration_force_complete()
    # from other threads: these three are the only calls made for an instance while another call for
    # it runs.

    def compare_cpu(self, cpu_info: Mapping[str, Any]) -> str:
        """Whether this host's CPU can run guests live-migrated from a host whose CPU is ``cpu_info``
        (a heartbeat ``cpu_info``: arch, model, vendor, features).

        Returns "identical", "superset" (this CPU has everything the source's has, and more) or
        "skipped" (this driver or hypervisor cannot compare, or ``cpu_info`` says too little to).
        Raises CPUIncompatible with the hypervisor's reason, HypervisorError when it cannot answer."""
        return "skipped"

    def pre_live_migration(self, spec: dict[str, Any], base_image: Path | None, block_migration: bool,
                           shared_storage: bool) -> None:
        """Prepare this host (the destination) to receive the running instance of a validated ``spec``.

        Unless ``shared_storage`` (the instance directory is then the source's: nothing is created),
        afterwards the instance directory exists with an empty console log and, for
        ``block_migration``, the disk as spawn would create it (an overlay of ``base_image``, the
        cached image, when ``capabilities["needs_base_image"]``) for the migration to fill. A
        directory left here by an earlier attempt is replaced. Raises InstanceExists if a domain of
        the instance is defined here. On failure nothing it made is left."""
        raise NotImplementedError

    def live_migration(self, instance_uuid: str, dest_uri: str, dest_migrate_uri: str | None = None,
                       block_migration: bool = False, *, unsafe: bool = False, bandwidth_mib: int = 0,
                       post_copy: bool = False, auto_converge: bool = False) -> Any:
        """Move the running (or paused) domain to the hypervisor at ``dest_uri`` without stopping it;
        its memory (and its disk's top layer with ``block_migration``, the destination holding the
        same base image) is streamed to ``dest_migrate_uri``. Blocks until the migration ends.

        ``unsafe``: migrate although the hypervisor deems the disks unsafe to share (the caller knows
        the storage is shared). ``bandwidth_mib``: cap of the stream in MiB/s, 0 for the default.
        ``post_copy``: the migration may be switched to post-copy (:meth:`live_migration_force_complete`);
        raises PostCopyUnsupported when the destination cannot do it. ``auto_converge``: the hypervisor
        slows the guest's vCPUs down while the copy does not converge.

        Afterwards the domain runs and is defined there and is gone here (its files here are left to
        :meth:`post_live_migration_at_source`). Raises InstanceNotFound, InstanceInvalidState when the
        domain is not active, MigrationAborted after :meth:`abort_live_migration`, HypervisorError
        when the migration fails; the domain then keeps running here as before (a domain the
        hypervisor left paused is the caller's to resume)."""
        raise NotImplementedError

    def live_migration_progress(self, instance_uuid: str) -> dict[str, int] | None:
        """The counters of the instance's running migration job, ``contract.MIGRATION_PROGRESS_KEYS``
        in bytes (0 for what the hypervisor does not say); None when no job runs (not yet, or no
        more). Raises InstanceNotFound, HypervisorError."""
        return None

    def abort_live_migration(self, instance_uuid: str) -> bool:
        """Abort the instance's running migration job: its :meth:`live_migration` call then raises
        MigrationAborted, unless the job could not be stopped any more (it then ends as it would have).
        Returns False when no job runs. Raises InstanceNotFound, HypervisorError when the hypervisor
        refuses (e.g. a job past the point of no return)."""
        return False

    def live_migration_force_complete(self, instance_uuid: str, post_copy: bool) -> str:
        """Make the instance's running migration job converge now. With ``post_copy`` (the job was
        started with it) switch it to post-copy and return :data:`SWITCHED_TO_POST_COPY`: the guest
        runs on the destination from then on, the job can no longer be aborted, and if it fails the
        guest is lost (its memory is split between the hosts; the domain here stays paused). Else
        pause the guest (its memory stops changing) and return :data:`SWITCHED_BY_PAUSING`: the
        hypervisor resumes it on the destination; if the migration fails, the caller resumes it here.
        Raises InstanceNotFound, HypervisorError with the hypervisor's reason when it refuses (no job,
        or not in the memory copy yet); nothing changed then."""
        raise NotImplementedError

    def post_live_migration_at_source(self, instance_uuid: str, shared_storage: bool) -> None:
        """After a successful :meth:`live_migration`, on the source: afterwards no domain of the
        instance is defined here and, unless ``shared_storage`` (then the directory is the
        destination's and is never touched), its directory is gone. Raises InstanceInvalidState when
        a domain of the instance still runs here (nothing is removed then), HypervisorError."""
        raise NotImplementedError

    def post_live_migration_at_destination(self, instance_uuid: str, spec: dict[str, Any]) -> dict[str, Any]:
        """After a successful live migration, on the destination: check that the domain runs here and
        record its definition from ``spec`` (``libvirt.xml``, as spawn writes it); the domain itself
        is left as it is. Returns what the hypervisor says about the finished migration (``downtime_ms``,
        ``elapsed_ms``, ``transferred_bytes`` and the final ``contract.MIGRATION_PROGRESS_KEYS``: those
        it knows). Raises InstanceNotFound,
        InstanceInvalidState when the domain is not running."""
        raise NotImplementedError

    def rollback_live_migration_at_destination(self, instance_uuid: str, destroy_disks: bool) -> bool:
        """After a failed live migration, on the destination: afterwards no domain of the instance is
        defined here and, with ``destroy_disks``, its directory is gone (never asked on shared
        storage: the directory is the source's). Returns whether a domain was removed. Raises
        InstanceInvalidState when a domain of the instance runs here (the migration went through
        after all: nothing is removed), HypervisorError."""
        raise NotImplementedError

    def instance_power_state_at(self, uri: str, instance_uuid: str) -> str | None:
        """The power state of the instance's domain on the hypervisor of another host at ``uri`` (a
        migration URI), None when it has none there: where a redelivered live migration whose domain
        left this host learns whether it arrived. Raises HypervisorError when that hypervisor cannot
        be asked."""
        raise NotImplementedError
