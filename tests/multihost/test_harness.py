"""The multi-host harness works: two independent libvirt hosts on this machine, and a running demo
guest live-migrated (block migration) from one to the other while it keeps running."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from .hosts import NamespaceHost

pytestmark = pytest.mark.libvirt

READY = "cloudctl-guest: ready"
POWEROFF = "cloudctl-guest: poweroff (clean)"
FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
         | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


def domain_xml(instance_uuid: str, disk: Path, console: Path) -> str:
    return f"""<domain type='qemu'>
  <name>mh-{instance_uuid}</name><uuid>{instance_uuid}</uuid>
  <memory unit='MiB'>128</memory><currentMemory unit='MiB'>128</currentMemory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features><clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <console type='file'><source path='{console}' append='on'/><target type='serial' port='0'/></console>
    <memballoon model='virtio'/>
  </devices>
</domain>"""


def wait_for(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what()}")


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def virtual_size(image: Path) -> int:
    info = subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True, capture_output=True,
                          text=True).stdout
    return int(json.loads(info)["virtual-size"])


def test_two_independent_hosts(libvirt_hosts: list[NamespaceHost]) -> None:
    uuids = set()
    for host in libvirt_hosts:
        conn = libvirt.open(host.uri)
        try:
            assert conn.getHostname() == f"cloudctl-{host.name}"
            assert conn.getURI().startswith("qemu+unix:///system")
            host_uuid = ET.fromstring(conn.getCapabilities()).findtext("host/uuid")
            assert host_uuid == host.host_uuid
            uuids.add(host_uuid)
        finally:
            conn.close()
    assert len(uuids) == len(libvirt_hosts)
    # Each daemon reaches its peer over the namespaces' bridge (what peer-to-peer migration needs).
    source, dest = libvirt_hosts
    result = subprocess.run(["ip", "netns", "exec", source.netns, "virsh", "-c", dest.peer_uri, "hostname"],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == f"cloudctl-{dest.name}", result.stderr


def test_live_block_migration_of_a_running_guest(libvirt_hosts: list[NamespaceHost],
                                                 tiny_image_path: Path) -> None:
    source, dest = libvirt_hosts
    instance_uuid = str(uuid.uuid4())
    # Both daemons see their own instances directory at the same path (instances_path).
    base = source.instances_path / "_base" / "tiny.qcow2"
    (source.local_instances / "_base").mkdir(mode=0o755, exist_ok=True)
    shutil.copyfile(tiny_image_path, source.local_instances / "_base" / "tiny.qcow2")
    size = virtual_size(tiny_image_path)
    for host in libvirt_hosts:
        (host.local_instances / instance_uuid).mkdir(mode=0o755)
    disk = source.instances_path / instance_uuid / "disk"
    console = source.instances_path / instance_uuid / "console.log"
    # Overlay on the source (backing path as the source daemon sees it; -u: not visible from here).
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b", str(base),
                    str(source.local_instances / instance_uuid / "disk"), str(size)], check=True)
    # Block migration: an empty disk of the same virtual size at the same path on the destination.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                    str(dest.local_instances / instance_uuid / "disk"), str(size)], check=True)
    source_console = source.local_instances / instance_uuid / "console.log"
    dest_console = dest.local_instances / instance_uuid / "console.log"

    src = libvirt.open(source.uri)
    dst = libvirt.open(dest.uri)
    try:
        domain = src.defineXML(domain_xml(instance_uuid, disk, console))
        domain.create()
        boot = wait_for(lambda: READY in read(source_console), 120, lambda: read(source_console)[-2000:])

        params = {libvirt.VIR_MIGRATE_PARAM_URI: dest.migrate_uri}
        started = time.monotonic()
        domain.migrateToURI3(dest.peer_uri, params, FLAGS | libvirt.VIR_MIGRATE_NON_SHARED_DISK)
        migration = time.monotonic() - started

        migrated = dst.lookupByUUIDString(instance_uuid)
        assert migrated.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert migrated.isPersistent()
        with pytest.raises(libvirt.libvirtError):
            src.lookupByUUIDString(instance_uuid)
        assert src.listAllDomains() == []
        downtime = None
        try:
            stats = migrated.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            downtime = stats.get("downtime")
        except libvirt.libvirtError:
            stats = {}
        print(f"\nlive block migration: {migration:.2f} s, downtime "
              f"{'n/a' if downtime is None else f'{downtime} ms'} (guest booted in {boot:.1f} s)")

        # The guest keeps running on the destination: it obeys an ACPI power-off there and says so in
        # its console, which the destination's QEMU writes (a different file from the source's).
        assert READY not in read(dest_console)
        migrated.shutdown()
        wait_for(lambda: POWEROFF in read(dest_console), 60, lambda: read(dest_console)[-2000:])
        wait_for(lambda: migrated.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, 30, lambda: str(migrated.state()))
        assert POWEROFF not in read(source_console)
    finally:
        for conn in (src, dst):
            for dom in conn.listAllDomains():
                if dom.UUIDString() == instance_uuid:
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
            conn.close()
