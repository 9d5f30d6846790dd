"""Hypervisor drivers; :func:`load_driver` picks one by its COMPUTE_DRIVER name."""

from __future__ import annotations

from pathlib import Path

from compute_workers.config import DRIVERS, ComputeConfig, ConfigError
from compute_workers.virt.driver import ComputeDriver


def load_driver(config: ComputeConfig) -> ComputeDriver:
    """The driver named by ``config.driver``; an unknown name is a ConfigError at start.

    ``libvirt`` on one of libvirt's ``test:`` URIs is :class:`LibvirtTestDriver` (test domains have no
    disks), on any other URI the real :class:`LibvirtDriver`."""
    if config.driver == "fake":
        from compute_workers.virt.fake import FakeDriver

        return FakeDriver(vcpus=config.fake_vcpus, memory_mb=config.fake_memory_mb,
                          disk_gb=config.fake_disk_gb, spawn_delay=config.fake_spawn_delay,
                          destroy_delay=config.fake_destroy_delay, migration_uri=config.migration_uri,
                          instances_path=config.instances_path,
                          state_file=(Path(config.fake_state_dir) / f"{config.host}.json"
                                      if config.fake_state_dir else None))
    if config.driver == "libvirt":
        # Imported here: hosts that only simulate (fake driver) need no libvirt-python.
        from compute_workers.virt.libvirt.driver import LibvirtDriver, is_test_uri
        from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

        driver_class = LibvirtTestDriver if is_test_uri(config.libvirt_uri) else LibvirtDriver
        return driver_class(config.libvirt_uri, config.instances_path, config.virt_type, config.machine_type)
    raise ConfigError(f"unknown compute driver {config.driver!r} (COMPUTE_DRIVER): choose one of "
                      f"{', '.join(DRIVERS)}")
