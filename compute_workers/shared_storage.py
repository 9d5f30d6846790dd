"""Whether two hosts share INSTANCES_PATH: Nova's marker-file test, and the storage id of heartbeats.

The destination of a migration creates ``INSTANCES_PATH/.shared-<token>`` (its name goes back to the
control plane in the check's answer); the source looks for that name in its own INSTANCES_PATH. Seen:
the same filesystem (the instance directory on the source *is* the destination's). The source only
looks (its check answers the same when delivered twice); the step that comes next removes the marker
(the destination's ``pre_live_migration`` or ``prep_resize``), and the markers of checks nobody
followed up are removed after :data:`MARKER_MAX_AGE` by the next check on that host.

Marker names come over the network and become paths: only names of the exact shape made here are
ever touched.

The marker test answers for one pair of hosts at the time of one migration; an evacuation's source is
dead and cannot look. So every host also reports, in each heartbeat, :func:`storage_id`: the content of
``INSTANCES_PATH/.storage-id``, written once by the first host to find it missing. Hosts that report
the same id read the same file, hence share the directory.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
import uuid
from pathlib import Path

from compute_workers import contract

LOG = logging.getLogger(__name__)

MARKER_PREFIX = ".shared-"
MARKER_MAX_AGE = 600.0
_MARKER = re.compile(r"\.shared-[0-9a-f]{32}")
STORAGE_ID_FILE = ".storage-id"


class InvalidMarker(ValueError):
    """A marker name that this module never makes (so it names no file to look at or remove)."""


def checked_marker(name: str) -> str:
    if not isinstance(name, str) or not _MARKER.fullmatch(name):
        raise InvalidMarker(f"invalid shared-storage marker name {name!r}")
    return name


def create_marker(instances_path: Path) -> str:
    """Create a new marker in ``instances_path`` (after removing the stale ones); returns its name.
    Raises OSError when the directory cannot be written."""
    instances_path.mkdir(mode=0o755, parents=True, exist_ok=True)
    remove_stale_markers(instances_path)
    name = f"{MARKER_PREFIX}{secrets.token_hex(16)}"
    fd = os.open(instances_path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    os.close(fd)
    return name


def marker_visible(instances_path: Path, name: str) -> bool:
    """Whether marker ``name`` exists in ``instances_path``. Raises InvalidMarker."""
    return (instances_path / checked_marker(name)).exists()


def remove_marker(instances_path: Path, name: str | None) -> bool:
    """Remove marker ``name`` if it is there (None, or an invalid name: nothing to do); True if it was."""
    if not name:
        return False
    try:
        (instances_path / checked_marker(name)).unlink()
    except InvalidMarker as exc:
        LOG.warning("%s: not removed", exc)
        return False
    except FileNotFoundError:
        return False
    return True


def remove_stale_markers(instances_path: Path, max_age: float = MARKER_MAX_AGE) -> int:
    """Remove the markers older than ``max_age`` seconds; returns how many."""
    removed = 0
    now = time.time()
    try:
        entries = [entry for entry in instances_path.iterdir() if _MARKER.fullmatch(entry.name)]
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if now - entry.stat().st_mtime > max_age:
                entry.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def storage_id(instances_path: Path) -> str:
    """The id of the storage holding ``instances_path``: ``.storage-id`` there, created with a new
    uuid4 hex (``O_CREAT|O_EXCL``) when missing and read back, so two hosts racing to create it on one
    share both report the winner's. "" when it cannot be read or written, or holds something else (it
    then matches no other host: the safe side, no evacuation keeps a disk on the strength of it)."""
    path = instances_path / STORAGE_ID_FILE
    try:
        instances_path.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, uuid.uuid4().hex.encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        LOG.warning("cannot read or write the storage id %s: %s", path, exc)
        return ""
    try:
        return contract.check_storage_id(text)
    except contract.ReportError:
        if text:  # an empty file: a host that died between creating and writing it (or writing it now)
            LOG.warning("%s holds %r, not a storage id: reporting none", path, text[:64])
        return ""
