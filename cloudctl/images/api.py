"""/api/v1/images/: list, show, download."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import FileResponse
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request

from cloudctl.identity.authentication import is_service
from cloudctl.images.models import Image, ImageStatus
from cloudctl.images.services import image_path, images_visible_to


class ImageSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.name", default=None, read_only=True)

    class Meta:
        model = Image
        fields = ("id", "name", "status", "disk_format", "container_format", "size",
                  "virtual_size", "sha256", "min_ram", "min_disk", "visibility", "owner",
                  "properties", "created", "updated")
        read_only_fields = fields


class ImageViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = ImageSerializer
    service_actions = ("file",)  # compute workers download images, and do nothing else

    def get_queryset(self) -> QuerySet[Image]:
        if is_service(self.request.user):
            return Image.objects.filter(status=ImageStatus.ACTIVE)
        return images_visible_to(self.request.user).select_related("owner")

    @action(detail=True, methods=["get"], url_path="file")
    def file(self, request: Request, pk: str | None = None) -> FileResponse:
        image = self.get_object()
        path = image_path(image)
        if image.status != ImageStatus.ACTIVE or not path.exists():
            raise NotFound(f"image {image.id} has no data (status {image.status})")
        response = FileResponse(open(path, "rb"), content_type="application/octet-stream")
        response["Content-Length"] = str(path.stat().st_size)
        response["X-Image-Sha256"] = image.sha256
        return response
