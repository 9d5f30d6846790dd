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
import uuid as uuid_lib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from compute_workers import contract
from compute_workers.exception import InvalidInstanceUUID

RebootType = Literal["soft", "hard"]

# Keys of get_available_resource(); the manager adds libvirt_uri, driver, the reserved amounts and
# instances to make contract.HEARTBEAT_RESOURCE_KEYS.
DRIVER_RESOURCE_KEYS = ("virt_type", "hypervisor_type", "hypervisor_version", "vcpus", "memory_mb",
                        "disk_gb", "cpu_info")

# Every capability a driver declares, False until a driver says otherwise.
CAPABILITY_NAMES = (
    "needs_base_image",     # spawn() wants the image downloaded into the cache (base_image argument)
    "supports_reboot",
    "supports_power_ops",   # power_off, power_on
    "supports_pause",       # pause, unpause
    "supports_suspend",     # suspend, resume
    "supports_snapshot",
    "supports_live_migration",
)


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
    def destroy(self, instance_uuid: str) -> None:
        """Stop the domain at once, undefine it (managed save included), delete its directory.

        Afterwards nothing of the instance is left on the host. If the instance is not found, this
        still succeeds. Raises HypervisorError when the hypervisor refuses; what was removed stays
        removed and a second call finishes the job.
        """

    @abc.abstractmethod
    def get_info(self, instance_uuid: str) -> str:
        """The power state (``contract.POWER_*``) of the instance. Raises InstanceNotFound."""

    @abc.abstractmethod
    def get_console_output(self, instance_uuid: str, lines: int) -> str:
        """The last ``lines`` lines of the serial console (at most the last 100 KiB of it).

        Raises InstanceNotFound when there is no such instance, ConsoleUnavailable when it exists
        but has no console log.
        """

    # Later operations: declared now so the interface is whole; drivers opt in through capabilities.

    def reboot(self, instance_uuid: str, reboot_type: RebootType) -> None:
        """Reboot: ``soft`` asks the guest (ACPI) and falls back to hard if it does not comply in
        time; ``hard`` resets the domain. Afterwards the domain runs. Raises InstanceNotFound."""
        raise NotImplementedError

    def power_off(self, instance_uuid: str, timeout: float = 60.0) -> None:
        """Ask the guest to shut down, and stop it hard after ``timeout`` seconds.

        Afterwards the domain is defined and shut off; already shut off is success. Raises
        InstanceNotFound."""
        raise NotImplementedError

    def power_on(self, instance_uuid: str) -> None:
        """Start a shut-off domain. Afterwards it runs; already running is success.
        Raises InstanceNotFound."""
        raise NotImplementedError

    def pause(self, instance_uuid: str) -> None:
        """Freeze the vCPUs, memory kept. Afterwards the domain is paused. Raises InstanceNotFound."""
        raise NotImplementedError

    def unpause(self, instance_uuid: str) -> None:
        """Let a paused domain run again. Afterwards it runs. Raises InstanceNotFound."""
        raise NotImplementedError

    def suspend(self, instance_uuid: str) -> None:
        """Save the memory to disk and stop the domain (libvirt managed save). Afterwards the
        domain is shut off with a saved state that :meth:`resume` restores. Raises InstanceNotFound."""
        raise NotImplementedError

    def resume(self, instance_uuid: str) -> None:
        """Restore a suspended domain. Afterwards it runs. Raises InstanceNotFound."""
        raise NotImplementedError

    def snapshot(self, instance_uuid: str, image_id: str, upload_url: str) -> None:
        """Copy the root disk into a standalone image and upload it. The instance keeps running
        (or is briefly paused). On failure nothing is uploaded and the instance is as before."""
        raise NotImplementedError

    def live_migration(self, instance_uuid: str, dest_host: str, dest_uri: str) -> None:
        """Move the running domain to ``dest_host`` without stopping it. On failure the domain keeps
        running here."""
        raise NotImplementedError
