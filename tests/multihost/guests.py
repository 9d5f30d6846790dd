"""The demo guest on harness hosts: its domain, its disks prepared for a block migration, waits."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from testbed.hosts import NamespaceHost

READY = "cloudctl-guest: ready"


def domain_xml(name: str, instance_uuid: str, disk: Path, console: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{instance_uuid}</uuid>
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


def prepare_block_migration(source: NamespaceHost, dest: NamespaceHost, instance_uuid: str,
                            image: Path, *, incremental: bool = False) -> tuple[Path, Path]:
    """A qcow2 overlay of ``image`` on the source and, at the same path on the destination (a
    different file: each daemon sees its own instances directory at ``instances_path``), an empty
    qcow2 of the same virtual size for a full block migration (``NON_SHARED_DISK``), or with
    ``incremental`` an empty overlay of the destination's own copy of the base, as the destination
    worker's pre_live_migration makes it (``NON_SHARED_INC`` copies only the top layer). Returns the
    disk and console paths as the daemons see them."""
    base = source.instances_path / "_base" / "tiny.qcow2"
    for host in (source, dest) if incremental else (source,):
        (host.local_instances / "_base").mkdir(mode=0o755, exist_ok=True)
        shutil.copyfile(image, host.local_instances / "_base" / "tiny.qcow2")
    size = virtual_size(image)
    for host in (source, dest):
        (host.local_instances / instance_uuid).mkdir(mode=0o755)
    # -u: the backing path is the one the daemons see, not visible from the test process.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b", str(base),
                    str(source.local_instances / instance_uuid / "disk"), str(size)], check=True)
    backing = ["-F", "qcow2", "-u", "-b", str(base)] if incremental else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing,
                    str(dest.local_instances / instance_uuid / "disk"), str(size)], check=True)
    directory = source.instances_path / instance_uuid
    return directory / "disk", directory / "console.log"
