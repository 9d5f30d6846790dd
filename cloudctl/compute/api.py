"""/api/v1/servers/, /flavors/, /hosts/: parse, call one service, render."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import BasePermission, IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response

from cloudctl.compute import services
from cloudctl.compute.models import Flavor, Host, Instance, InstanceAction, InstanceActionEvent
from cloudctl.identity.services import is_admin, project_of
from cloudctl.images.models import Image
from cloudctl.images.services import images_visible_to


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of turning them into text."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class IdOrNameField(serializers.Field):
    """A reference given as an id (integer or uuid) or a name."""

    default_error_messages = {"invalid": "must be an id or a name (string or integer)"}

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, bool) or not isinstance(data, (str, int)) or str(data).strip() == "":
            self.fail("invalid")
        return str(data).strip()

    def to_representation(self, value: Any) -> Any:
        return value


def _lookup(queryset: QuerySet[Any], ref: str, *, kind: str, id_kind: type) -> Any:
    """Find one object by primary key or, failing that, by unique name; 400 otherwise."""
    try:
        pk = id_kind(ref)
    except ValueError:
        pk = None
    if pk is not None:
        found = queryset.filter(pk=pk).first()
        if found is not None:
            return found
    named = list(queryset.filter(name=ref)[:2])
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise serializers.ValidationError(f"several {kind}s are named {ref!r}; give the id")
    raise serializers.ValidationError(f"no {kind} with id or name {ref!r}")


class ServerCreateSerializer(serializers.Serializer):
    name = StrictCharField(max_length=255)
    flavor = IdOrNameField()
    image = IdOrNameField()
    availability_zone = StrictCharField(max_length=255, required=False, default="")

    def validate_flavor(self, ref: str) -> Flavor:
        user = self.context["request"].user
        return _lookup(services.flavors_visible_to(user), ref, kind="flavor", id_kind=int)

    def validate_image(self, ref: str) -> Image:
        user = self.context["request"].user
        return _lookup(images_visible_to(user), ref, kind="image", id_kind=uuid.UUID)


class ServerSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="uuid", read_only=True)
    status = serializers.CharField(read_only=True)
    host = serializers.CharField(source="host.name", default=None, read_only=True)
    project = serializers.CharField(source="project.name", read_only=True)
    flavor = serializers.SerializerMethodField()
    image = serializers.SerializerMethodField()
    fault = serializers.SerializerMethodField()
    host_status = serializers.SerializerMethodField()

    class Meta:
        model = Instance
        fields = ("id", "name", "status", "vm_state", "task_state", "power_state", "host",
                  "host_status", "availability_zone", "flavor", "image", "fault", "project",
                  "created", "updated", "launched_at")
        read_only_fields = fields

    def get_flavor(self, instance: Instance) -> dict[str, Any]:
        return {"id": instance.flavor_id, "name": instance.flavor.name, "vcpus": instance.vcpus,
                "memory_mb": instance.memory_mb, "root_gb": instance.root_gb}

    def get_image(self, instance: Instance) -> dict[str, Any] | None:
        if instance.image is None:
            return None
        return {"id": str(instance.image.id), "name": instance.image.name}

    def get_host_status(self, instance: Instance) -> str:
        return services.host_status(instance)

    def get_fault(self, instance: Instance) -> dict[str, Any] | None:
        if not instance.fault:
            return None
        fault = dict(instance.fault)
        # As Nova: technical details of internal errors are for administrators.
        if fault.get("code", 500) >= 500 and not is_admin(self.context["request"].user):
            fault["details"] = ""
        return {"message": fault.get("message", ""), "code": fault.get("code", 500),
                "details": fault.get("details", "")}


class ActionEventSerializer(serializers.ModelSerializer):
    traceback = serializers.SerializerMethodField()

    class Meta:
        model = InstanceActionEvent
        fields = ("event", "result", "host", "message", "start_time", "finish_time", "traceback")

    def get_traceback(self, event: InstanceActionEvent) -> str:
        return event.traceback if is_admin(self.context["request"].user) else ""


class ActionSerializer(serializers.ModelSerializer):
    server_id = serializers.UUIDField(source="instance_id")
    user = serializers.CharField(source="user.username", default=None)
    project = serializers.CharField(source="project.name", default=None)
    events = ActionEventSerializer(many=True)

    class Meta:
        model = InstanceAction
        fields = ("id", "server_id", "action", "request_id", "user", "project", "start_time",
                  "finish_time", "result", "message", "events")
        read_only_fields = fields


class RebootSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=["SOFT", "HARD"], default="SOFT")


class ConsoleQuerySerializer(serializers.Serializer):
    lines = serializers.IntegerField(required=False, min_value=1, max_value=10000, default=None)


class ServerViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = ServerSerializer
    lookup_value_regex = "[0-9a-fA-F-]{36}"

    def get_queryset(self) -> QuerySet[Instance]:
        return services.servers_visible_to(self.request.user)

    def create(self, request: Request) -> Response:
        body = ServerCreateSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        instance = services.server_create(
            user=request.user, project=project_of(request.user), **body.validated_data)
        instance = self.get_queryset().get(pk=instance.pk)
        return Response(self.get_serializer(instance).data, status=status.HTTP_202_ACCEPTED)

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        if services.server_delete(instance=instance, user=request.user):
            return Response(status=status.HTTP_204_NO_CONTENT)
        instance.refresh_from_db()
        return Response(self.get_serializer(instance).data, status=status.HTTP_202_ACCEPTED)

    def _accepted(self, action_record: InstanceAction) -> Response:
        action_record = (InstanceAction.objects.select_related("user", "project")
                         .prefetch_related("events").get(pk=action_record.pk))
        return Response(ActionSerializer(action_record, context={"request": self.request}).data,
                        status=status.HTTP_202_ACCEPTED)

    @action(detail=True, methods=["post"])
    def reboot(self, request: Request, pk: str | None = None) -> Response:
        body = RebootSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return self._accepted(services.server_reboot(
            instance=self.get_object(), user=request.user, reboot_type=body.validated_data["type"]))

    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_stop(instance=self.get_object(), user=request.user))

    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_start(instance=self.get_object(), user=request.user))

    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_pause(instance=self.get_object(), user=request.user))

    @action(detail=True, methods=["post"])
    def unpause(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_unpause(instance=self.get_object(),
                                                      user=request.user))

    @action(detail=True, methods=["post"])
    def suspend(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_suspend(instance=self.get_object(),
                                                      user=request.user))

    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        return self._accepted(services.server_resume(instance=self.get_object(), user=request.user))

    @action(detail=True, methods=["get"])
    def actions(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        records = (InstanceAction.objects.filter(instance=instance)
                   .select_related("user", "project").prefetch_related("events"))
        return Response(ActionSerializer(records, many=True, context={"request": request}).data)

    @action(detail=True, methods=["get"], url_path="console-output")
    def console_output(self, request: Request, pk: str | None = None) -> Response:
        query = ConsoleQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        output = services.server_console_output(instance=self.get_object(),
                                                lines=query.validated_data["lines"])
        return Response({"output": output})


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


class FlavorViewSet(mixins.CreateModelMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                    mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = FlavorSerializer
    permission_classes = [IsAdminOrReadOnly]

    def get_queryset(self) -> QuerySet[Flavor]:
        return services.flavors_visible_to(self.request.user)

    def perform_destroy(self, instance: Flavor) -> None:
        services.flavor_delete(flavor=instance)


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
                  "last_heartbeat", "cpu_allocation_ratio", "ram_allocation_ratio",
                  "disk_allocation_ratio")
        read_only_fields = fields

    def get_state(self, host: Host) -> str:
        return "up" if host.is_up else "down"


class HostViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = HostSerializer
    permission_classes = [IsAdminUser]
    lookup_field = "name"
    lookup_value_regex = "[^/]+"

    def get_queryset(self) -> QuerySet[Host]:
        return services.hosts_with_usage()
