"""Image import and lookup: the one code path for every interface (API, admin, commands)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Q, QuerySet

from cloudctl.identity.models import Project
from cloudctl.identity.services import is_admin, project_id_of
from cloudctl.images.models import DiskFormat, Image, ImageStatus, Visibility


class ImageRejected(ValueError):
    """Image bytes that must not become an active image; the message says why."""


def image_path(image: Image) -> Path:
    return Path(settings.IMAGES_PATH) / str(image.id)


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


def image_import(*, name: str, source: Path, disk_format: str, visibility: str = Visibility.PUBLIC,
                 owner: Project | None = None, min_ram: int = 0, min_disk: int = 0,
                 properties: dict[str, Any] | None = None) -> Image:
    """Copy a local file into the image store, inspect it and make it an active image.

    Idempotent by (name, sha256): importing the same bytes under the same name again returns the
    existing image.
    """
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    sha256 = digest.hexdigest()
    existing = Image.objects.filter(name=name, sha256=sha256, status=ImageStatus.ACTIVE).first()
    if existing is not None and image_path(existing).exists():
        return existing

    image = Image.objects.create(name=name, disk_format=disk_format, visibility=visibility,
                                 owner=owner, min_ram=min_ram, min_disk=min_disk,
                                 properties=properties or {}, status=ImageStatus.SAVING)
    store = Path(settings.IMAGES_PATH)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=store, delete=False, prefix=".upload-") as tmp:
        with open(source, "rb") as handle:
            shutil.copyfileobj(handle, tmp, 1024 * 1024)
    tmp_path = Path(tmp.name)
    try:
        info = inspect_disk(tmp_path, disk_format)
    except ImageRejected:
        tmp_path.unlink(missing_ok=True)
        Image.objects.filter(pk=image.pk).update(status=ImageStatus.KILLED)
        raise
    tmp_path.rename(image_path(image))
    image.size = image_path(image).stat().st_size
    image.virtual_size = info.get("virtual-size")
    image.sha256 = sha256
    image.status = ImageStatus.ACTIVE
    image.save(update_fields=["size", "virtual_size", "sha256", "status", "updated"])
    return image
