"""The image app's part of the quotas: images count from their create until deleted (as Glance's
image_count_total); image_bytes are the sizes of the project's active images (the bytes stored).
Public images imported without an owner count against no project."""

from __future__ import annotations

from django.db.models import Sum

from cloudctl.images.models import Image, ImageStatus
from cloudctl.quotas import registry

IMAGE_RESOURCES = ("images", "image_bytes")


def count_images(project_id: int) -> dict[str, int]:
    owned = Image.objects.filter(owner_id=project_id)
    stored = owned.filter(status=ImageStatus.ACTIVE).aggregate(n=Sum("size"))["n"]
    return {"images": owned.exclude(status=ImageStatus.DELETED).count(), "image_bytes": int(stored or 0)}


def register() -> None:
    registry.register_counter(IMAGE_RESOURCES, count_images)
