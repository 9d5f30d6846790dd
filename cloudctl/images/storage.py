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
    def staging(self) -> AbstractContextManager[tuple[BinaryIO, Path]]:
        """A context manager yielding a writable file and its local path, for bytes that are not
        yet an image; removed on exit unless :meth:`commit` took it."""

    def commit(self, staged: Path, key: str) -> None:
        """Make staged bytes the data of ``key`` (atomically)."""

    def local_path(self, key: str) -> Path | None:
        """A local file holding ``key``'s data, or None when it has none."""

    def delete(self, key: str) -> None: ...


class LocalDirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def staging(self) -> Iterator[tuple[BinaryIO, Path]]:
        self.root.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=self.root, prefix=".upload-", delete=False)
        path = Path(handle.name)
        try:
            with handle:
                yield cast(BinaryIO, handle), path
        finally:
            path.unlink(missing_ok=True)

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
