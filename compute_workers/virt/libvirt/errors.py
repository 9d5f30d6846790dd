"""libvirt errors as the worker's exceptions, shared by the libvirt driver's modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt

from compute_workers.exception import ComputeError, HypervisorError, InstanceNotFound


def error_code(exc: libvirt.libvirtError) -> int:
    """libvirt's ``VIR_ERR_*`` code of ``exc`` (0 when it has none)."""
    return int(exc.get_error_code() or 0)


@contextlib.contextmanager
def hypervisor_errors(what: str, instance_uuid: str | None = None) -> Iterator[None]:
    """Turn libvirt errors into the worker's exceptions (no domain -> InstanceNotFound)."""
    try:
        yield
    except libvirt.libvirtError as exc:
        if instance_uuid and error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            raise InstanceNotFound(f"instance {instance_uuid} not found on this host") from exc
        raise HypervisorError(f"{what}: {exc.get_error_message() or exc}") from exc


def cause(exc: BaseException) -> str:
    """An error's message for a user: ours as they are, anything else with its type."""
    if isinstance(exc, ComputeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
