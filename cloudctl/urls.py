"""URL map: the REST API under /api/v1/ (with its OpenAPI schema and Swagger UI) and the Django
admin under /admin/."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from cloudctl.compute.api.flavors import FlavorViewSet
from cloudctl.compute.api.hosts import AggregateViewSet, AvailabilityZoneView, HostViewSet
from cloudctl.compute.api.migrations import MigrationViewSet
from cloudctl.compute.api.servers import ServerGroupViewSet, ServerViewSet
from cloudctl.compute.dashboard import capacity_dashboard
from cloudctl.identity.admin import throttled_admin_login
from cloudctl.identity.api import ProjectViewSet, TokenView, UserViewSet
from cloudctl.images.api import ImageViewSet
from cloudctl.network.api import (
    NetworkViewSet,
    PortViewSet,
    SecurityGroupRuleViewSet,
    SecurityGroupViewSet,
    SubnetViewSet,
)
from cloudctl.network.l3_api import FloatingIPViewSet, RouterViewSet
from cloudctl.quotas.api import LimitsView, QuotaView

router = SimpleRouter()
router.trailing_slash = "/?"  # /images/<id>/file and /images/<id>/file/ both work
router.register("servers", ServerViewSet, basename="server")
router.register("flavors", FlavorViewSet, basename="flavor")
router.register("images", ImageViewSet, basename="image")
router.register("hosts", HostViewSet, basename="host")
router.register("server-groups", ServerGroupViewSet, basename="server-group")
router.register("availability-zones", AvailabilityZoneView, basename="availability-zone")
router.register("aggregates", AggregateViewSet, basename="aggregate")
router.register("migrations", MigrationViewSet, basename="migration")
router.register("networks", NetworkViewSet, basename="network")
router.register("subnets", SubnetViewSet, basename="subnet")
router.register("ports", PortViewSet, basename="port")
router.register("security-groups", SecurityGroupViewSet, basename="security-group")
router.register("security-group-rules", SecurityGroupRuleViewSet, basename="security-group-rule")
router.register("routers", RouterViewSet, basename="router")
router.register("floating-ips", FloatingIPViewSet, basename="floating-ip")
router.register("projects", ProjectViewSet, basename="project")
router.register("users", UserViewSet, basename="user")

# JSON errors under /api/ even where no DRF view answers (a path that matches no pattern); the admin's
# HTML pages elsewhere.
handler400 = "cloudctl.api.bad_request"
handler403 = "cloudctl.api.permission_denied"
handler404 = "cloudctl.api.not_found"
handler500 = "cloudctl.api.server_error"

urlpatterns = [
    path("api/v1/auth/token/", TokenView.as_view(), name="auth-token"),
    # Readable without a token, like Nova's published API reference (SPECTACULAR_SETTINGS).
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/v1/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/v1/quotas/<str:project>/", QuotaView.as_view(), name="quotas"),
    path("api/v1/limits/", LimitsView.as_view(), name="limits"),
    path("api/v1/", include(router.urls)),
    path("admin/dashboard/", capacity_dashboard, name="capacity-dashboard"),
    # The admin site's login, counted and throttled as POST /api/v1/auth/token/ (before admin.site.urls,
    # so that it answers /admin/login/).
    path("admin/login/", throttled_admin_login, name="admin-login-throttled"),
    path("admin/", admin.site.urls),
]
