"""Image import and lookup: the one code path for every interface (API, admin, commands)."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from cloudctl.errors import CloudctlError, QuotaExceeded
from cloudctl.identity.models import Project
from cloudctl.identity.services import is_admin, project_id_of
from cloudctl.images.models import DiskFormat, Image, ImageStatus, Visibility
from cloudctl.images.storage import image_store
from cloudctl.quotas.services import quota_enforce
from compute_workers.qemu_img_limits import QEMU_IMG_ADDRESS_SPACE, QEMU_IMG_CPU_SECONDS, prlimit_argv

log = logging.getLogger(__name__)


class ImageRejected(CloudctlError, ValueError):
    """Image bytes that must not become an active image; the message says why (HTTP 400 on the
    upload's ``file``)."""

    status_code = 400
    code = "invalid"

    def body(self) -> dict[str, Any]:
        return {"file": [str(self)]}


class ImageDataTooLarge(CloudctlError):
    """Image data over IMAGE_SIZE_CAP (HTTP 413)."""

    status_code = 413
    code = "image_too_large"


def image_path(image: Image) -> Path | None:
    """The local file holding the image's bytes, or None when it has none."""
    return image_store().local_path(str(image.id))


def images_visible_to(user: Any) -> QuerySet[Image]:
    """Public images, the user's project's images; everything for admins. Deleted never."""
    images = Image.objects.exclude(status=ImageStatus.DELETED)
    if is_admin(user):
        return images
    return images.filter(Q(visibility=Visibility.PUBLIC) | Q(owner_id=project_id_of(user)))


# qemu-img reads untrusted bytes here, in a web request: under the compute workers' limits (address
# space, CPU time: compute_workers.qemu_img_limits) and within this wall-clock time per call.
QEMU_IMG_TIMEOUT = 60.0


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img`` under the limits; a call that hits one is a refusal of the image, with the
    limit it hit."""
    argv = [*prlimit_argv(QEMU_IMG_ADDRESS_SPACE, QEMU_IMG_CPU_SECONDS), "qemu-img", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ImageRejected(f"qemu-img {args[0]} did not finish within {QEMU_IMG_TIMEOUT:g} s: "
                            "refused") from None
    # The kernel sends SIGXCPU at the soft CPU limit and SIGKILL at the hard one (prlimit sets both).
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise ImageRejected(f"qemu-img {args[0]} used more than its {QEMU_IMG_CPU_SECONDS} s of CPU "
                            "time: refused")
    if done.returncode < 0:  # an allocation beyond the address space limit aborts, say
        name = signal.Signals(-done.returncode).name
        raise ImageRejected(f"qemu-img {args[0]} crashed ({name}) within its limits "
                            f"({QEMU_IMG_ADDRESS_SPACE} bytes of memory): refused")
    return done


def inspect_disk(path: Path, declared_format: str) -> dict[str, Any]:
    """Run ``qemu-img info`` and refuse what would be unsafe or untrue to boot.

    A qcow2 that names a backing file (a path, a ``json:`` pseudo-protocol, itself) or an external
    data file can make QEMU read any file on the hypervisor host, so both are rejected, without
    following them; so is a format other than the declared one. qemu-img runs under resource limits
    (:func:`_qemu_img`): a crafted header is refused in bounded time.
    """
    probed = _qemu_img("info", "--output=json", str(path))
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
        check = _qemu_img("check", "-f", "qcow2", str(path))
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


# While bytes arrive, an upload says so on its record this often (``updated``): the reaper kills only
# uploads that stopped (IMAGE_SAVING_DEADLINE).
UPLOAD_PROGRESS_SECONDS = 10.0


def _saving_still(image: Image) -> None:
    """The upload goes on: its record says so now. Refused when the image is no longer saving (the
    reaper found it stalled and killed it)."""
    if not Image.objects.filter(pk=image.pk, status=ImageStatus.SAVING).update(updated=timezone.now()):
        image.refresh_from_db()
        raise ImageRejected(f"the upload was stopped: the image is {image.status} "
                            f"({image.properties.get('failure', 'no reason recorded')})")


def _upload_kill(image: Image, reason: str) -> None:
    """The upload failed: the image is killed with the reason, unless it is no longer saving (the
    reaper killed it already, with its own reason)."""
    Image.objects.filter(pk=image.pk, status=ImageStatus.SAVING).update(
        status=ImageStatus.KILLED, properties={**image.properties, "failure": reason},
        updated=timezone.now())
    image.refresh_from_db()


def _too_large(size: str) -> ImageDataTooLarge:
    cap = settings.IMAGE_SIZE_CAP
    return ImageDataTooLarge(f"image data is {size} bytes; IMAGE_SIZE_CAP is {cap} bytes")


def image_upload(*, image: Image, stream: BinaryIO, expected_size: int | None) -> Image:
    """Receive an image's bytes from ``stream`` (never all in memory), then inspect them.

    queued → saving → active, or killed with the reason in ``properties["failure"]`` when the
    bytes are truncated, over IMAGE_SIZE_CAP (413), not what ``disk_format`` says, or unsafe
    (backing file, data file), or when the upload is interrupted whatever the way (the client goes,
    the stream or the process raises: even ``SystemExit``); the staging file never outlives the
    call. One upload per image: the queued → saving step is a compare-and-swap. The owner's
    image_bytes quota is checked before reading when the size is announced (refused: the image
    stays queued), and always in the transaction that makes the image active (refused: killed,
    bytes removed).
    """
    if expected_size is not None and image.owner_id is not None and image.status == ImageStatus.QUEUED:
        with transaction.atomic():
            quota_enforce(project=image.owner_id, requested={"image_bytes": expected_size})
    if not Image.objects.filter(pk=image.pk, status=ImageStatus.QUEUED).update(
            status=ImageStatus.SAVING, updated=timezone.now()):
        image.refresh_from_db()
        raise ImageConflict(image, f"image {image.id} is {image.status}; only a queued image "
                                   "accepts data")
    image.refresh_from_db()
    cap = settings.IMAGE_SIZE_CAP
    store = image_store()
    digest = hashlib.sha256()
    received = 0
    try:
        if expected_size is not None and expected_size > cap:
            raise _too_large(str(expected_size))  # refused before a byte is read
        with store.staging(str(image.id)) as (handle, staged):
            said = time.monotonic()
            while chunk := stream.read(min(UPLOAD_CHUNK, cap + 1 - received)):
                received += len(chunk)
                if received > cap:
                    raise _too_large(f"more than {cap}")
                handle.write(chunk)
                digest.update(chunk)
                if time.monotonic() - said >= UPLOAD_PROGRESS_SECONDS:
                    _saving_still(image)
                    said = time.monotonic()
            handle.flush()
            if expected_size is not None and received != expected_size:
                raise ImageRejected(f"upload truncated: received {received} of {expected_size} "
                                    "bytes")
            if received == 0:
                raise ImageRejected("upload is empty")
            _saving_still(image)
            info = inspect_disk(staged, image.disk_format)
            store.commit(staged, str(image.id))
    except CloudctlError as exc:
        _upload_kill(image, str(exc))
        raise
    except BaseException as exc:  # a dying web worker (SystemExit) must not leave it saving either
        _upload_kill(image, f"upload interrupted after {received} bytes: {type(exc).__name__}: {exc}")
        raise
    try:
        with transaction.atomic():
            if image.owner_id is not None:
                quota_enforce(project=image.owner_id, requested={"image_bytes": received})
            activated = Image.objects.filter(pk=image.pk, status=ImageStatus.SAVING).update(
                status=ImageStatus.ACTIVE, size=received, sha256=digest.hexdigest(),
                virtual_size=info.get("virtual-size"), updated=timezone.now())
    except QuotaExceeded as exc:
        store.delete(str(image.id))
        _upload_kill(image, str(exc))
        raise
    if not activated:
        # The reaper killed it between the last word and the commit: its data goes.
        store.delete(str(image.id))
        image.refresh_from_db()
        raise ImageRejected(f"the upload was stopped: the image is {image.status}")
    image.refresh_from_db()
    return image


def image_uploads_reap(*, now: datetime | None = None) -> int:
    """Kill the images whose upload stopped: ``saving`` without receiving data for
    IMAGE_SAVING_DEADLINE seconds (the web process died mid-upload, or its client went silent), and
    remove their staging files. A live upload that resumes later finds its image killed and stops.
    Returns how many were killed. Run by the reaper (``conductor.reap_expired_tasks``)."""
    now = now or timezone.now()
    deadline = settings.IMAGE_SAVING_DEADLINE
    reaped = 0
    store = image_store()
    stalled = Image.objects.filter(status=ImageStatus.SAVING,
                                   updated__lt=now - timedelta(seconds=deadline))
    for image in stalled:
        reason = (f"upload stalled: no data for {deadline} s (TASK_DEADLINE_IMAGE_SAVING); the "
                  "uploading client or process is gone")
        if Image.objects.filter(pk=image.pk, status=ImageStatus.SAVING, updated=image.updated).update(
                status=ImageStatus.KILLED, properties={**image.properties, "failure": reason},
                updated=now):
            removed = store.staging_discard(str(image.id))
            log.warning("image %s killed: %s (%d staging file(s) removed)", image.id, reason, removed)
            reaped += 1
    return reaped


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
