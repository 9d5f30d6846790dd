"""What the libvirt driver does to one domain, whatever instance it is (Nova's ``guest.py``): its
power state, a clean shutdown, a hard stop, undefining it, and the tail of its console log."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import libvirt

from compute_workers import contract
from compute_workers.exception import HypervisorError
from compute_workers.virt.libvirt import host
from compute_workers.virt.libvirt.errors import error_code, hypervisor_errors

CONSOLE_MAX_BYTES = 100 * 1024
_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
_UNDEFINE_FLAGS_MINIMAL = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                           | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


def power_state(domain: libvirt.virDomain) -> str:
    """Power state of ``domain``; libvirt says shut off for a managed-saved domain, we say
    suspended (the save image decides, not the shutoff reason: that outlives a removed image)."""
    state = domain.state()[0]
    if state == libvirt.VIR_DOMAIN_SHUTOFF and domain.hasManagedSaveImage(0):
        return contract.POWER_SUSPENDED
    return host.power_state(state)


def shutdown(domain: libvirt.virDomain, timeout: float, *, retry_interval: float,
             poll_interval: float) -> bool:
    """ACPI power button, pressed again every ``retry_interval`` (a guest still booting misses a
    press), until shut off (looked at every ``poll_interval``) or ``timeout``."""
    if not domain.isActive():
        return True
    if domain.state()[0] not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return False  # paused or crashed: nothing in the guest can act on the request
    deadline = time.monotonic() + timeout
    next_press = 0.0
    while True:
        now = time.monotonic()
        if now >= next_press:
            try:
                domain.shutdown()
            except libvirt.libvirtError as exc:
                if error_code(exc) != libvirt.VIR_ERR_OPERATION_INVALID:  # "not running": done
                    raise
            next_press = now + retry_interval
        if not domain.isActive():
            return True
        if now >= deadline:
            return False
        time.sleep(min(poll_interval, max(deadline - now, 0.01)))


def stop(domain: libvirt.virDomain) -> None:
    """Hard stop; a domain already stopped or gone is fine. QEMU sometimes answers EBUSY while it
    is still flushing: retry a few times, as Nova does."""
    for attempt in range(3):
        try:
            if domain.isActive():
                domain.destroy()
            return
        except libvirt.libvirtError as exc:
            code = error_code(exc)
            if code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return
            if code == libvirt.VIR_ERR_SYSTEM_ERROR and exc.get_int1() == errno.EBUSY and attempt < 2:
                time.sleep(1)
                continue
            raise HypervisorError(f"libvirt cannot stop {domain.name()}: {exc}") from exc


def undefine(domain: libvirt.virDomain) -> None:
    """Undefine ``domain`` with its managed save, snapshot metadata and NVRAM (fewer flags for a
    daemon that refuses some); a domain already gone is fine."""
    for flags in (_UNDEFINE_FLAGS, _UNDEFINE_FLAGS_MINIMAL):
        try:
            domain.undefineFlags(flags)
            return
        except libvirt.libvirtError as exc:
            code = error_code(exc)
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                return
            if code not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG):
                raise HypervisorError(f"libvirt cannot undefine {domain.name()}: {exc}") from exc
    with hypervisor_errors(f"libvirt cannot undefine {domain.name()}"):
        domain.undefine()


def console_tail(path: Path, lines: int) -> str:
    """The last ``lines`` whole lines of the console log within its last CONSOLE_MAX_BYTES.
    Raises FileNotFoundError."""
    with open(path, "rb") as log:
        size = log.seek(0, os.SEEK_END)
        start = max(0, size - CONSOLE_MAX_BYTES)
        log.seek(start)
        data = log.read(CONSOLE_MAX_BYTES)
    text_lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
    if start > 0 and text_lines:
        text_lines = text_lines[1:]  # the first one was cut by the byte limit
    return "".join(text_lines[-lines:]) if lines > 0 else ""
