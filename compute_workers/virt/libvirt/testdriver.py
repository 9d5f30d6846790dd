"""The libvirt driver on libvirt's test driver (``test:///default``): fast tests, no daemon, no QEMU.

Test domains are of type ``test``: they are defined, started, paused, saved and undefined in libvirt's
memory, but nothing runs and there are no disks. So this subclass overrides exactly the hooks of
:class:`~compute_workers.virt.libvirt.driver.LibvirtDriver` that touch disks or the host (no image is
needed, ``qemu-img`` is never called, no virt-type probe) and the ones libvirt's test driver does not
support (CPU comparison, migration jobs); everything else (XML, lifecycle, files, events, resize
bookkeeping) is the real driver's code. The real driver refuses ``test:`` URIs, so its fakes stay here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import libvirt

from compute_workers.virt.libvirt import volumes
from compute_workers.virt.libvirt.driver import LibvirtDriver, is_test_uri

LOG = logging.getLogger(__name__)

class LibvirtTestDriver(LibvirtDriver):
    """:class:`LibvirtDriver` for ``test:`` URIs: domains without disks, of virt type ``test``."""

    #: No disk to put an image in; test domains cannot migrate (no migrateToURI3). The test driver
    #: accepts ``<interface type='bridge'>`` on bridges that do not exist (nothing runs, no tap is
    #: made), so the worker makes no host bridges for it: the definitions are the real driver's.
    CAPABILITIES: Mapping[str, bool] = MappingProxyType({
        **LibvirtDriver.CAPABILITIES, "needs_base_image": False, "supports_live_migration": False,
        "plugs_host_bridges": False})

    def __init__(self, uri: str, instances_path: Path, virt_type: str = "auto",
                 machine_type: str = "pc") -> None:
        super().__init__(uri, instances_path, virt_type, machine_type)
        self.virt_type = "test"  # what <domain type=...> the test driver accepts, whatever was asked

    @classmethod
    def _check_uri(cls, uri: str) -> None:
        if not is_test_uri(uri):
            raise ValueError(f"LibvirtTestDriver fakes disks and drives only libvirt's test: URIs, "
                             f"not {uri}: use LibvirtDriver")

    def _prepare_host(self) -> None:
        """Nothing to probe: the virt type is ``test`` and no disk is ever opened with O_DIRECT."""

    def _create_disk(self, spec: dict[str, Any], base_image: Path | None, disk: Path, *,
                     missing_base: str) -> None:
        """No disk: the domain's <disk> names a file nobody opens."""

    def _recreatable(self, instance_uuid: str) -> bool:
        """Without a disk, the definition spawn wrote is what says the instance's files are here."""
        return (self.instance_dir(instance_uuid) / "libvirt.xml").exists()

    def _copy_disk(self, resize_dir: Path, dest_conn: libvirt.virConnect, directory: Path, dest_uri: str,
                   progress: Callable[[int, int], None], copy_timeout: float) -> volumes.VolumeCopy:
        """No disk: the destination's directory is all the copy there is."""
        directory.mkdir(mode=0o755, exist_ok=True)
        return volumes.VolumeCopy(size=0, sent=0, seconds=0.0, sparse=False)

    def _remove_disk_copy(self, dest_conn: libvirt.virConnect, directory: Path, dest_uri: str) -> None:
        """No copy was made at the destination (the directory goes with the put-back)."""

    def _prepare_migrated_disk(self, instance_uuid: str, directory: Path, root_gb: int) -> None:
        """No disk to find or grow: only the directory the domain's files go to."""
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)

    def _snapshot_disk(self, domain: libvirt.virDomain, instance_uuid: str, active: bool, target_path: Path,
                       progress: Callable[[int, int], None]) -> None:
        """No disk: the "image" is a line saying what it is a snapshot of."""
        data = f"cloudctl test:// snapshot of {instance_uuid} ({'live' if active else 'cold'})\n".encode()
        target_path.write_bytes(data)
        progress(len(data), len(data))

    def _job_progress(self, domain: libvirt.virDomain) -> dict[str, int] | None:
        """The test driver has no jobs at all (jobStats and jobInfo are unsupported): none runs."""
        return None

    def compare_cpu(self, cpu_info: Mapping[str, Any]) -> str:
        """The test driver cannot compare CPUs (compareCPU is unsupported): skipped, as for a source
        whose CPU names no model."""
        LOG.info("libvirt's test driver cannot compare CPUs: CPU comparison skipped")
        return "skipped"
