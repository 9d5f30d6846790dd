"""The files a resize (or cold migration) keeps on its source: the saved definition and power state of
the domain it undefined, which travel with the instance's directory to ``<uuid>_resize`` and put the
instance back on a revert or a failure; and the check that the copy overwrites no domain's disk."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import libvirt

from compute_workers import contract
from compute_workers.exception import HypervisorError, InstanceExists, InstanceInvalidState, InstanceNotFound
from compute_workers.virt.libvirt.errors import error_code, hypervisor_errors

# A resize's source saves here, before undefining the domain, what putting it back needs: the
# definition and the power state. It travels with the directory to <uuid>_resize.
RESIZE_STATE_FILE = "resize-source.json"


def refuse_domain_at(dest_conn: libvirt.virConnect, instance_uuid: str, dest_uri: str) -> None:
    """The copy must never overwrite the disk of a domain the destination already has (this domain
    is undefined by now, so on a same-host resize there is none)."""
    try:
        dest_conn.lookupByName(contract.domain_name(instance_uuid))
    except libvirt.libvirtError as exc:
        if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise HypervisorError(f"cannot look up instance {instance_uuid} at {dest_uri}: {exc}") from exc
    raise InstanceExists(f"a domain of instance {instance_uuid} already exists at {dest_uri}: its disk "
                         "is not overwritten")


def save_state(directory: Path, domain: libvirt.virDomain, power_state: str) -> None:
    """Write the domain's inactive definition and ``power_state`` to ``directory`` (atomically, synced)."""
    with hypervisor_errors(f"cannot read the definition of {domain.name()}"):
        xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    path = directory / RESIZE_STATE_FILE
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump({"power_state": power_state, "xml": xml}, out)
        out.flush()
        os.fsync(out.fileno())
    temporary.rename(path)


def load_state(directory: Path) -> dict[str, Any]:
    """What :func:`save_state` wrote: ``power_state`` and ``xml``."""
    try:
        state: dict[str, Any] = json.loads((directory / RESIZE_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HypervisorError(f"cannot read {directory / RESIZE_STATE_FILE}: {exc}") from exc
    return state


def check_source(instance_uuid: str, directory: Path, resize_dir: Path, *, domain_defined: bool) -> None:
    """Refuse a resize the source cannot start: an earlier one still holds ``resize_dir``, or the files
    are missing; without a domain, only an interrupted resize (its saved state is here) goes on."""
    if domain_defined:
        if resize_dir.exists():
            raise InstanceInvalidState(
                f"cannot resize instance {instance_uuid}: {resize_dir} of an earlier resize is still on "
                "this host (that resize was neither confirmed nor reverted)")
        if not directory.is_dir():
            raise HypervisorError(f"the files of instance {instance_uuid} are not on this host "
                                  f"({directory} is missing)")
    elif not (resize_dir / RESIZE_STATE_FILE).exists() and not (directory / RESIZE_STATE_FILE).exists():
        raise InstanceNotFound(f"instance {instance_uuid} not found on this host")


def restore_directory(directory: Path, resize_dir: Path, copy_started: bool) -> None:
    """Move the original files in ``resize_dir`` back to ``directory``, removing the copy there if this
    resize made it (``copy_started``); anything else there is left as it is, and so are the files."""
    if not resize_dir.exists():
        return
    if directory.exists():  # the destination's copy, on this host or on shared storage
        if not copy_started:  # not known to be ours: it may be a domain's disk there
            raise InstanceInvalidState(f"{directory} exists beside {resize_dir}; both left as they are")
        shutil.rmtree(directory)
    os.rename(resize_dir, directory)
