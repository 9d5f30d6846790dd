"""Removing a test's guests from a libvirt connection, whatever state they are in by then."""

from __future__ import annotations

from collections.abc import Callable

import libvirt

_GONE_OR_STOPPED = (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN)


def remove_domains(conn: libvirt.virConnect, belongs_to_test: Callable[[libvirt.virDomain], bool]) -> None:
    """Destroy and undefine every domain ``belongs_to_test`` picks.

    A guest that was asked to power off may stop (or a transient one vanish) between ``isActive()`` and
    ``destroy()``: "domain is not running" and "no domain" mean the work is done, not that cleanup failed
    (a CI run once failed on exactly that race)."""
    for domain in conn.listAllDomains():
        try:
            if not belongs_to_test(domain):
                continue
            if domain.isActive():
                domain.destroy()
        except libvirt.libvirtError as error:
            if error.get_error_code() not in _GONE_OR_STOPPED:
                raise
        try:
            if domain.isPersistent():
                domain.undefine()
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
