"""/api/v1/routers/ and floating-ips/: parse, call one service of :mod:`cloudctl.network.l3`,
render. Scoped as the other network objects (:mod:`cloudctl.network.api`): a project's routers and
floating IPs, all of them for administrators, 404 for the others; a body naming what you cannot see
is 400 on that field."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from cloudctl.api import IdOrNameField, StrictCharField, error_responses, lookup
from cloudctl.identity.services import project_of
from cloudctl.network import l3, selectors
from cloudctl.network.api import (
    CONFLICT,
    NAME_FILTER,
    ScopedViewSet,
    StrictSerializer,
    _filter,
    _filtered,
    _id_param,
    _uuid_query,
)
from cloudctl.network.models import FloatingIP, Network, Port, Router, Subnet

# --- routers ---------------------------------------------------------------------------------------


class RouterFixedIPSerializer(serializers.Serializer):
    subnet = serializers.UUIDField(source="subnet_id")
    ip_address = serializers.IPAddressField()


class ExternalGatewaySerializer(serializers.Serializer):
    network = serializers.UUIDField()
    enable_snat = serializers.BooleanField()
    external_fixed_ips = RouterFixedIPSerializer(many=True)


class InterfaceSerializer(serializers.Serializer):
    port = serializers.UUIDField()
    subnet = serializers.UUIDField()
    network = serializers.UUIDField()
    ip_address = serializers.IPAddressField()


class RouterSerializer(serializers.ModelSerializer):
    project = serializers.CharField(source="project.name", read_only=True)
    external_gateway = serializers.SerializerMethodField()
    interfaces = serializers.SerializerMethodField()

    class Meta:
        model = Router
        fields = ("id", "name", "project", "external_gateway", "interfaces", "status", "created",
                  "updated")
        read_only_fields = fields

    @extend_schema_field(ExternalGatewaySerializer(allow_null=True))
    def get_external_gateway(self, router: Router) -> dict[str, Any] | None:
        if router.external_network_id is None:
            return None
        fixed = router.gateway_port.fixed_ips.all() if router.gateway_port is not None else []
        return {"network": router.external_network_id, "enable_snat": router.enable_snat,
                "external_fixed_ips": [{"subnet": f.subnet_id, "ip_address": f.ip_address}
                                       for f in fixed]}

    @extend_schema_field(InterfaceSerializer(many=True))
    def get_interfaces(self, router: Router) -> list[dict[str, Any]]:
        # A list reads the interfaces of all its routers at once.
        by_router = self.context.get("interfaces_by_router")
        if by_router is None:
            listed = self.parent.instance if self.parent is not None else None
            by_router = selectors.router_interfaces([r.pk for r in listed] if listed is not None
                                                    else [router.pk])
            self.context["interfaces_by_router"] = by_router
        return [{"port": p.id, "subnet": f.subnet_id, "network": p.network_id,
                 "ip_address": f.ip_address}
                for p in by_router.get(str(router.pk), []) for f in p.fixed_ips.all()]


@extend_schema_field({
    "oneOf": [{"type": "string", "description": "an external network's id or name"},
              {"type": "object", "properties": {"network": {"type": "string"},
                                                "enable_snat": {"type": "boolean"}},
               "required": ["network"]}],
    "nullable": True,
    "description": 'the external network (id or name) or {"network", "enable_snat"?: true}; null: none',
})
class ExternalGatewayField(serializers.Field):
    """``external_gateway``: a network reference, ``{"network", "enable_snat"?}``, or null."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_null=True, **kwargs)

    def to_internal_value(self, data: Any) -> l3.GatewayRequest:
        enable_snat = True
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"network", "enable_snat"})
            if unknown:
                raise serializers.ValidationError(f"unknown key(s) {', '.join(unknown)}: give "
                                                  '{"network", "enable_snat"?}')
            if "network" not in data:
                raise serializers.ValidationError('{"network": id or name} is required')
            snat = data.get("enable_snat", True)
            if not isinstance(snat, bool):
                raise serializers.ValidationError("enable_snat must be true or false")
            enable_snat, data = snat, data["network"]
        if data is None:
            return l3.GatewayRequest(network=None)
        ref = IdOrNameField().run_validation(data)
        network = lookup(selectors.networks_visible_to(self.context["request"].user), ref,
                         kind="network", id_kind=uuid.UUID)
        return l3.GatewayRequest(network=network, enable_snat=enable_snat)

    def validate_empty_values(self, data: Any) -> tuple[bool, Any]:
        if data is None:  # null is a value here: clear the gateway
            return True, l3.GatewayRequest(network=None)
        return super().validate_empty_values(data)

    def to_representation(self, value: Any) -> Any:
        return value


class RouterCreateSerializer(StrictSerializer):
    name = StrictCharField(max_length=255, required=False, allow_blank=True, default="")
    external_gateway = ExternalGatewayField(required=False)


class RouterUpdateSerializer(StrictSerializer):
    unchangeable = ("id", "project", "interfaces", "status")

    name = StrictCharField(max_length=255, required=False, allow_blank=True)
    external_gateway = ExternalGatewayField(required=False)


class InterfaceRequestSerializer(StrictSerializer):
    subnet = IdOrNameField()

    def validate_subnet(self, ref: str) -> Subnet:
        return lookup(selectors.subnets_visible_to(self.context["request"].user), ref,
                      kind="subnet", id_kind=uuid.UUID)


def _router_arguments(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    if "external_gateway" in data:
        data["gateway"] = data.pop("external_gateway")
    return data


@extend_schema_view(
    list=extend_schema(summary="List your project's routers", parameters=[NAME_FILTER],
                       responses={200: RouterSerializer(many=True), **error_responses(400, 401, 403)}),
    retrieve=extend_schema(summary="Show a router with its gateway and interfaces",
                           parameters=[_id_param("router")],
                           responses={200: RouterSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Create a router (with a gateway on an external network)",
                         request=RouterCreateSerializer,
                         responses={201: RouterSerializer, **error_responses(400, 401, 403), **CONFLICT}),
    partial_update=extend_schema(summary="Rename a router, or set, change or clear (null) its gateway",
                                 parameters=[_id_param("router")], request=RouterUpdateSerializer,
                                 responses={200: RouterSerializer,
                                            **error_responses(400, 401, 403, 404), **CONFLICT}),
    destroy=extend_schema(summary="Delete a router (409 naming its interfaces while it has any)",
                          parameters=[_id_param("router")],
                          responses={204: OpenApiResponse(description="Deleted"),
                                     **error_responses(401, 403, 404), **CONFLICT}),
    add_interface=extend_schema(summary="Plug the router into a subnet: a port holding the subnet's "
                                        "gateway_ip", parameters=[_id_param("router")],
                                request=InterfaceRequestSerializer,
                                responses={200: RouterSerializer,
                                           **error_responses(400, 401, 403, 404), **CONFLICT}),
    remove_interface=extend_schema(summary="Unplug the router from a subnet (409 while floating IPs "
                                           "are mapped through it there)",
                                   parameters=[_id_param("router")], request=InterfaceRequestSerializer,
                                   responses={200: RouterSerializer,
                                              **error_responses(400, 401, 403, 404), **CONFLICT}),
)
class RouterViewSet(ScopedViewSet):
    serializer_class = RouterSerializer

    def get_queryset(self) -> QuerySet[Router]:
        return selectors.routers_visible_to(self.request.user)

    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return _filtered(queryset, self.request)

    def create(self, request: Request) -> Response:
        body = RouterCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        router = l3.router_create(user=request.user, project=project_of(request.user),
                                  **_router_arguments(body.validated_data))
        return self._shown(router, status.HTTP_201_CREATED)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        router = self.get_object()
        body = RouterUpdateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        return self._shown(l3.router_update(router=router, user=request.user,
                                            **_router_arguments(body.validated_data)))

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        l3.router_delete(router=self.get_object(), user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _interface_request(self, request: Request) -> tuple[Router, Subnet]:
        router = self.get_object()
        body = InterfaceRequestSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        return router, body.validated_data["subnet"]

    @action(detail=True, methods=["post"], url_path="add-interface")
    def add_interface(self, request: Request, pk: str | None = None) -> Response:
        router, subnet = self._interface_request(request)
        l3.router_interface_add(router=router, user=request.user, subnet=subnet)
        return self._shown(router)

    @action(detail=True, methods=["post"], url_path="remove-interface")
    def remove_interface(self, request: Request, pk: str | None = None) -> Response:
        router, subnet = self._interface_request(request)
        l3.router_interface_remove(router=router, user=request.user, subnet=subnet)
        return self._shown(router)


# --- floating IPs ----------------------------------------------------------------------------------


class FloatingIPSerializer(serializers.ModelSerializer):
    project = serializers.CharField(source="project.name", read_only=True)
    floating_network = serializers.UUIDField(source="floating_network_id", read_only=True)
    port = serializers.UUIDField(source="port_id", read_only=True, allow_null=True)
    router = serializers.UUIDField(source="router_id", read_only=True, allow_null=True)
    server = serializers.SerializerMethodField()

    class Meta:
        model = FloatingIP
        fields = ("id", "floating_ip_address", "floating_network", "port", "fixed_ip_address",
                  "router", "server", "status", "project", "description", "created", "updated")
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.UUID)
    def get_server(self, fip: FloatingIP) -> str | None:
        """The server of the associated port (its device_id), null when none."""
        port = fip.port
        if port is None or not port.device_owner.startswith(l3.COMPUTE_DEVICE_OWNER_PREFIX):
            return None
        return port.device_id or None


class AssociationSerializer(StrictSerializer):
    server = serializers.UUIDField(required=False, help_text="a server of yours: its first port with "
                                   "a fixed IP on a subnet a router joins to the floating network")
    port = serializers.UUIDField(required=False, help_text="a port of yours")
    fixed_ip = serializers.IPAddressField(protocol="IPv4", required=False,
                                          help_text="which of the server's or port's fixed IPs")

    def validate_server(self, value: uuid.UUID) -> str:
        if not selectors.server_visible(self.context["request"].user, value):
            raise serializers.ValidationError(f"no server with id {value}")
        return str(value)

    def validate_port(self, value: uuid.UUID) -> Port:
        port = selectors.ports_visible_to(self.context["request"].user).filter(pk=value).first()
        if port is None:
            raise serializers.ValidationError(f"no port with id {value}")
        return port

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "server" in attrs and "port" in attrs:
            raise serializers.ValidationError({"port": ["give a server or a port, not both"]})
        return attrs

    def association(self) -> l3.AssociationRequest | None:
        data = self.validated_data
        if "server" not in data and "port" not in data:
            if "fixed_ip" in data:
                raise serializers.ValidationError({"fixed_ip": ["a fixed_ip needs a server or a port"]})
            return None
        return l3.AssociationRequest(server_id=data.get("server"), port=data.get("port"),
                                     fixed_ip=data.get("fixed_ip"))


class FloatingIPCreateSerializer(AssociationSerializer):
    network = IdOrNameField(help_text="the external network (id or name) the address comes from")
    description = StrictCharField(max_length=255, required=False, allow_blank=True, default="")

    def validate_network(self, ref: str) -> Network:
        return lookup(selectors.networks_visible_to(self.context["request"].user), ref,
                      kind="network", id_kind=uuid.UUID)


class AssociateSerializer(AssociationSerializer):
    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if "server" not in attrs and "port" not in attrs:
            raise serializers.ValidationError({"server": ["give a server or a port"]})
        return attrs


@extend_schema_view(
    list=extend_schema(summary="List your project's floating IPs",
                       parameters=[_filter("port", OpenApiTypes.UUID, "only those mapped to this port"),
                                   _filter("floating_network", OpenApiTypes.UUID,
                                           "only those of this external network")],
                       responses={200: FloatingIPSerializer(many=True), **error_responses(400, 401, 403)}),
    retrieve=extend_schema(summary="Show a floating IP", parameters=[_id_param("floating IP")],
                           responses={200: FloatingIPSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Allocate a floating IP from an external network (and associate it "
                                 "with a server or port)", request=FloatingIPCreateSerializer,
                         responses={201: FloatingIPSerializer, **error_responses(400, 401, 403),
                                    **CONFLICT}),
    destroy=extend_schema(summary="Release a floating IP (disassociated, its address free at once)",
                          parameters=[_id_param("floating IP")],
                          responses={204: OpenApiResponse(description="Released"),
                                     **error_responses(401, 403, 404)}),
    associate=extend_schema(summary="Map the floating IP to a server's or a port's fixed IP",
                            parameters=[_id_param("floating IP")], request=AssociateSerializer,
                            responses={200: FloatingIPSerializer,
                                       **error_responses(400, 401, 403, 404), **CONFLICT}),
    disassociate=extend_schema(summary="Stop mapping the floating IP (it stays allocated)",
                               parameters=[_id_param("floating IP")], request=None,
                               responses={200: FloatingIPSerializer, **error_responses(401, 403, 404)}),
)
class FloatingIPViewSet(ScopedViewSet):
    serializer_class = FloatingIPSerializer

    def get_queryset(self) -> QuerySet[FloatingIP]:
        return selectors.floating_ips_visible_to(self.request.user)

    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        for name in ("port", "floating_network"):
            value = _uuid_query(self.request, name)
            if value is not None:
                queryset = queryset.filter(**{f"{name}_id": value})
        return queryset

    def create(self, request: Request) -> Response:
        body = FloatingIPCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        fip = l3.floating_ip_create(user=request.user, project=project_of(request.user),
                                    network=body.validated_data["network"],
                                    association=body.association(),
                                    description=body.validated_data["description"])
        return self._shown(fip, status.HTTP_201_CREATED)

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        l3.floating_ip_delete(floating_ip=self.get_object(), user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @action(detail=True, methods=["post"])
    def associate(self, request: Request, pk: str | None = None) -> Response:
        fip = self.get_object()
        body = AssociateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        association = body.association()
        assert association is not None
        return self._shown(l3.floating_ip_associate(floating_ip=fip, user=request.user,
                                                    association=association))

    @action(detail=True, methods=["post"])
    def disassociate(self, request: Request, pk: str | None = None) -> Response:
        return self._shown(l3.floating_ip_disassociate(floating_ip=self.get_object(),
                                                       user=request.user))
