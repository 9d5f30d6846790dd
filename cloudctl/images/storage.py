"""Where image bytes live. The setting IMAGE_STORE names the backend; ``local`` (a directory,
IMAGES_PATH) is the one that exists. The interface is small so an object store can follow:
write a stream under a key, read it back (whole or a byte range), size, delete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from django.conf import settings


class ImageStore(Protocol):
    def staging(self, key: str) -> AbstractContextManager[tuple[BinaryIO, Path]]:
        """A context manager yielding a writable file and its local path, for bytes that are not
        yet ``key``'s data; removed on exit unless :meth:`commit` took it."""

    def staging_discard(self, key: str) -> int:
        """Remove what a staging of ``key`` left behind (its process died before the exit);
        returns how many files went."""

    def commit(self, staged: Path, key: str) -> None:
        """Make staged bytes the data of ``key`` (atomically)."""

    def local_path(self, key: str) -> Path | None:
        """A local file holding ``key``'s data, or None when it has none."""

    def delete(self, key: str) -> None: ...


class LocalDirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def staging(self, key: str) -> Iterator[tuple[BinaryIO, Path]]:
        self.root.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=self.root, prefix=f".upload-{key}-", delete=False)
        path = Path(handle.name)
        try:
            with handle:
                yield cast(BinaryIO, handle), path
        finally:
            path.unlink(missing_ok=True)

    def staging_discard(self, key: str) -> int:
        leftovers = list(self.root.glob(f".upload-{key}-*")) if self.root.exists() else []
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def commit(self, staged: Path, key: str) -> None:
        os.replace(staged, self.root / key)

    def local_path(self, key: str) -> Path | None:
        path = self.root / key
        return path if path.exists() else None

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


def image_store() -> ImageStore:
    if settings.IMAGE_STORE != "local":
        raise ValueError(f"unknown IMAGE_STORE {settings.IMAGE_STORE!r}; known: local")
    return LocalDirectoryStore(Path(settings.IMAGES_PATH))
