"""Whether two hosts share INSTANCES_PATH: Nova's marker-file test.

The destination of a migration creates ``INSTANCES_PATH/.shared-<token>`` (its name goes back to the
control plane in the check's answer); the source looks for that name in its own INSTANCES_PATH. Seen:
the same filesystem (the instance directory on the source *is* the destination's). The source only
looks (its check answers the same when delivered twice); the step that comes next removes the marker
(the destination's ``pre_live_migration`` or ``prep_resize``), and the markers of checks nobody
followed up are removed after :data:`MARKER_MAX_AGE` by the next check on that host.

Marker names come over the network and become paths: only names of the exact shape made here are
ever touched.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from pathlib import Path

LOG = logging.getLogger(__name__)

MARKER_PREFIX = ".shared-"
MARKER_MAX_AGE = 600.0
_MARKER = re.compile(r"\.shared-[0-9a-f]{32}")


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
