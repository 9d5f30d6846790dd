"""/api/v1/images/: list, show, download."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.db.models import QuerySet
from django.http import FileResponse, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from cloudctl.api import ImageConflictSerializer, error_responses
from cloudctl.identity.authentication import is_service
from cloudctl.identity.services import is_admin, project_id_of, project_of
from cloudctl.images.models import DiskFormat, Image, ImageStatus, Visibility
from cloudctl.images.services import (
    image_create,
    image_delete,
    image_path,
    image_upload,
    images_visible_to,
)


class ImageSerializer(serializers.ModelSerializer):
    # Public images have no owner project: null.
    owner = serializers.CharField(source="owner.name", default=None, read_only=True, allow_null=True)

    class Meta:
        model = Image
        fields = ("id", "name", "status", "disk_format", "container_format", "size",
                  "virtual_size", "sha256", "min_ram", "min_disk", "visibility", "owner",
                  "properties", "created", "updated")
        read_only_fields = fields


class ImageCreateSerializer(serializers.ModelSerializer):
    name = serializers.CharField(max_length=255)
    disk_format = serializers.ChoiceField(choices=DiskFormat.choices)
    container_format = serializers.ChoiceField(choices=["bare"], default="bare")
    visibility = serializers.ChoiceField(choices=Visibility.choices, default=Visibility.PRIVATE)
    # The model's PositiveIntegerField: at most 2**31 - 1 on PostgreSQL (beyond: a DataError, a 500).
    min_ram = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)
    min_disk = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)
    properties = serializers.DictField(child=serializers.CharField(allow_blank=True),
                                       required=False, default=dict)

    class Meta:
        model = Image
        fields = ("name", "disk_format", "container_format", "visibility", "min_ram", "min_disk",
                  "properties")

    def validate_visibility(self, value: str) -> str:
        if value == Visibility.PUBLIC and not is_admin(self.context["request"].user):
            raise serializers.ValidationError("only administrators may create public images")
        return value


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) of a single ``Range: bytes=a-b`` header; None when it cannot be served."""
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None
    if match.group(1):
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else size - 1
    else:
        first, last = max(size - int(match.group(2)), 0), size - 1
    last = min(last, size - 1)
    return (first, last) if first <= last and first < size else None


def _file_slice(path: Path, first: int, last: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(first)
        remaining = last - first + 1
        while remaining > 0:
            chunk = handle.read(min(1024 * 1024, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


IMAGE_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH,
                            description="the image's id")
_OCTETS = "application/octet-stream"
_BYTES = {_OCTETS: OpenApiTypes.BINARY}


@extend_schema_view(
    list=extend_schema(summary="List the images visible to you",
                       responses={200: ImageSerializer(many=True), **error_responses(401, 403)}),
    retrieve=extend_schema(summary="Show an image", parameters=[IMAGE_ID],
                           responses={200: ImageSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(
        summary="Create an image record (status queued); then PUT its data to .../file",
        request=ImageCreateSerializer,
        responses={201: ImageSerializer, **error_responses(400, 401, 403)}),
    destroy=extend_schema(
        summary="Delete an image (its project or an administrator)", parameters=[IMAGE_ID],
        responses={204: OpenApiResponse(description="Deleted: the record stays, status deleted"),
                   **error_responses(401, 403, 404)}),
)
class ImageViewSet(mixins.CreateModelMixin, mixins.DestroyModelMixin,
                   viewsets.ReadOnlyModelViewSet):
    serializer_class = ImageSerializer
    # Compute workers download images and upload snapshots, and do nothing else.
    service_actions = ("file",)

    def get_queryset(self) -> QuerySet[Image]:
        if is_service(self.request.user):
            return Image.objects.exclude(status=ImageStatus.DELETED)
        return images_visible_to(self.request.user).select_related("owner")

    def _check_owner(self, image: Image) -> None:
        user = self.request.user
        if is_service(user) or is_admin(user):
            return
        if image.owner_id is None or image.owner_id != project_id_of(user):
            raise PermissionDenied("only the image's project or an administrator may change it")

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        body = ImageCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        image = image_create(owner=project_of(request.user), **body.validated_data)
        return Response(ImageSerializer(image).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: Image) -> None:
        self._check_owner(instance)
        image_delete(image=instance)

    @extend_schema(
        methods=["GET"],
        summary="Download the image's data (a single Range is honoured)",
        parameters=[IMAGE_ID, OpenApiParameter(
            "Range", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
            description="one byte range, e.g. `bytes=0-511`, `bytes=512-` or `bytes=-512`"),
            OpenApiParameter("Accept-Ranges", OpenApiTypes.STR, OpenApiParameter.HEADER,
                             response=[200, 206], description="`bytes`"),
            OpenApiParameter("Content-Range", OpenApiTypes.STR, OpenApiParameter.HEADER,
                             response=[206, 416],
                             description="`bytes <first>-<last>/<size>`; on 416 `bytes */<size>`"),
            OpenApiParameter("X-Image-Sha256", OpenApiTypes.STR, OpenApiParameter.HEADER,
                             response=[200], description="SHA-256 of the whole image (hex)")],
        responses={
            (200, _OCTETS): OpenApiResponse(OpenApiTypes.BINARY, description="The whole image"),
            (206, _OCTETS): OpenApiResponse(OpenApiTypes.BINARY, description="The requested range"),
            416: OpenApiResponse(description="The range cannot be served (empty body)"),
            **error_responses(401, 403),
            404: OpenApiResponse(error_responses(404)[404].response,
                                 description="No such image, or it has no data (not active)"),
        })
    @extend_schema(
        methods=["PUT"],
        summary="Upload the data of a queued image (raw bytes, streamed; inspected, then active)",
        parameters=[IMAGE_ID], request=_BYTES,
        responses={
            200: ImageSerializer,
            400: OpenApiResponse(error_responses(400)[400].response,
                                 description="Rejected data, under `file` (not a readable disk "
                                             "image of the declared format, truncated, empty, ...)"),
            409: OpenApiResponse(ImageConflictSerializer,
                                 description="The image is not queued (its data is already there)"),
            **error_responses(401, 403, 404),
        })
    @action(detail=True, methods=["get", "put"], url_path="file")
    def file(self, request: Request, pk: str | None = None) -> HttpResponseBase:
        image = self.get_object()
        if request.method == "PUT":
            return self._upload(request, image)
        path = image_path(image)
        if image.status != ImageStatus.ACTIVE or path is None:
            raise NotFound(f"image {image.id} has no data (status {image.status})")
        size = path.stat().st_size
        wanted = request.headers.get("Range")
        if wanted:
            span = _byte_range(wanted, size)
            if span is None:
                response = HttpResponse(status=416)
                response["Content-Range"] = f"bytes */{size}"
                return response
            first, last = span
            partial = StreamingHttpResponse(_file_slice(path, first, last), status=206,
                                            content_type="application/octet-stream")
            partial["Content-Range"] = f"bytes {first}-{last}/{size}"
            partial["Content-Length"] = str(last - first + 1)
            partial["Accept-Ranges"] = "bytes"
            return partial
        response = FileResponse(open(path, "rb"), content_type="application/octet-stream")
        response["Content-Length"] = str(size)
        response["Accept-Ranges"] = "bytes"
        response["X-Image-Sha256"] = image.sha256
        return response

    def _upload(self, request: Request, image: Image) -> Response:
        """PUT the bytes: read from the request stream chunk by chunk, never whole."""
        self._check_owner(image)
        length = request.META.get("CONTENT_LENGTH")
        expected = int(length) if length and length.isdigit() else None
        image = image_upload(image=image, stream=request._request, expected_size=expected)
        return Response(ImageSerializer(image).data)
