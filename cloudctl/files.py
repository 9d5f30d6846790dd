"""Files that hold secrets: the state directory (0700) and what it keeps (0600).

A shell redirect or a plain ``open`` creates a file with the process umask (usually 0644) before
anything can narrow it, so secrets are created here with ``os.open(..., 0o600)`` and files created
by an older version are narrowed at start-up. Used by the settings (every process imports them) and
mirrored by ``tools/run.sh`` for the files it writes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def _narrow(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` when it is wider; a path of another owner is left alone (only
    its owner or root may change it, and the owner's processes fix it when they start)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & ~mode:
        try:
            path.chmod(current & mode)
        except PermissionError:
            pass


def private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) if missing; the directory itself is 0700."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    _narrow(path, PRIVATE_DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Narrow an existing file to 0600 (and its SQLite companions ``-wal``/``-shm``)."""
    for candidate in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        _narrow(candidate, PRIVATE_FILE_MODE)
    return path


def create_private_file(path: Path, text: str = "") -> bool:
    """Create ``path`` 0600 with ``text`` unless it exists; True when this call created it.

    ``O_EXCL``: of two processes starting at once, one writes and the other reads what it wrote.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except FileExistsError:
        private_file(path)
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return True
