"""/api/v1/servers/ (lifecycle, actions, console) and /api/v1/server-groups/: parse, call one service,
render."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from cloudctl.api import CodedErrorSerializer, error_responses, paginated
from cloudctl.compute import ports, selectors, services
from cloudctl.compute.api.common import (
    SERVER_ID,
    HidesHostNames,
    IdOrNameField,
    StrictCharField,
    lookup,
)
from cloudctl.compute.api.migrations import ServerMigrationActions
from cloudctl.compute.host_ids import host_id
from cloudctl.compute.models import (
    Flavor,
    Instance,
    InstanceAction,
    InstanceActionEvent,
    ServerGroup,
)
from cloudctl.compute.states import STATUSES
from cloudctl.identity.services import is_admin, project_of
from cloudctl.images.models import Image
from cloudctl.images.services import images_visible_to
from cloudctl.network.selectors import networks_visible_to, ports_visible_to


class SchedulerHintsSerializer(serializers.Serializer):
    same_host = serializers.ListField(child=serializers.UUIDField(), required=False,
                                      allow_empty=False)
    different_host = serializers.ListField(child=serializers.UUIDField(), required=False,
                                           allow_empty=False)
    group = serializers.UUIDField(required=False)

    def to_internal_value(self, data: Any) -> Any:
        unknown = set(data) - set(self.fields) if isinstance(data, dict) else set()
        if unknown:
            raise serializers.ValidationError(
                f"unknown hint(s) {', '.join(sorted(unknown))}; known: same_host, "
                "different_host, group")
        return super().to_internal_value(data)


_NETWORK_REQUEST_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {"network": {"type": "string", "description": "a network's id or name"},
                   "port": {"type": "string", "format": "uuid",
                            "description": "an unbound port of the project (kept when the server "
                                           "is deleted)"},
                   "fixed_ip": {"type": "string", "description": "with network: the address"}},
}


@extend_schema_field({
    "oneOf": [{"type": "string", "enum": [ports.AUTO, ports.NONE]},
              {"type": "array", "items": _NETWORK_REQUEST_SCHEMA}],
    "description": '"auto": the one network available to the project (400 when none or several); '
                   '"none": no NIC; or a list of NICs in order, each {"network"}, '
                   '{"network", "fixed_ip"} or {"port"}. Omitted: the one network available, no NIC '
                   "when there is none, 400 when there are several.",
})
class NetworksField(serializers.Field):
    """A create's ``networks``, parsed; the references are resolved by the serializer."""

    default_error_messages = {"invalid": 'must be "auto", "none" or a list of {{"network"}}, '
                                         '{{"network", "fixed_ip"}} or {{"port"}}'}

    def to_internal_value(self, data: Any) -> Any:
        if data in (ports.AUTO, ports.NONE):
            return data
        if not isinstance(data, list):
            self.fail("invalid")
        for entry in data:
            if not isinstance(entry, dict) or not entry or set(entry) - {"network", "port", "fixed_ip"}:
                self.fail("invalid")
            if any(not isinstance(v, str) or not v.strip() for v in entry.values()):
                raise serializers.ValidationError("network, port and fixed_ip are non-empty strings")
            if "port" in entry and len(entry) > 1:
                raise serializers.ValidationError("a port comes with its network and addresses: give "
                                                  '{"port"} alone')
            if "port" not in entry and "network" not in entry:
                raise serializers.ValidationError('a fixed_ip needs its "network"')
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class ServerCreateSerializer(serializers.Serializer):
    name = StrictCharField(max_length=255)
    flavor = IdOrNameField()
    image = IdOrNameField()
    availability_zone = StrictCharField(max_length=255, required=False, default="")
    scheduler_hints = SchedulerHintsSerializer(required=False)
    host = StrictCharField(max_length=255, required=False, default="")
    networks = NetworksField(required=False)

    def validate_networks(self, value: Any) -> Any:
        """Each network visible to the user (400 "no network ..." otherwise, like flavor and image),
        each port the user's (400 "no port ..."); the binding and the addresses are checked when the
        ports are made."""
        if not isinstance(value, list):
            return value
        user = self.context["request"].user
        requests = []
        for entry in value:
            if "port" in entry:
                try:
                    port_id = uuid.UUID(entry["port"])
                except ValueError:
                    port_id = None
                port = ports_visible_to(user).filter(pk=port_id).first() if port_id else None
                if port is None:
                    raise serializers.ValidationError(f"no port with id {entry['port']!r}")
                requests.append(ports.NetworkRequest(port=port))
                continue
            network = lookup(networks_visible_to(user), entry["network"].strip(), kind="network",
                             id_kind=uuid.UUID)
            requests.append(ports.NetworkRequest(network=network, fixed_ip=entry.get("fixed_ip")))
        return requests

    def validate_host(self, value: str) -> str:
        if value and not is_admin(self.context["request"].user):
            raise serializers.ValidationError("only administrators may choose a host")
        return value

    def validate_scheduler_hints(self, hints: dict[str, Any]) -> dict[str, Any]:
        user = self.context["request"].user
        visible = selectors.servers_visible_to(user)
        for key in ("same_host", "different_host"):
            ids = hints.get(key) or []
            found = set(visible.filter(uuid__in=ids).values_list("uuid", flat=True))
            missing = [str(i) for i in ids if i not in found]
            if missing:
                raise serializers.ValidationError(f"{key}: no server {', '.join(missing)}")
        if "group" in hints:
            group = selectors.server_groups_visible_to(user).filter(pk=hints["group"]).first()
            if group is None:
                raise serializers.ValidationError(f"group: no server group {hints['group']}")
            hints["group"] = group
        return hints

    def service_arguments(self) -> dict[str, Any]:
        data = dict(self.validated_data)
        hints = data.pop("scheduler_hints", {}) or {}
        return {**data, "server_group": hints.get("group"), "same_host": hints.get("same_host"),
                "different_host": hints.get("different_host")}

    def validate_flavor(self, ref: str) -> Flavor:
        user = self.context["request"].user
        return lookup(selectors.flavors_visible_to(user), ref, kind="flavor", id_kind=int)

    def validate_image(self, ref: str) -> Image:
        user = self.context["request"].user
        return lookup(images_visible_to(user), ref, kind="image", id_kind=uuid.UUID)


class ServerFlavorSerializer(serializers.Serializer):
    """Documentation only: the flavor a server was built from, with its numbers at boot."""

    id = serializers.IntegerField()
    name = serializers.CharField()
    vcpus = serializers.IntegerField()
    memory_mb = serializers.IntegerField()
    root_gb = serializers.IntegerField()


class ServerImageSerializer(serializers.Serializer):
    """Documentation only: the image a server was built from."""

    id = serializers.UUIDField()
    name = serializers.CharField()


class ServerFaultSerializer(serializers.Serializer):
    """Documentation only: why a server is in error (details only for administrators on 5xx; the
    message names hosts for administrators only, e.g. NoValidHost's)."""

    message = serializers.CharField()
    code = serializers.IntegerField()
    details = serializers.CharField(allow_blank=True)


def _admin_reads(serializer: serializers.Serializer) -> bool:
    return is_admin(serializer.context["request"].user)


HOST_HELP = "the hypervisor's name: administrators only (null for the others)"
HOST_ID_HELP = ("sha224 hex of the project id and the host name, as Nova's hostId: equal for two "
                "servers of one project on one host; empty without a host")


class ServerSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="uuid", read_only=True)
    status = serializers.CharField(read_only=True)
    host = serializers.SerializerMethodField(help_text=HOST_HELP)
    hostId = serializers.SerializerMethodField(help_text=HOST_ID_HELP)  # Nova's name
    project = serializers.CharField(source="project.name", read_only=True)
    flavor = serializers.SerializerMethodField()
    image = serializers.SerializerMethodField()
    fault = serializers.SerializerMethodField()
    host_status = serializers.SerializerMethodField()
    server_group = serializers.UUIDField(source="server_group_id", read_only=True, allow_null=True)
    addresses = serializers.SerializerMethodField()

    class Meta:
        model = Instance
        fields = ("id", "name", "status", "vm_state", "task_state", "power_state", "host", "hostId",
                  "host_status", "availability_zone", "flavor", "image", "fault", "project",
                  "server_group", "addresses", "created", "updated", "launched_at")
        read_only_fields = fields

    @extend_schema_field({
        "type": "object", "description": "the server's addresses by network name, in NIC order: each "
                                         "fixed address followed by the floating IPs mapped to it",
        "additionalProperties": {"type": "array", "items": {
            "type": "object", "properties": {
                "addr": {"type": "string"}, "version": {"type": "integer", "enum": [4]},
                "mac": {"type": "string"},
                "type": {"type": "string", "enum": ["fixed", "floating"]}}}},
    })
    def get_addresses(self, instance: Instance) -> dict[str, list[dict[str, Any]]]:
        # A list reads the ports of all its servers at once (one query, not one per server).
        by_server = self.context.get("ports_by_server")
        if by_server is None:
            listed = self.parent.instance if isinstance(self.parent, serializers.ListSerializer) else None
            by_server = ports.ports_by_server([i.uuid for i in listed] if listed is not None
                                              else [instance.uuid])
            self.context["ports_by_server"] = by_server
        return ports.addresses_of(by_server.get(str(instance.uuid), []))

    @extend_schema_field(ServerFlavorSerializer)
    def get_flavor(self, instance: Instance) -> dict[str, Any]:
        return {"id": instance.flavor_id, "name": instance.flavor.name, "vcpus": instance.vcpus,
                "memory_mb": instance.memory_mb, "root_gb": instance.root_gb}

    @extend_schema_field(ServerImageSerializer(allow_null=True))
    def get_image(self, instance: Instance) -> dict[str, Any] | None:
        if instance.image is None:
            return None
        return {"id": str(instance.image.id), "name": instance.image.name}

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_host(self, instance: Instance) -> str | None:
        if instance.host is None or not _admin_reads(self):
            return None
        return instance.host.name

    def get_hostId(self, instance: Instance) -> str:
        return host_id(instance.project_id, instance.host.name if instance.host else None)

    def get_host_status(self, instance: Instance) -> str:
        return selectors.host_status(instance)

    @extend_schema_field(ServerFaultSerializer(allow_null=True))
    def get_fault(self, instance: Instance) -> dict[str, Any] | None:
        if not instance.fault:
            return None
        fault = dict(instance.fault)
        admin = _admin_reads(self)
        # As Nova: technical details of internal errors are for administrators.
        if fault.get("code", 500) >= 500 and not admin:
            fault["details"] = ""
        # A fault written with a form for tenants (NoValidHost: no host names) shows it to them.
        message = fault.get("message", "")
        if not admin:
            message = fault.get("tenant_message") or message
        return {"message": message, "code": fault.get("code", 500), "details": fault.get("details", "")}


class ActionEventSerializer(serializers.ModelSerializer):
    traceback = serializers.SerializerMethodField()
    host = serializers.SerializerMethodField(help_text="the host it ran on: administrators only "
                                                       "(empty for the others)")
    hostId = serializers.SerializerMethodField(help_text=HOST_ID_HELP)  # Nova's name

    class Meta:
        model = InstanceActionEvent
        fields = ("event", "result", "host", "hostId", "message", "start_time", "finish_time",
                  "traceback")

    def get_traceback(self, event: InstanceActionEvent) -> str:
        return event.traceback if _admin_reads(self) else ""

    def get_host(self, event: InstanceActionEvent) -> str:
        return event.host if _admin_reads(self) else ""

    def get_hostId(self, event: InstanceActionEvent) -> str:
        # The server's project (not the acting user's), as the server's own hostId.
        return host_id(self.context["server_project_id"], event.host)


class ActionSerializer(serializers.ModelSerializer):
    server_id = serializers.UUIDField(source="instance_id")
    image_id = serializers.UUIDField(read_only=True, allow_null=True)
    user = serializers.CharField(source="user.username", default=None, allow_null=True)
    project = serializers.CharField(source="project.name", default=None, allow_null=True)
    events = ActionEventSerializer(many=True)

    class Meta:
        model = InstanceAction
        fields = ("id", "server_id", "action", "request_id", "user", "project", "start_time",
                  "finish_time", "result", "message", "image_id", "events")
        read_only_fields = fields


class SnapshotSerializer(serializers.Serializer):
    name = StrictCharField(max_length=255)


class RebootSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=["SOFT", "HARD"], default="SOFT")


class ConsoleQuerySerializer(serializers.Serializer):
    lines = serializers.IntegerField(required=False, min_value=1, max_value=10000, default=None,
                                     help_text="only the last N lines (default: the whole log)")


class ConsoleOutputSerializer(serializers.Serializer):
    """Documentation only: the answer of console-output."""

    output = serializers.CharField()


_ACCEPTED_ACTION = OpenApiResponse(
    ActionSerializer, description="Accepted: the action record; follow it in GET .../actions/")


def _server_action(summary: str, request: Any = None, *, bad_request: bool = False) -> Any:
    """extend_schema of a server action: 202 with the action record, 409 when the state forbids."""
    codes = (400, 401, 403, 404, 409) if bad_request else (401, 403, 404, 409)
    return extend_schema(summary=summary, parameters=[SERVER_ID], request=request,
                         responses={202: _ACCEPTED_ACTION, **error_responses(*codes)})


@extend_schema_view(
    list=extend_schema(summary="List the servers visible to you",
                       parameters=[OpenApiParameter("status", OpenApiTypes.STR, enum=STATUSES,
                                                    description="only the servers in this status")],
                       responses={200: ServerSerializer(many=True), **error_responses(400, 401, 403)}),
    retrieve=extend_schema(summary="Show a server", parameters=[SERVER_ID],
                           responses={200: ServerSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(
        summary="Boot a server (asynchronous: 202, then status BUILD -> ACTIVE or ERROR)",
        request=ServerCreateSerializer,
        responses={202: OpenApiResponse(ServerSerializer, description="Accepted: being scheduled"),
                   **error_responses(400, 401, 403)}),
    destroy=extend_schema(
        summary="Delete a server", parameters=[SERVER_ID], request=None,
        responses={204: OpenApiResponse(description="Gone at once (it was on no host, or its "
                                                    "host is down: local delete)"),
                   202: OpenApiResponse(ServerSerializer,
                                        description="Accepted: its compute worker destroys it"),
                   **error_responses(401, 403, 404, 409)}),
)
class ServerViewSet(HidesHostNames, ServerMigrationActions, mixins.ListModelMixin,
                    mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    # A server and its lifecycle actions; its migrations' actions come from ServerMigrationActions.
    # (A comment, not a docstring: drf-spectacular would publish it on every operation.)

    serializer_class = ServerSerializer
    lookup_value_regex = "[0-9a-fA-F-]{36}"

    def get_queryset(self) -> QuerySet[Instance]:
        return selectors.servers_visible_to(self.request.user)

    def filter_queryset(self, queryset: QuerySet[Instance]) -> QuerySet[Instance]:
        """The list's ``?status=`` (as Nova's; any case); a server itself is found whatever it shows."""
        wanted = self.request.query_params.get("status")
        if getattr(self, "action", None) != "list" or wanted is None:
            return queryset
        if wanted.upper() not in STATUSES:
            raise serializers.ValidationError({"status": [f"one of {', '.join(STATUSES)}"]})
        return selectors.servers_with_status(queryset, wanted.upper())

    def create(self, request: Request) -> Response:
        body = ServerCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        instance = services.server_create(
            user=request.user, project=project_of(request.user), **body.service_arguments())
        instance = self.get_queryset().get(pk=instance.pk)
        return Response(self.get_serializer(instance).data, status=status.HTTP_202_ACCEPTED)

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        if services.server_delete(instance=instance, user=request.user):
            return Response(status=status.HTTP_204_NO_CONTENT)
        instance.refresh_from_db()
        return Response(self.get_serializer(instance).data, status=status.HTTP_202_ACCEPTED)

    def _accepted(self, action_record: InstanceAction) -> Response:
        action_record = selectors.server_actions(instance=action_record.instance).get(pk=action_record.pk)
        context = {"request": self.request, "server_project_id": action_record.instance.project_id}
        return Response(ActionSerializer(action_record, context=context).data,
                        status=status.HTTP_202_ACCEPTED)

    @_server_action("Reboot a server (SOFT: ACPI, then HARD after the timeout; HARD: reset)",
                    RebootSerializer, bad_request=True)
    @action(detail=True, methods=["post"])
    def reboot(self, request: Request, pk: str | None = None) -> Response:
        body = RebootSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return self._accepted(services.server_reboot(
            instance=self.get_object(), user=request.user, reboot_type=body.validated_data["type"]))

    @_server_action("Stop (power off) a server")
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_stop(instance=self.get_object(), user=request.user))

    @_server_action("Start a stopped server")
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_start(instance=self.get_object(), user=request.user))

    @_server_action("Pause a server")
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_pause(instance=self.get_object(), user=request.user))

    @_server_action("Unpause a server")
    @action(detail=True, methods=["post"])
    def unpause(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_unpause(instance=self.get_object(),
                                                      user=request.user))

    @_server_action("Suspend a server")
    @action(detail=True, methods=["post"])
    def suspend(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_suspend(instance=self.get_object(),
                                                      user=request.user))

    @_server_action("Resume a suspended server")
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_resume(instance=self.get_object(), user=request.user))

    @_server_action("Snapshot a server's disk into a new private image (live when running)",
                    SnapshotSerializer, bad_request=True)
    @action(detail=True, methods=["post"])
    def snapshot(self, request: Request, pk: str | None = None) -> Response:
        body = SnapshotSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        record = services.server_snapshot(instance=self.get_object(), user=request.user,
                                          name=body.validated_data["name"])
        return self._accepted(record)

    @extend_schema(summary="The server's actions, newest first, with their events",
                   parameters=[SERVER_ID],
                   responses={200: ActionSerializer(many=True), **error_responses(401, 403, 404)})
    @action(detail=True, methods=["get"])
    def actions(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        records = selectors.server_actions(instance=instance)
        context = {"request": request, "server_project_id": instance.project_id}
        return paginated(self, records, lambda page: ActionSerializer(
            page, many=True, context=context).data)

    @extend_schema(
        summary="The tail of the server's serial console, read from its host",
        parameters=[SERVER_ID, ConsoleQuerySerializer],
        responses={200: ConsoleOutputSerializer,
                   409: OpenApiResponse(CodedErrorSerializer,
                                        description="The server does not run on a host, or its "
                                                    "console cannot be read"),
                   **error_responses(400, 401, 403, 404, 503)})
    @action(detail=True, methods=["get"], url_path="console-output")
    def console_output(self, request: Request, pk: str | None = None) -> Response:
        query = ConsoleQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        output = services.server_console_output(instance=self.get_object(),
                                                lines=query.validated_data["lines"])
        return Response({"output": output})


class ServerGroupSerializer(serializers.ModelSerializer):
    name = StrictCharField(max_length=255)
    project = serializers.CharField(source="project.name", read_only=True)
    members = serializers.SerializerMethodField()

    class Meta:
        model = ServerGroup
        fields = ("id", "name", "policy", "project", "members", "created")
        read_only_fields = ("id", "project", "members", "created")

    def get_members(self, group: ServerGroup) -> list[dict[str, Any]]:
        """Each member with its hostId (anti-affinity can be checked by the owner) and, for
        administrators, its host."""
        admin = _admin_reads(self)
        return [{"id": str(m.uuid), "name": m.name, "status": m.status,
                 "host": m.host.name if m.host and admin else None,
                 "hostId": host_id(m.project_id, m.host.name if m.host else None)}
                for m in selectors.server_group_members(group=group)]


SERVER_GROUP_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH,
                                   description="the server group's id")


@extend_schema_view(
    list=extend_schema(summary="List the server groups visible to you",
                       responses={200: ServerGroupSerializer(many=True),
                                  **error_responses(401, 403)}),
    retrieve=extend_schema(summary="Show a server group", parameters=[SERVER_GROUP_ID],
                           responses={200: ServerGroupSerializer,
                                      **error_responses(401, 403, 404)}),
    create=extend_schema(summary="Create a server group in your project",
                         responses={201: ServerGroupSerializer, **error_responses(400, 401, 403)}),
    destroy=extend_schema(summary="Delete a server group (its servers keep running, ungrouped)",
                          parameters=[SERVER_GROUP_ID],
                          responses={204: OpenApiResponse(description="Deleted"),
                                     **error_responses(401, 403, 404)}),
)
class ServerGroupViewSet(HidesHostNames, mixins.CreateModelMixin, mixins.ListModelMixin,
                         mixins.RetrieveModelMixin, mixins.DestroyModelMixin,
                         viewsets.GenericViewSet):
    """Nova's os-server-groups: deleting a group leaves its servers running, ungrouped."""

    serializer_class = ServerGroupSerializer

    def get_queryset(self) -> QuerySet[ServerGroup]:
        return selectors.server_groups_visible_to(self.request.user)

    def perform_create(self, serializer: ServerGroupSerializer) -> None:
        serializer.instance = services.server_group_create(
            user=self.request.user, project=project_of(self.request.user),
            **serializer.validated_data)
