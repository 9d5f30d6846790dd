"""Facts about the hypervisor host: which virt type guests can really use, power states, its CPU, and
whether the instances' filesystem takes O_DIRECT and lets QEMU reach the disks.

``COMPUTE_VIRT_TYPE=auto`` must not trust ``/dev/kvm`` (nor libvirt, which advertises kvm whenever the
device exists): on a nested paravirtual host KVM opens fine, boots a boot sector, and then runs an
ordinary guest a hundred times slower than TCG. So ``auto`` boots a probe guest under KVM and picks
kvm only when it finishes quickly.

The probe is a 512-byte boot sector, hand-assembled from the listing below (GNU as, ``--32``, linked
at 0x7c00). It reports each stage on the serial port 0x3F8: ``R`` (real mode), ``P`` (protected mode),
``L`` (64-bit long mode with paging), then writes 112 MiB of guest memory (a healthy KVM does this in
well under a second, the broken nested one here takes ~8 s) and prints the marker
``cloudctl-kvm-probe-ok``. Listing::

        cli
        xor %ax,%ax ; mov %ax,%ds ; mov %ax,%es ; mov %ax,%ss ; mov $0x7c00,%sp
        mov $0x3f8,%dx ; mov $'R',%al ; out %al,(%dx)
        in $0x92,%al ; or $2,%al ; out %al,$0x92          # A20 on
        lgdtl gdtr
        mov %cr0,%eax ; or $1,%eax ; mov %eax,%cr0        # protected mode
        ljmpl $0x08,$pm
    pm: (.code32)
        mov $0x10,%ax ; mov %ax,%ds ; mov %ax,%es ; mov %ax,%ss
        mov $0x3f8,%dx ; mov $'P',%al ; out %al,(%dx)
        mov $0x1000,%edi ; xor %eax,%eax ; mov $3072,%ecx ; rep stosl   # clear PML4, PDPT, PD
        movl $0x2003,0x1000 ; movl $0x3003,0x2000                       # PML4[0], PDPT[0]
        mov $0x3000,%edi ; mov $0x83,%eax ; mov $512,%ecx
    3:  mov %eax,(%edi) ; add $0x200000,%eax ; add $8,%edi ; loop 3b  # identity-map 1 GiB, 2 MiB pages
        mov %cr4,%eax ; or $0x20,%eax ; mov %eax,%cr4     # PAE
        mov $0x1000,%eax ; mov %eax,%cr3
        mov $0xC0000080,%ecx ; rdmsr ; or $0x100,%eax ; wrmsr   # EFER.LME
        mov %cr0,%eax ; or $0x80000000,%eax ; mov %eax,%cr0     # paging: long mode
        ljmp $0x18,$lm
    lm: (.code64)
        mov $0x3f8,%dx ; mov $'L',%al ; out %al,(%dx)
        mov $0x200000,%edi ; mov $(0x7000000/8),%ecx ; xor %eax,%eax ; rep stosq   # touch 112 MiB
        lea msg(%rip),%rsi
    1:  lodsb ; test %al,%al ; jz 2f ; out %al,(%dx) ; jmp 1b
    2:  hlt ; jmp 2b
    gdt: .quad 0, 0x00cf9a000000ffff, 0x00cf92000000ffff, 0x00af9a000000ffff   # null, code32, data, code64
    gdtr: .word 31 ; .long gdt
    msg: .asciz "cloudctl-kvm-probe-ok\\r\\n"
        .org 510 ; .byte 0x55,0xaa
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import mmap
import os
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from compute_workers import contract

LOG = logging.getLogger(__name__)

_PROBE_CODE = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cbaf803b052eee4920c02e692660f0116f87c0f20c06683c8010f22c066ea307c00000800"
    "66b810008ed88ec08ed066baf803b050eebf0010000031c0b9000c0000f3abc7050010000003200000c7050020000003"
    "300000bf00300000b883000000b9000200008907050000200083c708e2f40f20e083c8200f22e0b8001000000f22d8b9"
    "800000c00f320d000100000f300f20c00d000000800f22c0eaaf7c0000180066baf803b04ceebf00002000b90000e000"
    "31c0f348ab488d3532000000ac84c07403eeebf8f4ebfd900000000000000000ffff0000009acf00ffff00000092cf00"
    "ffff0000009aaf001f00d87c0000636c6f756463746c2d6b766d2d70726f62652d6f6b0d0a"
)
PROBE_BOOT_SECTOR = _PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa"
PROBE_MARKER = b"cloudctl-kvm-probe-ok"
PROBE_TIMEOUT = 4.0
_STAGES = {"R": "real mode", "P": "protected mode", "L": "long mode"}

# libvirt's virDomainState numbers -> contract power states (Nova's LIBVIRT_POWER_STATE).
LIBVIRT_POWER_STATE = {
    0: contract.POWER_NOSTATE,    # VIR_DOMAIN_NOSTATE
    1: contract.POWER_RUNNING,    # VIR_DOMAIN_RUNNING
    2: contract.POWER_RUNNING,    # VIR_DOMAIN_BLOCKED: running, waiting on a resource
    3: contract.POWER_PAUSED,     # VIR_DOMAIN_PAUSED
    4: contract.POWER_SHUTDOWN,   # VIR_DOMAIN_SHUTDOWN: being shut down
    5: contract.POWER_SHUTDOWN,   # VIR_DOMAIN_SHUTOFF
    6: contract.POWER_CRASHED,    # VIR_DOMAIN_CRASHED
    7: contract.POWER_SUSPENDED,  # VIR_DOMAIN_PMSUSPENDED
}


def power_state(libvirt_state: int) -> str:
    return LIBVIRT_POWER_STATE.get(libvirt_state, contract.POWER_NOSTATE)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    seconds: float


def run_probe(accel: str = "kvm", timeout: float = PROBE_TIMEOUT,
              qemu: str = "qemu-system-x86_64") -> ProbeResult:
    """Boot the probe boot sector with ``-machine pc,accel=<accel>``; ok if the marker shows in time."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cloudctl-kvm-probe-") as tmp:
        disk, serial = Path(tmp, "boot.img"), Path(tmp, "serial.log")
        disk.write_bytes(PROBE_BOOT_SECTOR)
        argv = [qemu, "-machine", f"pc,accel={accel}", "-nodefaults", "-no-user-config", "-display", "none",
                "-m", "160", "-no-reboot", "-drive", f"file={disk},format=raw,if=ide",
                "-serial", f"file:{serial}"]
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE)
        except OSError as exc:
            return ProbeResult(False, f"cannot run {qemu}: {exc}", 0.0)
        try:
            output = b""
            while time.monotonic() - started < timeout:
                output = serial.read_bytes() if serial.exists() else b""
                if PROBE_MARKER in output:
                    seconds = time.monotonic() - started
                    return ProbeResult(True, f"probe guest finished in {seconds:.2f} s", seconds)
                if process.poll() is not None:
                    stderr = (process.stderr.read() if process.stderr else b"").decode(errors="replace")
                    return ProbeResult(False, f"probe guest failed (exit {process.returncode}): "
                                              f"{stderr.strip()[-300:]}", time.monotonic() - started)
                time.sleep(0.05)
            reached = [_STAGES[c] for c in output.decode(errors="replace")[:3] if c in _STAGES]
            return ProbeResult(False, f"probe guest did not finish in {timeout:.1f} s (reached: "
                                      f"{reached[-1] if reached else 'nothing'})",
                               time.monotonic() - started)
        finally:
            process.kill()
            process.wait()
            if process.stderr:
                process.stderr.close()


@functools.cache
def detect_virt_type(kvm_device: str = "/dev/kvm") -> tuple[str, str]:
    """("kvm" | "qemu", why), computed once per process: kvm only if a probe guest runs fast on it."""
    if not os.path.exists(kvm_device):
        return "qemu", f"{kvm_device} does not exist"
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return "qemu", f"{kvm_device} is not accessible"
    result = run_probe("kvm")
    if result.ok:
        return "kvm", f"KVM works: {result.reason}"
    return "qemu", f"KVM is unusable: {result.reason}"


def resolve_virt_type(requested: str) -> str:
    """The virt type for COMPUTE_VIRT_TYPE ``requested`` (auto|kvm|qemu), logging the choice."""
    if requested != "auto":
        LOG.info("virt type %s (configured by COMPUTE_VIRT_TYPE)", requested)
        return requested
    virt_type, why = detect_virt_type()
    LOG.info("virt type %s (COMPUTE_VIRT_TYPE=auto): %s", virt_type, why)
    return virt_type


def supports_direct_io(directory: Path) -> bool:
    """Whether files in ``directory`` can be opened with O_DIRECT (what disk cache='none' needs)."""
    probe = directory / f".directio-test-{os.getpid()}-{threading.get_ident()}"
    buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
        try:
            os.write(fd, buffer)
        finally:
            os.close(fd)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        buffer.close()
        probe.unlink(missing_ok=True)


def warn_if_not_traversable(instances_path: Path) -> None:
    """Log when QEMU (running as the libvirt-qemu user) cannot reach the disks below ``instances_path``."""
    for directory in (instances_path, *instances_path.parents):
        if not os.stat(directory).st_mode & 0o001:
            LOG.warning("%s is not traversable by other users: QEMU (running as the libvirt-qemu "
                        "user) cannot open instance disks below it", directory)
            return


def cpu_info(capabilities_xml: str) -> dict[str, Any]:
    """The host CPU of libvirt's capabilities XML, as heartbeats carry it (``cpu_info``)."""
    cpu = ET.fromstring(capabilities_xml).find("./host/cpu")
    if cpu is None:
        return {"arch": "", "model": "", "vendor": "", "features": []}
    return {
        "arch": cpu.findtext("arch", ""),
        "model": cpu.findtext("model", ""),
        "vendor": cpu.findtext("vendor", ""),
        "features": sorted(f.get("name", "") for f in cpu.findall("feature") if f.get("name")),
    }
