"""A snapshot of an instance's disk as one standalone qcow2 image (the whole backing chain flattened),
of a shut-off guest straight from its disk, of a running one through a live block copy (Nova's live
snapshot): the guest keeps running and keeps its disk throughout."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

from compute_workers import images
from compute_workers.exception import HypervisorError
from compute_workers.virt.libvirt.errors import hypervisor_errors

LOG = logging.getLogger(__name__)

# A block copy must reach "ready" (the copy in sync with the disk) within this many seconds.
BLOCK_COPY_TIMEOUT = 900.0
# qemu-img convert of a snapshot (whole chain flattened) within this many seconds.
CONVERT_TIMEOUT = 900.0
BLOCK_JOB_POLL_INTERVAL = 0.1
# TRANSIENT_JOB: libvirt refuses a block copy of a persistent domain otherwise (the job would not
# survive a restart of the domain); with it the domain stays persistent throughout.
_BLOCK_COPY_FLAGS = (libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
                     | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")


def snapshot_disk(domain: libvirt.virDomain, disk: Path, active: bool, target_path: Path,
                  progress: Callable[[int, int], None]) -> None:
    """``disk`` of ``domain`` (running when ``active``) as a standalone qcow2 image at ``target_path``."""
    if not active:
        size = disk.stat().st_size
        progress(0, size)
        images.convert_to_standalone(disk, "qcow2", target_path, CONVERT_TIMEOUT)
        progress(size, size)
        return
    delta = target_path.with_name(target_path.name + ".delta")
    try:
        _live_copy(domain, disk, delta, progress)
        images.convert_to_standalone(delta, "qcow2", target_path, CONVERT_TIMEOUT)
    finally:
        delta.unlink(missing_ok=True)


def _live_copy(domain: libvirt.virDomain, disk: Path, delta: Path,
               progress: Callable[[int, int], None]) -> None:
    """Nova's live snapshot: ``delta`` (backed by the disk's own backing file) receives a shallow
    block copy of the disk's top layer; once the copy is in sync the job is aborted without pivot,
    so the guest keeps its disk and ``delta`` holds a consistent copy of it."""
    info = images.qemu_img_info(disk, "qcow2")  # --force-share: the running QEMU holds the lock
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    images.create_delta(Path(backing) if backing else None,
                        info.get("backing-filename-format") or "qcow2", delta,
                        int(info["virtual-size"]))
    delta.chmod(0o644)
    dest = (f"<disk type='file'><driver type='qcow2'/>"
            f"<source file='{_xml_escape(str(delta))}'/></disk>")
    with hypervisor_errors(f"cannot start the block copy of instance {domain.name()}"):
        domain.blockCopy("vda", dest, None, _BLOCK_COPY_FLAGS)
    try:
        deadline = time.monotonic() + BLOCK_COPY_TIMEOUT
        while True:
            with hypervisor_errors(f"cannot read the block copy of {domain.name()}"):
                job = domain.blockJobInfo("vda", 0)
            if not job:
                raise HypervisorError(f"the block copy of {domain.name()} ended before it was ready")
            cur, end = int(job.get("cur", 0)), int(job.get("end", 0))
            progress(cur, end)
            if end and cur == end and job.get("ready", 1):
                break
            if time.monotonic() > deadline:
                raise HypervisorError(f"the block copy of {domain.name()} was not ready within "
                                      f"{BLOCK_COPY_TIMEOUT:.0f} s")
            time.sleep(BLOCK_JOB_POLL_INTERVAL)
    finally:
        _abort_block_job(domain)


def _abort_block_job(domain: libvirt.virDomain) -> None:
    """Abort the copy without pivot (the guest keeps its disk) and wait until the job is gone."""
    try:
        domain.blockJobAbort("vda", 0)
    except libvirt.libvirtError as exc:
        LOG.warning("aborting the block copy of %s: %s", domain.name(), exc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if not domain.blockJobInfo("vda", 0):
                return
        except libvirt.libvirtError:
            return
        time.sleep(BLOCK_JOB_POLL_INTERVAL)
    LOG.warning("the block copy job of %s is still there 30 s after its abort", domain.name())
