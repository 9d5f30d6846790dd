"""An in-memory hypervisor: the driver of benchmarks that simulate hundreds of hosts, and of tests.

It keeps the same contract as the libvirt driver (the same contract tests run against both) with
configurable sizes and delays. Failures are injected by tiny subclasses, as Nova's fake driver does.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

from compute_workers import contract
from compute_workers.exception import HypervisorError, InstanceExists, InstanceNotFound
from compute_workers.virt.driver import ComputeDriver, RebootType, checked_uuid


@dataclasses.dataclass
class FakeInstance:
    spec: dict[str, Any]
    power_state: str
    console: list[str]


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
                             "supports_pause": True, "supports_suspend": True}
        self.vcpus, self.memory_mb, self.disk_gb = vcpus, memory_mb, disk_gb
        self.spawn_delay, self.destroy_delay = spawn_delay, destroy_delay
        self.instances: dict[str, FakeInstance] = {}
        self._lock = threading.Lock()

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
                   "cloudctl-guest: ready"]
        with self._lock:
            self.instances[instance_uuid] = FakeInstance(spec, contract.POWER_RUNNING, console)

    def destroy(self, instance_uuid: str) -> None:
        checked_uuid(instance_uuid)
        time.sleep(self.destroy_delay)
        with self._lock:
            self.instances.pop(instance_uuid, None)

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

    def _set_state(self, instance_uuid: str, allowed_from: tuple[str, ...], target: str) -> None:
        instance = self._get(instance_uuid)
        if instance.power_state == target:
            return
        if instance.power_state not in allowed_from:
            raise HypervisorError(f"instance {instance_uuid} is {instance.power_state}, "
                                  f"cannot become {target}")
        instance.power_state = target

    def reboot(self, instance_uuid: str, reboot_type: RebootType) -> None:
        self._set_state(instance_uuid, (contract.POWER_RUNNING, contract.POWER_SHUTDOWN,
                                        contract.POWER_CRASHED), contract.POWER_RUNNING)
        self._get(instance_uuid).console.append(f"cloudctl-fake: {reboot_type} reboot")

    def power_off(self, instance_uuid: str, timeout: float = 60.0) -> None:
        self._set_state(instance_uuid, (contract.POWER_RUNNING, contract.POWER_PAUSED,
                                        contract.POWER_CRASHED), contract.POWER_SHUTDOWN)

    def power_on(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_SHUTDOWN, contract.POWER_CRASHED),
                        contract.POWER_RUNNING)

    def pause(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_RUNNING,), contract.POWER_PAUSED)

    def unpause(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_PAUSED,), contract.POWER_RUNNING)

    def suspend(self, instance_uuid: str) -> None:
        # As libvirt's managed save: the domain is shut off with its memory saved.
        self._set_state(instance_uuid, (contract.POWER_RUNNING, contract.POWER_PAUSED),
                        contract.POWER_SHUTDOWN)

    def resume(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_SHUTDOWN,), contract.POWER_RUNNING)


class FakeBuildAbortDriver(FakeDriver):
    """Fails every spawn half-way, leaving a defined but broken domain behind (as a driver bug
    would): the manager must still clean up and report build_failed with reschedule."""

    def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
        with self._lock:
            self.instances[spec["instance_uuid"]] = FakeInstance(spec, contract.POWER_SHUTDOWN, [])
        raise HypervisorError("fake hypervisor refused to start the domain")
