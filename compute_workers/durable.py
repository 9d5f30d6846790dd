"""Files a crash cannot leave half-written: written beside their place, fsync'd, renamed into place,
and the directory fsync'd so that the rename itself survives a power loss. For the host's journals
(redelivery, outbox of reports), which a restarted worker reads back."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def replace_durably(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Make ``path`` hold exactly ``data``, atomically and durably (its directory must exist)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    temporary.rename(path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
