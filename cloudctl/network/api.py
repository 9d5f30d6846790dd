"""/api/v1/networks/, subnets/, ports/, security-groups/, security-group-rules/: parse, call one
service, render (routers/ and floating-ips/: :mod:`cloudctl.network.l3_api`). Objects of another
project are 404 (the querysets are the selectors' scoping); a shared or external network is visible to
all but changed only by its project or an administrator."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from cloudctl.api import (
    ErrorSerializer,
    IdOrNameField,
    StrictCharField,
    StrictSerializer,
    error_responses,
    lookup,
    paginated,
)
from cloudctl.identity.services import is_admin, project_id_of, project_of
from cloudctl.network import selectors, services
from cloudctl.network.models import (
    Direction,
    Network,
    Port,
    Protocol,
    ProviderType,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
)

# --- shared ----------------------------------------------------------------------------------------


class AdminOnlyFieldsMixin:
    """400 naming the field when a non-administrator sends one of ``admin_only`` (whatever its
    value): external, provider_type, segmentation_id."""

    admin_only: tuple[str, ...] = ()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        request = self.context["request"]  # type: ignore[attr-defined]
        if not is_admin(request.user):
            refused = {key: ["only administrators may set this field"]
                       for key in self.admin_only if key in self.initial_data}  # type: ignore[attr-defined]
            if refused:
                raise serializers.ValidationError(refused)
        return attrs


class NetworkConflictSerializer(ErrorSerializer):
    """409: what blocks the request; ``port`` holds the requested address, ``ports`` block a
    deletion."""

    code = serializers.ChoiceField(choices=["conflict", "ip_address_in_use", "ip_address_exhausted",
                                            "mac_address_in_use", "segmentation_id_exhausted",
                                            "segmentation_id_in_use", "in_use", "subnet_in_use",
                                            "floating_ip_in_use", "external_network_unreachable"])
    port = serializers.UUIDField(required=False)
    ports = serializers.ListField(child=serializers.UUIDField(), required=False)
    router = serializers.UUIDField(required=False, help_text="the router a subnet is on already")
    floating_ips = serializers.ListField(child=serializers.UUIDField(), required=False,
                                         help_text="floating IPs mapped through a router")
    floating_ip = serializers.UUIDField(required=False, help_text="the floating IP of a fixed IP")


CONFLICT = {409: OpenApiResponse(NetworkConflictSerializer,
                                 description="In use, exhausted, or already there (the body says which)")}


def _id_param(kind: str) -> OpenApiParameter:
    return OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH,
                            description=f"the {kind}'s id")


def _filter(name: str, kind: Any, description: str) -> OpenApiParameter:
    return OpenApiParameter(name, kind, OpenApiParameter.QUERY, required=False,
                            description=description)


NAME_FILTER = _filter("name", OpenApiTypes.STR, "only those with this name")
NETWORK_FILTER = _filter("network", OpenApiTypes.UUID, "only those of this network")
UUID_REGEX = "[0-9a-fA-F-]{36}"


def _uuid_query(request: Request, name: str) -> uuid.UUID | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise serializers.ValidationError({name: [f"{raw!r} is not an id"]}) from None


def _filtered(queryset: QuerySet[Any], request: Request, *, network: bool = False,
              device_id: bool = False) -> QuerySet[Any]:
    name = request.query_params.get("name")
    if name is not None:
        queryset = queryset.filter(name=name)
    if network:
        network_id = _uuid_query(request, "network")
        if network_id is not None:
            queryset = queryset.filter(network_id=network_id)
    if device_id and request.query_params.get("device_id") is not None:
        queryset = queryset.filter(device_id=request.query_params["device_id"])
    return queryset


class ScopedViewSet(viewsets.GenericViewSet):
    """Create answers 201 with the object as listed; list, retrieve; the subclass's ``perform_*``
    call the services."""

    lookup_value_regex = UUID_REGEX

    def _shown(self, obj: Any, code: int = status.HTTP_200_OK) -> Response:
        obj = self.get_queryset().get(pk=obj.pk)
        return Response(self.get_serializer(obj).data, status=code)

    def list(self, request: Request) -> Response:
        return paginated(self, self.filter_queryset(self.get_queryset()),
                         lambda page: self.get_serializer(page, many=True).data)

    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(self.get_serializer(self.get_object()).data)


# --- networks --------------------------------------------------------------------------------------


class NetworkSerializer(serializers.ModelSerializer):
    project = serializers.CharField(source="project.name", read_only=True)
    subnets = serializers.SerializerMethodField()

    class Meta:
        model = Network
        fields = ("id", "name", "project", "shared", "external", "provider_type", "segmentation_id",
                  "mtu", "admin_state_up", "status", "subnets", "created", "updated")
        read_only_fields = fields

    def get_subnets(self, network: Network) -> list[uuid.UUID]:
        return [s.id for s in network.subnets.all()]


class NetworkCreateSerializer(AdminOnlyFieldsMixin, StrictSerializer):
    admin_only = ("external", "provider_type", "segmentation_id")

    name = StrictCharField(max_length=255, required=False, allow_blank=True, default="")
    shared = serializers.BooleanField(required=False, default=False)
    admin_state_up = serializers.BooleanField(required=False, default=True)
    mtu = serializers.IntegerField(required=False, help_text="default: the largest the type carries "
                                   "(vxlan: NETWORK_PHYSICAL_MTU - 50)")
    external = serializers.BooleanField(required=False, help_text="administrators only")
    provider_type = serializers.ChoiceField(choices=ProviderType.choices, required=False,
                                            help_text="administrators only; default vxlan")
    segmentation_id = serializers.IntegerField(required=False, help_text="administrators only; the "
                                               "VXLAN VNI (default: the lowest free of NETWORK_VNI_RANGE)")


class NetworkUpdateSerializer(AdminOnlyFieldsMixin, StrictSerializer):
    admin_only = ("external",)
    unchangeable = ("id", "project", "provider_type", "segmentation_id", "status", "subnets")

    name = StrictCharField(max_length=255, required=False, allow_blank=True)
    shared = serializers.BooleanField(required=False)
    admin_state_up = serializers.BooleanField(required=False)
    mtu = serializers.IntegerField(required=False)
    external = serializers.BooleanField(required=False, help_text="administrators only")


@extend_schema_view(
    list=extend_schema(summary="List the networks visible to you (your project's, shared, external)",
                       parameters=[NAME_FILTER],
                       responses={200: NetworkSerializer(many=True), **error_responses(400, 401, 403)}),
    retrieve=extend_schema(summary="Show a network", parameters=[_id_param("network")],
                           responses={200: NetworkSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Create a network in your project", request=NetworkCreateSerializer,
                         responses={201: NetworkSerializer, **error_responses(400, 401, 403),
                                    **CONFLICT}),
    partial_update=extend_schema(summary="Change a network's name, shared, mtu, admin_state_up "
                                         "(external: administrators)",
                                 parameters=[_id_param("network")], request=NetworkUpdateSerializer,
                                 responses={200: NetworkSerializer,
                                            **error_responses(400, 401, 403, 404)}),
    destroy=extend_schema(summary="Delete a network with its subnets (409 while ports other than its "
                                  "DHCP ports are on it)", parameters=[_id_param("network")],
                          responses={204: OpenApiResponse(description="Deleted"),
                                     **error_responses(401, 403, 404), **CONFLICT}),
)
class NetworkViewSet(ScopedViewSet):
    serializer_class = NetworkSerializer

    def get_queryset(self) -> QuerySet[Network]:
        return selectors.networks_visible_to(self.request.user).prefetch_related("subnets")

    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return _filtered(queryset, self.request)

    def create(self, request: Request) -> Response:
        body = NetworkCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        network = services.network_create(user=request.user, project=project_of(request.user),
                                          **body.validated_data)
        return self._shown(network, status.HTTP_201_CREATED)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        network = self.get_object()
        body = NetworkUpdateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        return self._shown(services.network_update(network=network, user=request.user,
                                                   **body.validated_data))

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        services.network_delete(network=self.get_object(), user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- subnets ---------------------------------------------------------------------------------------


class PoolSerializer(serializers.Serializer):
    start = serializers.IPAddressField(protocol="IPv4")
    end = serializers.IPAddressField(protocol="IPv4")


class SubnetSerializer(serializers.ModelSerializer):
    network = serializers.UUIDField(source="network_id", read_only=True)
    allocation_pools = PoolSerializer(many=True, read_only=True)
    dns_nameservers = serializers.ListField(child=serializers.IPAddressField(), read_only=True)

    class Meta:
        model = Subnet
        fields = ("id", "name", "network", "ip_version", "cidr", "gateway_ip", "allocation_pools",
                  "dns_nameservers", "enable_dhcp", "created", "updated")
        read_only_fields = fields


class SubnetCreateSerializer(StrictSerializer):
    network = IdOrNameField()
    name = StrictCharField(max_length=255, required=False, allow_blank=True, default="")
    cidr = StrictCharField(max_length=64, help_text="IPv4 only for now, e.g. 10.0.0.0/24")
    gateway_ip = serializers.IPAddressField(protocol="IPv4", required=False, allow_null=True,
                                            help_text="default: the first host address; null: no "
                                                      "gateway")
    allocation_pools = PoolSerializer(many=True, required=False,
                                      help_text="default: the host addresses minus the gateway")
    dns_nameservers = serializers.ListField(child=serializers.IPAddressField(protocol="IPv4"),
                                            required=False, default=list)
    enable_dhcp = serializers.BooleanField(required=False, default=True)

    def validate_network(self, ref: str) -> Network:
        return lookup(selectors.networks_visible_to(self.context["request"].user), ref,
                      kind="network", id_kind=uuid.UUID)


class SubnetUpdateSerializer(StrictSerializer):
    unchangeable = ("id", "network", "ip_version", "cidr", "gateway_ip", "allocation_pools")

    name = StrictCharField(max_length=255, required=False, allow_blank=True)
    dns_nameservers = serializers.ListField(child=serializers.IPAddressField(protocol="IPv4"),
                                            required=False)
    enable_dhcp = serializers.BooleanField(required=False)


@extend_schema_view(
    list=extend_schema(summary="List the subnets of the networks visible to you",
                       parameters=[NETWORK_FILTER, NAME_FILTER],
                       responses={200: SubnetSerializer(many=True), **error_responses(400, 401, 403)}),
    retrieve=extend_schema(summary="Show a subnet", parameters=[_id_param("subnet")],
                           responses={200: SubnetSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Create an IPv4 subnet on a network of your project",
                         request=SubnetCreateSerializer,
                         responses={201: SubnetSerializer, **error_responses(400, 401, 403)}),
    partial_update=extend_schema(summary="Change a subnet's name, dns_nameservers, enable_dhcp",
                                 parameters=[_id_param("subnet")], request=SubnetUpdateSerializer,
                                 responses={200: SubnetSerializer,
                                            **error_responses(400, 401, 403, 404)}),
    destroy=extend_schema(summary="Delete a subnet (409 while ports hold addresses in it)",
                          parameters=[_id_param("subnet")],
                          responses={204: OpenApiResponse(description="Deleted"),
                                     **error_responses(401, 403, 404), **CONFLICT}),
)
class SubnetViewSet(ScopedViewSet):
    serializer_class = SubnetSerializer

    def get_queryset(self) -> QuerySet[Subnet]:
        return selectors.subnets_visible_to(self.request.user)

    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return _filtered(queryset, self.request, network=True)

    def create(self, request: Request) -> Response:
        body = SubnetCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        if "gateway_ip" not in data:
            data["gateway_ip"] = services.AUTO
        subnet = services.subnet_create(user=request.user, **data)
        return self._shown(subnet, status.HTTP_201_CREATED)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        subnet = self.get_object()
        body = SubnetUpdateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        return self._shown(services.subnet_update(subnet=subnet, user=request.user, **body.validated_data))

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        services.subnet_delete(subnet=self.get_object(), user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- ports -----------------------------------------------------------------------------------------


class FixedIPSerializer(serializers.Serializer):
    subnet = serializers.UUIDField(source="subnet_id")
    ip_address = serializers.IPAddressField()


class FixedIPRequestSerializer(StrictSerializer):
    subnet = IdOrNameField(required=False)
    ip_address = serializers.IPAddressField(protocol="IPv4", required=False)

    def validate_subnet(self, ref: str) -> Subnet:
        return lookup(selectors.subnets_visible_to(self.context["request"].user), ref,
                      kind="subnet", id_kind=uuid.UUID)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if not attrs:
            raise serializers.ValidationError("give a subnet, an ip_address, or both")
        return attrs


class PortSerializer(serializers.ModelSerializer):
    network = serializers.UUIDField(source="network_id", read_only=True)
    project = serializers.CharField(source="project.name", read_only=True)
    fixed_ips = FixedIPSerializer(many=True, read_only=True)
    security_groups = serializers.PrimaryKeyRelatedField(many=True, read_only=True,
                                                         pk_field=serializers.UUIDField())
    # Neutron's binding:host_id: the hypervisor's name, for administrators only.
    binding_host = serializers.SerializerMethodField(
        help_text="the host the port is bound to: administrators only (empty for the others)")

    class Meta:
        model = Port
        fields = ("id", "name", "network", "project", "mac_address", "fixed_ips", "security_groups",
                  "port_security_enabled", "device_id", "device_owner", "binding_host", "status",
                  "admin_state_up", "created", "updated")
        read_only_fields = fields

    def get_binding_host(self, port: Port) -> str:
        request = self.context.get("request")
        return port.binding_host if request is not None and is_admin(request.user) else ""


class SecurityGroupRefs(serializers.ListField):
    child = IdOrNameField()


def _groups(serializer: serializers.Serializer, refs: list[str]) -> list[SecurityGroup]:
    visible = selectors.security_groups_visible_to(serializer.context["request"].user)
    return [lookup(visible, ref, kind="security group", id_kind=uuid.UUID) for ref in refs]


class PortCreateSerializer(StrictSerializer):
    network = IdOrNameField()
    name = StrictCharField(max_length=255, required=False, allow_blank=True, default="")
    fixed_ips = FixedIPRequestSerializer(many=True, required=False, help_text=(
        '[{"subnet": id, "ip_address"?: "…"}] or [{"ip_address": "…"}]; absent: the next free '
        "address of the network's first subnet with one; []: no address"))
    mac_address = StrictCharField(max_length=17, required=False, help_text="default: fa:16:3e:xx:xx:xx")
    security_groups = SecurityGroupRefs(required=False,
                                        help_text="ids or names; default: your project's default group")
    device_id = StrictCharField(max_length=255, required=False, allow_blank=True, default="")
    device_owner = StrictCharField(max_length=255, required=False, allow_blank=True, default="",
                                   help_text='e.g. "compute:nova"; network:* are set by cloudctl')
    admin_state_up = serializers.BooleanField(required=False, default=True)
    port_security_enabled = serializers.BooleanField(
        required=False, default=True,
        help_text="false: no filtering nor anti-spoofing, and no security groups (400 with them)")

    def validate_network(self, ref: str) -> Network:
        return lookup(selectors.networks_visible_to(self.context["request"].user), ref,
                      kind="network", id_kind=uuid.UUID)

    def validate_security_groups(self, refs: list[str]) -> list[SecurityGroup]:
        return _groups(self, refs)

    def service_arguments(self) -> dict[str, Any]:
        data = dict(self.validated_data)
        if "fixed_ips" in data:
            data["fixed_ips"] = [services.FixedIPRequest(subnet=entry.get("subnet"),
                                                         ip_address=entry.get("ip_address"))
                                 for entry in data["fixed_ips"]]
        return data


class PortUpdateSerializer(StrictSerializer):
    unchangeable = ("id", "network", "project", "mac_address", "fixed_ips", "device_id",
                    "device_owner", "binding_host", "status")

    name = StrictCharField(max_length=255, required=False, allow_blank=True)
    security_groups = SecurityGroupRefs(required=False)
    admin_state_up = serializers.BooleanField(required=False)
    port_security_enabled = serializers.BooleanField(
        required=False,
        help_text='false while the port has security groups is 409: send "security_groups": [] with it')

    def validate_security_groups(self, refs: list[str]) -> list[SecurityGroup]:
        return _groups(self, refs)


@extend_schema_view(
    list=extend_schema(summary="List your project's ports",
                       parameters=[NETWORK_FILTER, NAME_FILTER,
                                   _filter("device_id", OpenApiTypes.STR, "only those of this device")],
                       responses={200: PortSerializer(many=True), **error_responses(400, 401, 403)}),
    retrieve=extend_schema(summary="Show a port", parameters=[_id_param("port")],
                           responses={200: PortSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Create a port with its addresses (IPAM in the same transaction)",
                         request=PortCreateSerializer,
                         responses={201: PortSerializer, **error_responses(400, 401, 403), **CONFLICT}),
    partial_update=extend_schema(summary="Change a port's name, security_groups, admin_state_up, "
                                         "port_security_enabled",
                                 parameters=[_id_param("port")], request=PortUpdateSerializer,
                                 responses={200: PortSerializer, **error_responses(400, 401, 403, 404),
                                            **CONFLICT}),
    destroy=extend_schema(summary="Delete a port (its addresses are free at once)",
                          parameters=[_id_param("port")],
                          responses={204: OpenApiResponse(description="Deleted"),
                                     **error_responses(401, 403, 404)}),
)
class PortViewSet(ScopedViewSet):
    serializer_class = PortSerializer

    def get_queryset(self) -> QuerySet[Port]:
        return selectors.ports_visible_to(self.request.user)

    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return _filtered(queryset, self.request, network=True, device_id=True)

    def create(self, request: Request) -> Response:
        body = PortCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        port = services.port_create(user=request.user, project=project_of(request.user),
                                    **body.service_arguments())
        return self._shown(port, status.HTTP_201_CREATED)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        port = self.get_object()
        body = PortUpdateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        return self._shown(services.port_update(port=port, user=request.user, **body.validated_data))

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        services.port_delete(port=self.get_object(), user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- security groups -------------------------------------------------------------------------------


class SecurityGroupRuleSerializer(serializers.ModelSerializer):
    security_group = serializers.UUIDField(source="security_group_id", read_only=True)
    remote_group = serializers.UUIDField(source="remote_group_id", read_only=True, allow_null=True)

    class Meta:
        model = SecurityGroupRule
        fields = ("id", "security_group", "direction", "ethertype", "protocol", "port_range_min",
                  "port_range_max", "remote_ip_prefix", "remote_group", "description", "created")
        read_only_fields = fields


class SecurityGroupSerializer(serializers.ModelSerializer):
    project = serializers.CharField(source="project.name", read_only=True)
    rules = SecurityGroupRuleSerializer(many=True, read_only=True)

    class Meta:
        model = SecurityGroup
        fields = ("id", "name", "description", "project", "rules", "created")
        read_only_fields = fields


class SecurityGroupCreateSerializer(StrictSerializer):
    name = StrictCharField(max_length=255)
    description = StrictCharField(max_length=255, required=False, allow_blank=True, default="")


class SecurityGroupRuleCreateSerializer(StrictSerializer):
    security_group = IdOrNameField()
    direction = serializers.ChoiceField(choices=Direction.choices)
    ethertype = serializers.ChoiceField(choices=["IPv4"], required=False, default="IPv4")
    protocol = serializers.ChoiceField(choices=Protocol.choices, required=False, allow_null=True,
                                       default=None, help_text="null: any protocol")
    port_range_min = serializers.IntegerField(required=False, allow_null=True, default=None,
                                              help_text="tcp/udp: first port; icmp: the type")
    port_range_max = serializers.IntegerField(required=False, allow_null=True, default=None,
                                              help_text="tcp/udp: last port; icmp: the code")
    remote_ip_prefix = StrictCharField(max_length=64, required=False, allow_null=True, default=None,
                                       help_text="a CIDR; exclusive with remote_group")
    remote_group = IdOrNameField(required=False, allow_null=True, default=None,
                                 help_text="a security group; exclusive with remote_ip_prefix")
    description = StrictCharField(max_length=255, required=False, allow_blank=True, default="")

    def validate_security_group(self, ref: str) -> SecurityGroup:
        return _groups(self, [ref])[0]

    def validate_remote_group(self, ref: str | None) -> SecurityGroup | None:
        return None if ref is None else _groups(self, [ref])[0]


def _default_group_of(user: Any) -> None:
    """The user's project has its default group once it lists its groups (Neutron's first need)."""
    if project_id_of(user) is not None:
        services.security_group_default(project=project_of(user))


@extend_schema_view(
    list=extend_schema(summary="List your project's security groups (the default group is made on "
                               "first need)", parameters=[NAME_FILTER],
                       responses={200: SecurityGroupSerializer(many=True), **error_responses(401, 403)}),
    retrieve=extend_schema(summary="Show a security group with its rules",
                           parameters=[_id_param("security group")],
                           responses={200: SecurityGroupSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Create a security group (it allows egress anywhere, no ingress)",
                         request=SecurityGroupCreateSerializer,
                         responses={201: SecurityGroupSerializer, **error_responses(400, 401, 403)}),
    destroy=extend_schema(summary="Delete a security group (409 for the default group or one in use)",
                          parameters=[_id_param("security group")],
                          responses={204: OpenApiResponse(description="Deleted"),
                                     **error_responses(401, 403, 404), **CONFLICT}),
)
class SecurityGroupViewSet(ScopedViewSet):
    serializer_class = SecurityGroupSerializer

    def get_queryset(self) -> QuerySet[SecurityGroup]:
        return selectors.security_groups_visible_to(self.request.user)

    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return _filtered(queryset, self.request)

    def list(self, request: Request) -> Response:
        _default_group_of(request.user)
        return super().list(request)

    def create(self, request: Request) -> Response:
        body = SecurityGroupCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        group = services.security_group_create(user=request.user, project=project_of(request.user),
                                               **body.validated_data)
        return self._shown(group, status.HTTP_201_CREATED)

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        services.security_group_delete(group=self.get_object(), user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema_view(
    list=extend_schema(summary="List the rules of your project's security groups",
                       parameters=[_filter("security_group", OpenApiTypes.UUID,
                                           "only the rules of this group")],
                       responses={200: SecurityGroupRuleSerializer(many=True),
                                  **error_responses(400, 401, 403)}),
    retrieve=extend_schema(summary="Show a security group rule", parameters=[_id_param("rule")],
                           responses={200: SecurityGroupRuleSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Add a rule to a security group", request=SecurityGroupRuleCreateSerializer,
                         responses={201: SecurityGroupRuleSerializer, **error_responses(400, 401, 403),
                                    **CONFLICT}),
    destroy=extend_schema(summary="Delete a security group rule", parameters=[_id_param("rule")],
                          responses={204: OpenApiResponse(description="Deleted"),
                                     **error_responses(401, 403, 404)}),
)
class SecurityGroupRuleViewSet(ScopedViewSet):
    serializer_class = SecurityGroupRuleSerializer

    def get_queryset(self) -> QuerySet[SecurityGroupRule]:
        return selectors.security_group_rules_visible_to(self.request.user)

    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        group = _uuid_query(self.request, "security_group")
        return queryset if group is None else queryset.filter(security_group_id=group)

    def create(self, request: Request) -> Response:
        body = SecurityGroupRuleCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        rule = services.security_group_rule_create(user=request.user, **body.validated_data)
        return self._shown(rule, status.HTTP_201_CREATED)

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        services.security_group_rule_delete(rule=self.get_object(), user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

