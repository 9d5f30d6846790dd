"""Image import and lookup: the one code path for every interface (API, admin, commands)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, BinaryIO

from django.db import transaction
from django.db.models import Q, QuerySet

from cloudctl.errors import CloudctlError, QuotaExceeded
from cloudctl.identity.models import Project
from cloudctl.identity.services import is_admin, project_id_of
from cloudctl.images.models import DiskFormat, Image, ImageStatus, Visibility
from cloudctl.images.storage import image_store
from cloudctl.quotas.services import quota_enforce


class ImageRejected(CloudctlError, ValueError):
    """Image bytes that must not become an active image; the message says why (HTTP 400 on the
    upload's ``file``)."""

    status_code = 400
    code = "invalid"

    def body(self) -> dict[str, Any]:
        return {"file": [str(self)]}


def image_path(image: Image) -> Path | None:
    """The local file holding the image's bytes, or None when it has none."""
    return image_store().local_path(str(image.id))


def images_visible_to(user: Any) -> QuerySet[Image]:
    """Public images, the user's project's images; everything for admins. Deleted never."""
    images = Image.objects.exclude(status=ImageStatus.DELETED)
    if is_admin(user):
        return images
    return images.filter(Q(visibility=Visibility.PUBLIC) | Q(owner_id=project_id_of(user)))


def inspect_disk(path: Path, declared_format: str) -> dict[str, Any]:
    """Run ``qemu-img info`` and refuse what would be unsafe or untrue to boot.

    A qcow2 that names a backing file or an external data file can make QEMU read any file on the
    hypervisor host, so both are rejected; so is a format other than the declared one.
    """
    probed = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                            capture_output=True, text=True, timeout=60)
    if probed.returncode != 0:
        reason = probed.stderr.strip().rsplit(": ", 1)[-1]
        raise ImageRejected(f"not a readable disk image: {reason}")
    info = json.loads(probed.stdout)
    if info.get("format") != declared_format:
        raise ImageRejected(f"declared disk_format {declared_format} but the data is "
                            f"{info.get('format')}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageRejected("qcow2 images with a backing file are not accepted")
    data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
    if data_file:
        raise ImageRejected("qcow2 images with an external data file are not accepted")
    if declared_format == DiskFormat.QCOW2:
        check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)],
                               capture_output=True, text=True, timeout=300)
        if check.returncode not in (0,):
            raise ImageRejected(f"qcow2 consistency check failed: {check.stdout.strip()[-300:]}")
    return info


class ImageConflict(CloudctlError):
    """The image is not in a state that allows the operation (HTTP 409)."""

    def __init__(self, image: Image, message: str) -> None:
        self.image = image
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {**super().body(), "status": self.image.status}


UPLOAD_CHUNK = 1024 * 1024


def image_create(*, name: str, disk_format: str, owner: Project | None,
                 visibility: str = Visibility.PRIVATE, container_format: str = "bare",
                 min_ram: int = 0, min_disk: int = 0,
                 properties: dict[str, Any] | None = None) -> Image:
    """A queued image record, waiting for its bytes; counted against ``owner``'s images quota."""
    with transaction.atomic():
        if owner is not None:
            quota_enforce(project=owner, requested={"images": 1})
        return Image.objects.create(name=name, disk_format=disk_format, owner=owner,
                                    visibility=visibility, container_format=container_format,
                                    min_ram=min_ram, min_disk=min_disk,
                                    properties=properties or {}, status=ImageStatus.QUEUED)


def image_kill(image: Image, reason: str) -> None:
    """A failed upload or snapshot: the image will never have data."""
    properties = {**image.properties, "failure": reason}
    Image.objects.filter(pk=image.pk).exclude(status=ImageStatus.ACTIVE).update(
        status=ImageStatus.KILLED, properties=properties)
    image.refresh_from_db()


def image_upload(*, image: Image, stream: BinaryIO, expected_size: int | None) -> Image:
    """Receive an image's bytes from ``stream`` (never all in memory), then inspect them.

    queued → saving → active, or killed with the reason in ``properties["failure"]`` when the
    bytes are truncated, not what ``disk_format`` says, or unsafe (backing file, data file).
    One upload per image: the queued → saving step is a compare-and-swap. The owner's image_bytes
    quota is checked before reading when the size is announced (refused: the image stays queued),
    and always in the transaction that makes the image active (refused: killed, bytes removed).
    """
    if expected_size is not None and image.owner_id is not None and image.status == ImageStatus.QUEUED:
        with transaction.atomic():
            quota_enforce(project=image.owner_id, requested={"image_bytes": expected_size})
    if not Image.objects.filter(pk=image.pk, status=ImageStatus.QUEUED).update(
            status=ImageStatus.SAVING):
        image.refresh_from_db()
        raise ImageConflict(image, f"image {image.id} is {image.status}; only a queued image "
                                   "accepts data")
    store = image_store()
    digest = hashlib.sha256()
    received = 0
    try:
        with store.staging() as (handle, staged):
            while chunk := stream.read(UPLOAD_CHUNK):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
            handle.flush()
            if expected_size is not None and received != expected_size:
                raise ImageRejected(f"upload truncated: received {received} of {expected_size} "
                                    "bytes")
            if received == 0:
                raise ImageRejected("upload is empty")
            info = inspect_disk(staged, image.disk_format)
            store.commit(staged, str(image.id))
    except ImageRejected as exc:
        image_kill(image, str(exc))
        raise
    except Exception as exc:
        image_kill(image, f"upload failed: {exc}")
        raise
    try:
        with transaction.atomic():
            if image.owner_id is not None:
                quota_enforce(project=image.owner_id, requested={"image_bytes": received})
            Image.objects.filter(pk=image.pk).update(
                status=ImageStatus.ACTIVE, size=received, sha256=digest.hexdigest(),
                virtual_size=info.get("virtual-size"))
    except QuotaExceeded as exc:
        store.delete(str(image.id))
        image_kill(image, str(exc))
        raise
    image.refresh_from_db()
    return image


def image_delete(*, image: Image) -> None:
    """The record stays as history (deleted); the bytes go."""
    Image.objects.filter(pk=image.pk).update(status=ImageStatus.DELETED)
    image_store().delete(str(image.id))


def image_import(*, name: str, source: Path, disk_format: str, visibility: str = Visibility.PUBLIC,
                 owner: Project | None = None, min_ram: int = 0, min_disk: int = 0,
                 properties: dict[str, Any] | None = None) -> Image:
    """Register a local file as an image through the same path as an API upload.

    Idempotent by (name, sha256): importing the same bytes under the same name again returns the
    existing image.
    """
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for chunk in iter(lambda: handle.read(UPLOAD_CHUNK), b""):
            digest.update(chunk)
    existing = Image.objects.filter(name=name, sha256=digest.hexdigest(),
                                    status=ImageStatus.ACTIVE).first()
    if existing is not None and image_path(existing) is not None:
        return existing
    image = image_create(name=name, disk_format=disk_format, owner=owner, visibility=visibility,
                         min_ram=min_ram, min_disk=min_disk, properties=properties)
    with open(source, "rb") as handle:
        return image_upload(image=image, stream=handle, expected_size=source.stat().st_size)
