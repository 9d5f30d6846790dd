"""/api/v1/flavors/: every user reads (with a token), administrators create and delete."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, serializers, viewsets
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from cloudctl.api import error_responses
from cloudctl.compute import selectors, services
from cloudctl.compute.api.common import StrictCharField
from cloudctl.compute.models import (
    Flavor,
)
from cloudctl.identity.permissions import IsAuthenticatedUser
from cloudctl.identity.services import is_admin


class IsAdminOrReadOnly(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return request.method in ("GET", "HEAD", "OPTIONS") or is_admin(request.user)


class FlavorSerializer(serializers.ModelSerializer):
    name = StrictCharField(max_length=64)
    vcpus = serializers.IntegerField(min_value=1, max_value=1024)
    memory_mb = serializers.IntegerField(min_value=16, max_value=16 * 1024 * 1024)
    root_gb = serializers.IntegerField(min_value=0, max_value=1024 * 1024)

    class Meta:
        model = Flavor
        fields = ("id", "name", "vcpus", "memory_mb", "root_gb", "is_public", "extra_specs")

    def validate_name(self, value: str) -> str:
        if Flavor.objects.filter(name=value).exists():
            raise serializers.ValidationError(f"a flavor named {value!r} already exists")
        return value


FLAVOR_ID = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH,
                              description="the flavor's id")


@extend_schema_view(
    list=extend_schema(summary="List the flavors",
                       responses={200: FlavorSerializer(many=True), **error_responses(401, 403)}),
    retrieve=extend_schema(summary="Show a flavor", parameters=[FLAVOR_ID],
                           responses={200: FlavorSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Create a flavor (administrators)",
                         responses={201: FlavorSerializer, **error_responses(400, 401, 403)}),
    destroy=extend_schema(
        summary="Delete a flavor (administrators); one servers were built from is only disabled",
        parameters=[FLAVOR_ID],
        responses={204: OpenApiResponse(description="Deleted (or disabled)"),
                   **error_responses(401, 403, 404)}),
)
class FlavorViewSet(mixins.CreateModelMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                    mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = FlavorSerializer
    permission_classes = [IsAuthenticatedUser, IsAdminOrReadOnly]

    def get_queryset(self) -> QuerySet[Flavor]:
        return selectors.flavors_visible_to(self.request.user)

    def perform_destroy(self, instance: Flavor) -> None:
        services.flavor_delete(flavor=instance)
