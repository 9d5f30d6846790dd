"""An in-memory hypervisor: the driver of benchmarks that simulate hundreds of hosts, and of tests.

It keeps the same contract as the libvirt driver (the same contract tests run against both) with
configurable sizes and delays. Failures are injected by tiny subclasses, as Nova's fake driver does.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compute_workers import contract
from compute_workers.exception import (
    HypervisorError,
    InstanceExists,
    InstanceInvalidState,
    InstanceNotFound,
)
from compute_workers.virt.driver import ComputeDriver, checked_uuid


@dataclasses.dataclass
class FakeInstance:
    spec: dict[str, Any]
    power_state: str
    console: list[str]
    boots: int = 1


class FakeDriver(ComputeDriver):
    """Domains live in a dict; nothing touches the disk unless ``needs_base_image`` asks the manager
    to download images (to exercise the image cache without a hypervisor)."""

    name = "fake"

    def __init__(self, *, vcpus: int = 16, memory_mb: int = 32768, disk_gb: int = 500,
                 spawn_delay: float = 0.0, destroy_delay: float = 0.0,
                 needs_base_image: bool = False) -> None:
        super().__init__()
        self.capabilities = {**self.capabilities, "needs_base_image": needs_base_image,
                             "supports_reboot": True, "supports_power_ops": True,
                             "supports_pause": True, "supports_suspend": True,
                             "supports_lifecycle_events": True, "supports_snapshot": True}
        self.vcpus, self.memory_mb, self.disk_gb = vcpus, memory_mb, disk_gb
        self.spawn_delay, self.destroy_delay = spawn_delay, destroy_delay
        self.snapshot_delay = 0.0
        self.instances: dict[str, FakeInstance] = {}
        self._lock = threading.Lock()
        self._lifecycle_callback: Callable[[str], None] | None = None

    def init_host(self) -> None:
        pass

    def get_available_resource(self) -> dict[str, Any]:
        return {
            "virt_type": "qemu",
            "hypervisor_type": "QEMU",
            "hypervisor_version": 7002000,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "disk_gb": self.disk_gb,
            "cpu_info": {"arch": "x86_64", "model": "fake", "vendor": "cloudctl", "features": []},
        }

    def list_instances(self) -> dict[str, str]:
        with self._lock:
            return {uuid: instance.power_state for uuid, instance in self.instances.items()}

    def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        with self._lock:
            if instance_uuid in self.instances:
                raise InstanceExists(f"instance {instance_uuid} already exists on this host")
        time.sleep(self.spawn_delay)
        console = [f"cloudctl-fake: booting {contract.domain_name(instance_uuid)}",
                   "cloudctl-guest: boot-count 1", "cloudctl-guest: ready"]
        with self._lock:
            self.instances[instance_uuid] = FakeInstance(spec, contract.POWER_RUNNING, console)
        self._changed(instance_uuid)

    def destroy(self, instance_uuid: str) -> None:
        checked_uuid(instance_uuid)
        time.sleep(self.destroy_delay)
        with self._lock:
            gone = self.instances.pop(instance_uuid, None)
        if gone is not None:
            self._changed(instance_uuid)

    def _get(self, instance_uuid: str) -> FakeInstance:
        with self._lock:
            instance = self.instances.get(checked_uuid(instance_uuid))
        if instance is None:
            raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
        return instance

    def get_info(self, instance_uuid: str) -> str:
        return self._get(instance_uuid).power_state

    def get_console_output(self, instance_uuid: str, lines: int) -> str:
        console = self._get(instance_uuid).console
        return "".join(line + "\n" for line in console[-lines:]) if lines > 0 else ""

    # Lifecycle ---------------------------------------------------------------------------------------

    def register_lifecycle_callback(self, callback: Callable[[str], None] | None) -> None:
        self._lifecycle_callback = callback

    def close(self) -> None:
        self._lifecycle_callback = None

    def _changed(self, instance_uuid: str) -> None:
        callback = self._lifecycle_callback
        if callback is not None:
            callback(instance_uuid)

    def _set_state(self, instance_uuid: str, allowed_from: tuple[str, ...], target: str, *,
                   boot: bool = False, spec: dict[str, Any] | None = None) -> None:
        """Move to ``target`` from one of ``allowed_from`` (else InstanceInvalidState); already there
        is success. ``boot``: the guest boots (counted, and said on the console)."""
        with self._lock:
            instance = self.instances.get(checked_uuid(instance_uuid))
            if instance is None:
                raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
            if instance.power_state == target and not boot:
                return
            if instance.power_state not in allowed_from:
                raise InstanceInvalidState(f"instance {instance_uuid} is {instance.power_state}, "
                                           f"cannot become {target}")
            instance.power_state = target
            if spec is not None:
                instance.spec = spec
            if boot:
                instance.boots += 1
                instance.console += [f"cloudctl-guest: boot-count {instance.boots}", "cloudctl-guest: ready"]
        self._changed(instance_uuid)

    def guest_power_off(self, instance_uuid: str) -> None:
        """The guest powers itself off (``poweroff`` inside it): no call of the manager's made it."""
        self._set_state(instance_uuid, (contract.POWER_RUNNING,), contract.POWER_SHUTDOWN)

    def shutdown(self, instance_uuid: str, timeout: float) -> bool:
        state = self.get_info(instance_uuid)
        if state in (contract.POWER_SHUTDOWN, contract.POWER_SUSPENDED):
            return True
        if state != contract.POWER_RUNNING:
            return False
        self._set_state(instance_uuid, (contract.POWER_RUNNING,), contract.POWER_SHUTDOWN)
        return True

    def power_off(self, instance_uuid: str, timeout: float) -> bool:
        if self.get_info(instance_uuid) == contract.POWER_SHUTDOWN:
            return True
        clean = timeout > 0 and self.shutdown(instance_uuid, timeout)
        # Forced, or the saved memory state of a suspended instance discarded.
        self._set_state(instance_uuid, contract.POWER_STATES, contract.POWER_SHUTDOWN)
        return clean

    def power_on(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
        state = self.get_info(instance_uuid)  # the fake keeps no disks: a lost domain stays lost
        if state == contract.POWER_RUNNING:
            return
        boots = state in (contract.POWER_SHUTDOWN, contract.POWER_CRASHED)  # not a restore nor unpause
        self._set_state(instance_uuid, (contract.POWER_SHUTDOWN, contract.POWER_CRASHED,
                                        contract.POWER_SUSPENDED, contract.POWER_PAUSED),
                        contract.POWER_RUNNING, boot=boots, spec=spec)

    def hard_reboot(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
        self._set_state(instance_uuid, contract.POWER_STATES, contract.POWER_RUNNING, boot=True,
                        spec=spec)

    def pause(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_RUNNING,), contract.POWER_PAUSED)

    def unpause(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_PAUSED,), contract.POWER_RUNNING)

    def suspend(self, instance_uuid: str) -> None:
        # As libvirt's managed save: shut off with the memory saved, restored running.
        self._set_state(instance_uuid, (contract.POWER_RUNNING, contract.POWER_PAUSED),
                        contract.POWER_SUSPENDED)

    def resume(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_SUSPENDED,), contract.POWER_RUNNING)

    def snapshot(self, instance_uuid: str, target_path: Path,
                 progress: Callable[[int, int], None]) -> None:
        instance = self._get(instance_uuid)
        kind = "live" if instance.power_state in (contract.POWER_RUNNING, contract.POWER_PAUSED) else "cold"
        data = f"cloudctl fake snapshot of {instance_uuid} ({kind}, boot {instance.boots})\n".encode()
        progress(0, len(data))
        time.sleep(self.snapshot_delay)
        target_path.write_bytes(data)
        progress(len(data), len(data))


class FakeACPIIgnoringDriver(FakeDriver):
    """Its guests ignore ACPI requests, as a guest without an ACPI daemon (or a hung one) does:
    shutdown waits out its timeout and fails, so soft reboots fall back to hard ones and power offs
    are forced."""

    def shutdown(self, instance_uuid: str, timeout: float) -> bool:
        state = self.get_info(instance_uuid)
        if state in (contract.POWER_SHUTDOWN, contract.POWER_SUSPENDED):
            return True
        time.sleep(timeout)
        return False


class FakeBuildAbortDriver(FakeDriver):
    """Fails every spawn half-way, leaving a defined but broken domain behind (as a driver bug
    would): the manager must still clean up and report build_failed with reschedule."""

    def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
        with self._lock:
            self.instances[spec["instance_uuid"]] = FakeInstance(spec, contract.POWER_SHUTDOWN, [])
        raise HypervisorError("fake hypervisor refused to start the domain")
