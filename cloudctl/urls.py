"""URL map: the REST API under /api/v1/ and the Django admin under /admin/."""

from django.contrib import admin
from django.urls import include, path
from rest_framework.routers import SimpleRouter

from cloudctl.compute.api import (
    AggregateViewSet,
    AvailabilityZoneView,
    FlavorViewSet,
    HostViewSet,
    ServerGroupViewSet,
    ServerViewSet,
)
from cloudctl.identity.api import TokenView
from cloudctl.images.api import ImageViewSet

router = SimpleRouter()
router.trailing_slash = "/?"  # /images/<id>/file and /images/<id>/file/ both work
router.register("servers", ServerViewSet, basename="server")
router.register("flavors", FlavorViewSet, basename="flavor")
router.register("images", ImageViewSet, basename="image")
router.register("hosts", HostViewSet, basename="host")
router.register("server-groups", ServerGroupViewSet, basename="server-group")
router.register("availability-zones", AvailabilityZoneView, basename="availability-zone")
router.register("aggregates", AggregateViewSet, basename="aggregate")

urlpatterns = [
    path("api/v1/auth/token/", TokenView.as_view(), name="auth-token"),
    path("api/v1/", include(router.urls)),
    path("admin/", admin.site.urls),
]
