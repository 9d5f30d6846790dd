"""/api/v1/hosts/, /api/v1/availability-zones/, /api/v1/aggregates/ (administrators, zones for all)."""

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
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from cloudctl.api import error_responses, paginated
from cloudctl.compute import evacuation, migration_requests, selectors, services
from cloudctl.compute.api.common import (
    ALLOW_DATA_LOSS_HELP,
    BlockMigrationField,
    StrictBooleanField,
    StrictCharField,
)
from cloudctl.compute.models import (
    Aggregate,
    Host,
)
from cloudctl.identity.permissions import IsCloudAdmin
from cloudctl.identity.services import is_admin


class HostSerializer(serializers.ModelSerializer):
    state = serializers.SerializerMethodField()
    availability_zone = serializers.CharField(source="zone")
    vcpus_used = serializers.IntegerField()
    memory_mb_used = serializers.IntegerField()
    disk_gb_used = serializers.IntegerField()
    instance_count = serializers.IntegerField()

    class Meta:
        model = Host
        fields = ("name", "state", "enabled", "disabled_reason", "availability_zone",
                  "vcpus", "vcpus_used", "memory_mb", "memory_mb_reserved", "memory_mb_used",
                  "disk_gb", "disk_gb_reserved", "disk_gb_used", "hypervisor_type",
                  "hypervisor_version", "virt_type", "libvirt_uri", "instance_count",
                  "last_heartbeat", "forced_down", "forced_down_reason", "forced_down_at",
                  "fence_message", "storage_id", "cpu_allocation_ratio", "ram_allocation_ratio",
                  "disk_allocation_ratio")
        read_only_fields = fields

    def get_state(self, host: Host) -> str:
        return "up" if host.is_up else "down"


class DisableSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=255, required=False, default="", allow_blank=True)


class HostLiveMigrateServersSerializer(serializers.Serializer):
    block_migration = BlockMigrationField(required=False, default="auto")
    max_servers = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=1, max_value=32767,
        help_text="how many of the host's migrations are checked and moved at once (the others wait "
                  "in status accepted); null: EVACUATION_MAX_SERVERS")


class EvacuationSerializer(serializers.Serializer):
    """One server of a host evacuation: accepted with its migration, or refused with the reason."""

    server = serializers.UUIDField(source="server.uuid")
    name = serializers.CharField(source="server.name")
    accepted = serializers.BooleanField()
    migration_id = serializers.IntegerField(source="migration.pk", default=None, allow_null=True)
    dest_host = serializers.CharField(source="migration.dest_host.name", default=None, allow_null=True,
                                      help_text="null until the pre-flight checks chose it")
    refused = serializers.CharField(help_text="why the server stays (empty when accepted)")


class ForceDownSerializer(serializers.Serializer):
    forced_down = StrictBooleanField(help_text="true: the host is off (down whatever its heartbeats say; its "
                                               "servers may be evacuated); false: clear it")
    reason = StrictCharField(max_length=255, required=False, default="", allow_blank=True)


class HostEvacuateSerializer(serializers.Serializer):
    allow_data_loss = StrictBooleanField(required=False, default=False, help_text=ALLOW_DATA_LOSS_HELP)


class HostDeadEvacuationSerializer(serializers.Serializer):
    host = HostSerializer()
    servers = EvacuationSerializer(many=True)


class HostEvacuationSerializer(serializers.Serializer):
    host = HostSerializer()
    batch = serializers.CharField(help_text="the migrations' batch (GET /migrations/ shows it)")
    max_servers = serializers.IntegerField(help_text="at most this many checked and moving at once")
    servers = EvacuationSerializer(many=True)


HOST_NAME = OpenApiParameter("name", OpenApiTypes.STR, OpenApiParameter.PATH,
                             description="the host's name")


_ADMIN_ERRORS = error_responses(401, 403)


@extend_schema_view(
    list=extend_schema(summary="List the compute hosts with their usage (administrators)",
                       responses={200: HostSerializer(many=True), **_ADMIN_ERRORS}),
    retrieve=extend_schema(summary="Show a compute host (administrators)", parameters=[HOST_NAME],
                           responses={200: HostSerializer, **error_responses(401, 403, 404)}),
)
class HostViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = HostSerializer
    permission_classes = [IsCloudAdmin]
    lookup_field = "name"
    lookup_value_regex = "[^/]+"

    def get_queryset(self) -> QuerySet[Host]:
        return selectors.hosts_with_usage()

    def _shown(self, host: Host) -> Response:
        return Response(self._host_data(host))

    def _host_data(self, host: Host) -> Any:
        """The host as listed: with its usage (the queryset annotates it)."""
        return self.get_serializer(self.get_queryset().get(pk=host.pk)).data

    @extend_schema(summary="Disable a host: the scheduler places no new server on it",
                   parameters=[HOST_NAME], request=DisableSerializer,
                   responses={200: HostSerializer, **error_responses(400, 401, 403, 404)})
    @action(detail=True, methods=["post"])
    def disable(self, request: Request, name: str | None = None) -> Response:
        body = DisableSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return self._shown(services.host_set_enabled(host=self.get_object(), enabled=False,
                                                     reason=body.validated_data["reason"]))

    @extend_schema(summary="Live-migrate every server away from a host (administrators; Nova's "
                           "host-evacuate-live)",
                   description="Disables the host (no new servers land on it; an existing disable reason "
                               "is kept), then accepts a live migration of each of its servers to a host "
                               "the scheduler picks, each with the pre-flight checks of live-migrate, "
                               "throttled: `max_servers` of them are checked and moved at once, the "
                               "others wait in status `accepted` and start as earlier ones end. Per "
                               "server: accepted with its migration (follow it in GET /migrations/; "
                               "`dest_host` is null until checked, a later refusal shows there), or "
                               "refused at once with the reason (a stopped server must be "
                               "cold-migrated).",
                   parameters=[HOST_NAME], request=HostLiveMigrateServersSerializer,
                   responses={202: HostEvacuationSerializer, **error_responses(400, 401, 403, 404)})
    @action(detail=True, methods=["post"], url_path="live-migrate-servers")
    def live_migrate_servers(self, request: Request, name: str | None = None) -> Response:
        body = HostLiveMigrateServersSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        host = self.get_object()
        evacuation = migration_requests.host_live_migrate_servers(
            host=host, user=request.user, block_migration=body.validated_data["block_migration"],
            max_servers=body.validated_data["max_servers"])
        return Response({"host": self._host_data(host), "batch": evacuation.batch,
                         "max_servers": evacuation.max_servers,
                         "servers": EvacuationSerializer(evacuation.servers, many=True).data},
                        status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Force a host down, or clear it (administrators; Nova's service forced_down)",
                   description="`forced_down: true` says the host is off: it is down whatever its heartbeats "
                               "say (no server is scheduled there) and its servers may be evacuated. It "
                               "stays down until an administrator clears it (`forced_down: false`).",
                   parameters=[HOST_NAME], request=ForceDownSerializer,
                   responses={200: HostSerializer, **error_responses(400, 401, 403, 404)})
    @action(detail=True, methods=["post"], url_path="force-down")
    def force_down(self, request: Request, name: str | None = None) -> Response:
        body = ForceDownSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return self._shown(evacuation.host_force_down(host=self.get_object(), user=request.user,
                                                      forced_down=body.validated_data["forced_down"],
                                                      reason=body.validated_data["reason"]))

    @extend_schema(summary="Fence a dead host now with HOST_FENCE_COMMAND (administrators)",
                   description="Runs the command once (HOST_FENCE_TIMEOUT): exit 0 forces the host down "
                               "(reason \"fenced by HOST_FENCE_COMMAND\"). 409 when no command is set, the "
                               "host still heartbeats, or the command failed (what it said is in "
                               "`fence_message`).",
                   parameters=[HOST_NAME], request=None,
                   responses={200: HostSerializer, **error_responses(401, 403, 404, 409)})
    @action(detail=True, methods=["post"])
    def fence(self, request: Request, name: str | None = None) -> Response:
        return self._shown(evacuation.host_fence(host=self.get_object(), user=request.user))

    @extend_schema(summary="Evacuate every server of a dead, fenced host (administrators; Nova's "
                           "host-evacuate)",
                   description="Each server is rebuilt on a host the scheduler picks, as POST "
                               "/servers/{id}/evacuate/ does: accepted with its migration (type "
                               "`evacuation`, status `rebuilding`), or refused with the reason; the "
                               "others go on. 409 when the host is up or not fenced.",
                   parameters=[HOST_NAME], request=HostEvacuateSerializer,
                   responses={202: HostDeadEvacuationSerializer, **error_responses(400, 401, 403, 404, 409)})
    @action(detail=True, methods=["post"])
    def evacuate(self, request: Request, name: str | None = None) -> Response:
        body = HostEvacuateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        host = self.get_object()
        servers = evacuation.host_evacuate_servers(host=host, user=request.user,
                                                   allow_data_loss=body.validated_data["allow_data_loss"])
        return Response({"host": self._host_data(host),
                         "servers": EvacuationSerializer(servers, many=True).data},
                        status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Enable a host again", parameters=[HOST_NAME], request=None,
                   responses={200: HostSerializer, **error_responses(401, 403, 404)})
    @action(detail=True, methods=["post"])
    def enable(self, request: Request, name: str | None = None) -> Response:
        return self._shown(services.host_set_enabled(host=self.get_object(), enabled=True))


class AvailabilityZoneSerializer(serializers.Serializer):
    """Documentation only: one availability zone."""

    name = serializers.CharField()
    available = serializers.BooleanField(help_text="some host of the zone is up and enabled")
    hosts = serializers.ListField(child=serializers.CharField(), required=False,
                                  help_text="the zone's hosts; shown to administrators only")


class AvailabilityZoneView(viewsets.GenericViewSet):
    """Zones; administrators also see each zone's hosts."""

    pagination_marker_field = "name"

    @extend_schema(summary="List the availability zones",
                   responses={200: AvailabilityZoneSerializer(many=True),
                              **error_responses(401, 403)})
    def list(self, request: Request) -> Response:
        zones = selectors.availability_zones()
        admin = is_admin(request.user)
        return paginated(self, [
            {"name": name, "available": any(h.is_up and h.enabled for h in hosts),
             **({"hosts": [h.name for h in hosts]} if admin else {})}
            for name, hosts in sorted(zones.items())], lambda page: page)


class AggregateSerializer(serializers.ModelSerializer):
    name = StrictCharField(max_length=255)
    availability_zone = StrictCharField(max_length=255, required=False, allow_blank=True)
    hosts = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = Aggregate
        fields = ("id", "name", "availability_zone", "metadata", "hosts", "created")
        read_only_fields = ("id", "hosts", "created")

    def validate_name(self, value: str) -> str:
        # The field is declared (StrictCharField), so ModelSerializer adds no UniqueValidator of its own:
        # without this a second aggregate of the same name was an IntegrityError, a 500.
        others = Aggregate.objects.filter(name=value)
        if self.instance is not None:
            others = others.exclude(pk=self.instance.pk)
        if others.exists():
            raise serializers.ValidationError(f"an aggregate named {value!r} already exists")
        return value

    def validate_metadata(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be an object of key: value")
        return value


class HostRefSerializer(serializers.Serializer):
    host = StrictCharField(max_length=255)


AGGREGATE_ID = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH,
                                description="the aggregate's id")


@extend_schema_view(
    list=extend_schema(summary="List the host aggregates (administrators)",
                       responses={200: AggregateSerializer(many=True), **_ADMIN_ERRORS}),
    retrieve=extend_schema(summary="Show a host aggregate", parameters=[AGGREGATE_ID],
                           responses={200: AggregateSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Create a host aggregate",
                         responses={201: AggregateSerializer, **error_responses(400, 401, 403)}),
    update=extend_schema(summary="Replace a host aggregate's name, zone and metadata",
                         parameters=[AGGREGATE_ID],
                         responses={200: AggregateSerializer,
                                    **error_responses(400, 401, 403, 404)}),
    partial_update=extend_schema(summary="Change some of a host aggregate's fields",
                                 parameters=[AGGREGATE_ID],
                                 responses={200: AggregateSerializer,
                                            **error_responses(400, 401, 403, 404)}),
    destroy=extend_schema(summary="Delete a host aggregate", parameters=[AGGREGATE_ID],
                          responses={204: OpenApiResponse(description="Deleted"),
                                     **error_responses(401, 403, 404)}),
)
class AggregateViewSet(viewsets.ModelViewSet):
    serializer_class = AggregateSerializer
    permission_classes = [IsCloudAdmin]
    queryset = Aggregate.objects.prefetch_related("hosts")
    http_method_names = ["get", "post", "put", "patch", "delete", "head", "options"]

    def perform_update(self, serializer: AggregateSerializer) -> None:
        serializer.instance = services.aggregate_update(aggregate=serializer.instance,
                                                        **serializer.validated_data)

    def _host(self, request: Request) -> Host:
        body = HostRefSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        host = Host.objects.filter(name=body.validated_data["host"]).first()
        if host is None:
            raise serializers.ValidationError({"host": [f"no host {body.validated_data['host']!r}"]})
        return host

    @extend_schema(summary="Add a host to the aggregate", parameters=[AGGREGATE_ID],
                   request=HostRefSerializer,
                   responses={200: AggregateSerializer, **error_responses(400, 401, 403, 404)})
    @action(detail=True, methods=["post"], url_path="add-host")
    def add_host(self, request: Request, pk: str | None = None) -> Response:
        aggregate = services.aggregate_add_host(aggregate=self.get_object(),
                                                host=self._host(request))
        return Response(self.get_serializer(aggregate).data)

    @extend_schema(summary="Remove a host from the aggregate", parameters=[AGGREGATE_ID],
                   request=HostRefSerializer,
                   responses={200: AggregateSerializer, **error_responses(400, 401, 403, 404)})
    @action(detail=True, methods=["post"], url_path="remove-host")
    def remove_host(self, request: Request, pk: str | None = None) -> Response:
        aggregate = services.aggregate_remove_host(aggregate=self.get_object(),
                                                   host=self._host(request))
        return Response(self.get_serializer(aggregate).data)
