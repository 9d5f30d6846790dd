"""Image download, the per-host image cache, and the qemu-img calls that inspect and layer images.

Layout (as Nova's libvirt driver)::

    INSTANCES_PATH/_base/<image-id>      cached base image, verified, never written after the rename
    INSTANCES_PATH/<uuid>/disk           qcow2 overlay whose backing file is the base

A base image is downloaded once per host even when spawns race: a per-image lock serializes threads
and an ``flock`` serializes processes. The bytes go to a temporary file that becomes the cached file by
an atomic rename only after its sha256, its size and its format (``qemu-img info``: the declared
format, no backing file, no external data file) have been checked, so a cache entry is always whole
and safe to hand to QEMU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from compute_workers import credentials, qemu_img_limits
from compute_workers.exception import (
    HypervisorError,
    ImageChecksumMismatch,
    ImageDownloadError,
    ImageError,
    ImageFormatError,
    ImageNotFound,
    ImageSizeMismatch,
    ImageTooLarge,
    ImageURLRefused,
)
from compute_workers.locks import KeyedLock, file_lock, try_file_lock

LOG = logging.getLogger(__name__)

GiB = 1024 ** 3
CHUNK_SIZE = 1024 * 1024
QEMU_IMG_TIMEOUT = 120.0
# qemu-img parses untrusted files: bound its memory and CPU time, as Nova does (the control plane's
# upload inspection uses the same limits: compute_workers.qemu_img_limits).
QEMU_IMG_PRLIMIT = qemu_img_limits.QEMU_IMG_PRLIMIT
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclasses.dataclass(frozen=True)
class FetchResult:
    path: Path
    downloaded_bytes: int  # 0 when the image was already cached
    seconds: float


def _run(argv: list[str], what: str, timeout: float = QEMU_IMG_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a host tool; a missing tool, a hang or a crash is a host problem (HypervisorError)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise HypervisorError(f"{what}: {exc.filename} is not installed on this host") from exc
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(f"{what}: {argv[0]} did not finish in {timeout:.0f} s") from exc


def qemu_img_info(path: Path, disk_format: str | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path``; the format is probed unless ``disk_format`` is given.

    Raises ImageFormatError when qemu-img cannot read the file.
    """
    argv = [*QEMU_IMG_PRLIMIT, "qemu-img", "info", "--output=json", "--force-share"]
    if disk_format:
        argv += ["-f", disk_format]
    result = _run([*argv, str(path)], f"inspecting {path.name}")
    if result.returncode != 0:
        raise ImageFormatError(f"qemu-img cannot read the image: {result.stderr.strip()}")
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def check_image_file(path: Path, name: str, disk_format: str) -> dict[str, Any]:
    """Refuse an image that is not of ``disk_format`` or that refers to other files; return its info.

    A "raw" image whose bytes are really qcow2 with a backing file would make QEMU open any file of
    the host, so the format is probed, never trusted.
    """
    info = qemu_img_info(path)
    if info.get("format") != disk_format:
        raise ImageFormatError(f"Image {name} is declared {disk_format} but its content is "
                               f"{info.get('format')}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageFormatError(f"Image {name} has a backing file ({info.get('backing-filename')}): "
                               "refused")
    data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
    if data_file:
        raise ImageFormatError(f"Image {name} has an external data file ({data_file}): refused")
    return info


def create_overlay(base: Path, base_format: str, disk: Path, root_gb: int, image_name: str) -> None:
    """Create ``disk``, a qcow2 overlay of ``base`` of ``root_gb`` GiB (the image's size when 0).

    Raises ImageTooLarge when the image's virtual size exceeds ``root_gb``.
    """
    virtual_size = int(qemu_img_info(base, base_format)["virtual-size"])
    if root_gb and virtual_size > root_gb * GiB:
        raise ImageTooLarge(f"Image {image_name} virtual size {virtual_size / GiB:.2f} GiB exceeds flavor "
                            f"root disk {root_gb} GiB")
    argv = ["qemu-img", "create", "-f", "qcow2", "-F", base_format, "-b", str(base), str(disk)]
    if root_gb:
        argv.append(f"{root_gb}G")
    result = _run(argv, "creating the instance disk")
    if result.returncode != 0:
        raise HypervisorError(f"qemu-img create failed: {result.stderr.strip()}")


def grow_disk(disk: Path, size: int) -> bool:
    """Grow the qcow2 ``disk`` to a virtual size of ``size`` bytes (``qemu-img resize``); returns
    False, changing nothing, when it is already that large. Never shrinks: that would cut the guest's
    filesystem short."""
    current = int(qemu_img_info(disk, "qcow2")["virtual-size"])
    if size <= current:
        return False
    result = _run(["qemu-img", "resize", "-q", "-f", "qcow2", str(disk), str(size)], "growing the disk")
    if result.returncode != 0:
        raise HypervisorError(f"qemu-img resize failed: {result.stderr.strip()}")
    return True


def create_delta(backing: Path | None, backing_format: str, delta: Path, virtual_size: int) -> None:
    """Create ``delta``, an empty qcow2 of ``virtual_size`` bytes backed by ``backing`` (None: none):
    the destination of a shallow block copy."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-F", backing_format, "-b", str(backing)]
    result = _run([*argv, str(delta), str(virtual_size)], "creating the snapshot delta")
    if result.returncode != 0:
        raise HypervisorError(f"qemu-img create failed: {result.stderr.strip()}")


def convert_to_standalone(source: Path, source_format: str, target: Path, timeout: float) -> None:
    """``qemu-img convert -O qcow2 -c``: ``source`` and its whole backing chain flattened into
    ``target``, a compressed, compact qcow2 with no backing file (unallocated and zero clusters are
    left out). The demo image: 14 MiB compressed in 0.5 s, against 18 MiB in 0.1 s uncompressed."""
    argv = ["qemu-img", "convert", "-c", "-f", source_format, "-O", "qcow2", str(source), str(target)]
    result = _run(argv, "converting the snapshot", timeout=timeout)
    if result.returncode != 0:
        raise HypervisorError(f"qemu-img convert failed: {result.stderr.strip()}")


def qcow2_backing_file(path: Path) -> str | None:
    """The backing file name written in a qcow2 header, None when it has none or is no qcow2.

    Read from the header (big-endian: magic, version, backing_file_offset u64, backing_file_size u32),
    so that scanning every instance disk costs no qemu-img call.
    """
    try:
        with open(path, "rb") as disk:
            header = disk.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return None
            offset = int.from_bytes(header[8:16], "big")
            size = int.from_bytes(header[16:20], "big")
            if not offset or not size or size > 4096:
                return None
            disk.seek(offset)
            return disk.read(size).decode("utf-8", errors="replace")
    except OSError:
        return None


class ImageCache:
    """Downloads images into ``base_dir`` once and hands out the cached paths; only from URLs under
    ``api_url``, the one place the service token ``token`` is sent to."""

    def __init__(self, base_dir: Path, *, token: str, timeout: float, api_url: str) -> None:
        self.base_dir = base_dir
        self.token = token
        self.timeout = timeout
        self.api_url = api_url
        self._locks = KeyedLock()

    def check_url(self, url: Any, name: str) -> str:
        """``url`` if the service token may be sent there (under the API URL); else ImageURLRefused."""
        try:
            return credentials.check_api_url(url, self.api_url, f"the URL of image {name}")
        except credentials.UntrustedURL as exc:
            raise ImageURLRefused(str(exc)) from None

    def path(self, image_id: str) -> Path:
        if not _IMAGE_ID.fullmatch(image_id):
            raise ImageError(f"invalid image id {image_id!r}")
        return self.base_dir / image_id

    def fetch(self, image: dict[str, Any]) -> FetchResult:
        """The cached file of ``image`` (the spec's image dict), downloaded and verified if missing.

        Raises ImageError subclasses for a bad image (not worth retrying elsewhere) and
        ImageDownloadError when the download itself failed.
        """
        started = time.monotonic()
        target = self.path(image["id"])
        self.base_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        with self._locks.hold(image["id"]), file_lock(self.base_dir / f".{image['id']}.lock"):
            if target.exists():
                os.utime(target)  # used now: the cache cleanup keeps what spawns use
                return FetchResult(target, 0, time.monotonic() - started)
            size = self._download(image, target)
        seconds = time.monotonic() - started
        LOG.info("image %s (%s) cached at %s: %d bytes in %.1f s", image["id"], image.get("name"), target,
                 size, seconds)
        return FetchResult(target, size, seconds)

    def cleanup(self, max_age: float, in_use: set[str]) -> list[str]:
        """Remove the cached images not in ``in_use`` (ids of the images instance disks are backed
        by) whose file was not touched (downloaded, or used by a spawn) for ``max_age`` seconds.

        An image whose lock a download or spawn holds (thread or process) is skipped, never waited
        for. Returns the ids removed.
        """
        removed: list[str] = []
        try:
            entries = sorted(self.base_dir.iterdir())
        except FileNotFoundError:
            return removed
        for entry in entries:
            image_id = entry.name
            if not _IMAGE_ID.fullmatch(image_id) or image_id in in_use or not entry.is_file():
                continue
            with self._locks.try_hold(image_id) as held:
                if not held:
                    continue
                with try_file_lock(self.base_dir / f".{image_id}.lock") as locked:
                    if not locked:
                        continue
                    try:
                        age = time.time() - entry.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age < max_age:
                        continue
                    entry.unlink(missing_ok=True)
                    (self.base_dir / f".{image_id}.lock").unlink(missing_ok=True)
            LOG.info("image cache: removed %s (unused by the instances of this host, last used %.0f s "
                     "ago)", entry, age)
            removed.append(image_id)
        return removed

    def _download(self, image: dict[str, Any], target: Path) -> int:
        name = image.get("name") or image["id"]
        if not self.token:
            raise ImageDownloadError(f"cannot download image {name}: CLOUDCTL_SERVICE_TOKEN is not set "
                                     "on this host")
        url = self.check_url(image.get("url"), name)
        expected_size = image.get("size") if isinstance(image.get("size"), int) else None
        partial = self.base_dir / f".{image['id']}.part-{uuid.uuid4().hex}"
        try:
            size, digest = self._stream_to(url, name, partial, expected_size)
            if expected_size is not None and size != expected_size:
                raise ImageSizeMismatch(f"Image {name} size mismatch: expected {expected_size} bytes, "
                                        f"got {size}")
            if digest != image["sha256"].lower():
                raise ImageChecksumMismatch(f"Image {name} checksum mismatch: expected sha256 "
                                            f"{image['sha256']}, got {digest}")
            check_image_file(partial, name, image["disk_format"])
            partial.chmod(0o644)
            partial.rename(target)
            return size
        finally:
            partial.unlink(missing_ok=True)

    def _stream_to(self, url: str, name: str, partial: Path, expected_size: int | None) -> tuple[int, str]:
        deadline = time.monotonic() + self.timeout
        sha256 = hashlib.sha256()
        size = 0
        headers = {"Authorization": f"Token {self.token}"}
        try:
            with requests.get(url, headers=headers, stream=True,
                              timeout=(min(10.0, self.timeout), min(60.0, self.timeout))) as response:
                if response.status_code == 404:
                    raise ImageNotFound(f"Image {name} not found at the image API ({url})")
                if response.status_code != 200:
                    raise ImageDownloadError(f"cannot download image {name}: the image API answered "
                                             f"HTTP {response.status_code}")
                with open(partial, "xb") as out:
                    for chunk in response.iter_content(CHUNK_SIZE):
                        size += len(chunk)
                        if expected_size is not None and size > expected_size:
                            raise ImageSizeMismatch(f"Image {name} size mismatch: more than the "
                                                    f"expected {expected_size} bytes")
                        if time.monotonic() > deadline:
                            raise ImageDownloadError(f"download of image {name} took longer than "
                                                     f"{self.timeout:.0f} s")
                        sha256.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
        except requests.RequestException as exc:
            raise ImageDownloadError(f"cannot download image {name}: {exc}") from exc
        return size, sha256.hexdigest()
