"""LibvirtDriver.live_migration between two harness hosts: the running demo guest moves (incremental
block migration: only its overlay travels, the destination has the base image) and keeps running; a
stopped instance is refused and stays where it is."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from compute_workers import contract
from compute_workers.exception import InstanceInvalidState
from compute_workers.virt.libvirt.driver import LibvirtDriver
from testbed.domains import remove_domains
from testbed.hosts import NamespaceHost

from .guests import READY, domain_xml, prepare_block_migration, read, wait_for

pytestmark = pytest.mark.libvirt

POWEROFF = "cloudctl-guest: poweroff (clean)"


@pytest.fixture
def source_driver(libvirt_hosts: list[NamespaceHost]) -> Iterator[LibvirtDriver]:
    source = libvirt_hosts[0]
    driver = LibvirtDriver(source.uri, source.instances_path, virt_type="qemu")
    driver.init_host()
    try:
        yield driver
    finally:
        driver.close()


def test_live_migration_moves_the_running_guest(libvirt_hosts: list[NamespaceHost], tiny_image_path: Path,
                                                source_driver: LibvirtDriver) -> None:
    source, dest = libvirt_hosts
    instance_uuid = str(uuid.uuid4())
    disk, console = prepare_block_migration(source, dest, instance_uuid, tiny_image_path, incremental=True)
    source_console = source.local_instances / instance_uuid / "console.log"
    dest_console = dest.local_instances / instance_uuid / "console.log"
    name = contract.domain_name(instance_uuid)
    dst = libvirt.open(dest.uri)
    try:
        source_driver.conn.defineXML(domain_xml(name, instance_uuid, disk, console)).create()
        wait_for(lambda: READY in read(source_console), 120, lambda: read(source_console)[-2000:])

        result = source_driver.live_migration(instance_uuid, dest.peer_uri, dest.migrate_uri,
                                              block_migration=True)
        print(f"\nLibvirtDriver.live_migration (block): {result.seconds:.2f} s")

        assert instance_uuid not in source_driver.list_instances()
        migrated = dst.lookupByName(name)
        assert migrated.state()[0] == libvirt.VIR_DOMAIN_RUNNING and migrated.isPersistent()
        migrated.shutdown()  # the guest runs there: it powers off cleanly on request
        wait_for(lambda: POWEROFF in read(dest_console), 60, lambda: read(dest_console)[-2000:])
        wait_for(lambda: migrated.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, 30, lambda: str(migrated.state()))
    finally:
        remove_domains(dst, lambda domain: domain.name() == name)
        dst.close()


def test_live_migration_refuses_a_stopped_instance(libvirt_hosts: list[NamespaceHost], tiny_image_path: Path,
                                                   source_driver: LibvirtDriver) -> None:
    source, dest = libvirt_hosts
    instance_uuid = str(uuid.uuid4())
    disk, console = prepare_block_migration(source, dest, instance_uuid, tiny_image_path)
    domain = source_driver.conn.defineXML(domain_xml(contract.domain_name(instance_uuid), instance_uuid,
                                                     disk, console))
    try:
        with pytest.raises(InstanceInvalidState):
            source_driver.live_migration(instance_uuid, dest.peer_uri, dest.migrate_uri, block_migration=True)
        assert source_driver.list_instances()[instance_uuid] == contract.POWER_SHUTDOWN
    finally:
        domain.undefine()
