"""/api/v1/servers/, /flavors/, /hosts/: parse, call one service, render."""

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
from rest_framework.exceptions import NotFound
from rest_framework.permissions import BasePermission, IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response

from cloudctl.api import CodedErrorSerializer, error_responses
from cloudctl.compute import migration_requests, selectors, services
from cloudctl.compute.models import (
    Aggregate,
    Flavor,
    Host,
    Instance,
    InstanceAction,
    InstanceActionEvent,
    Migration,
    MigrationStatus,
    MigrationType,
    ServerGroup,
)
from cloudctl.identity.services import is_admin, project_of
from cloudctl.images.models import Image
from cloudctl.images.services import images_visible_to


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of turning them into text."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field({"oneOf": [{"type": "integer"}, {"type": "string"}],
                      "description": "an id (integer or uuid) or a unique name"})
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


class ServerCreateSerializer(serializers.Serializer):
    name = StrictCharField(max_length=255)
    flavor = IdOrNameField()
    image = IdOrNameField()
    availability_zone = StrictCharField(max_length=255, required=False, default="")
    scheduler_hints = SchedulerHintsSerializer(required=False)
    host = StrictCharField(max_length=255, required=False, default="")

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
        return _lookup(selectors.flavors_visible_to(user), ref, kind="flavor", id_kind=int)

    def validate_image(self, ref: str) -> Image:
        user = self.context["request"].user
        return _lookup(images_visible_to(user), ref, kind="image", id_kind=uuid.UUID)


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
    """Documentation only: why a server is in error (details only for administrators on 5xx)."""

    message = serializers.CharField()
    code = serializers.IntegerField()
    details = serializers.CharField(allow_blank=True)


class ServerSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="uuid", read_only=True)
    status = serializers.CharField(read_only=True)
    host = serializers.CharField(source="host.name", default=None, read_only=True, allow_null=True)
    project = serializers.CharField(source="project.name", read_only=True)
    flavor = serializers.SerializerMethodField()
    image = serializers.SerializerMethodField()
    fault = serializers.SerializerMethodField()
    host_status = serializers.SerializerMethodField()
    server_group = serializers.UUIDField(source="server_group_id", read_only=True, allow_null=True)

    class Meta:
        model = Instance
        fields = ("id", "name", "status", "vm_state", "task_state", "power_state", "host",
                  "host_status", "availability_zone", "flavor", "image", "fault", "project",
                  "server_group", "created", "updated", "launched_at")
        read_only_fields = fields

    @extend_schema_field(ServerFlavorSerializer)
    def get_flavor(self, instance: Instance) -> dict[str, Any]:
        return {"id": instance.flavor_id, "name": instance.flavor.name, "vcpus": instance.vcpus,
                "memory_mb": instance.memory_mb, "root_gb": instance.root_gb}

    @extend_schema_field(ServerImageSerializer(allow_null=True))
    def get_image(self, instance: Instance) -> dict[str, Any] | None:
        if instance.image is None:
            return None
        return {"id": str(instance.image.id), "name": instance.image.name}

    def get_host_status(self, instance: Instance) -> str:
        return selectors.host_status(instance)

    @extend_schema_field(ServerFaultSerializer(allow_null=True))
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


@extend_schema_field({"oneOf": [{"type": "string", "enum": ["auto"]}, {"type": "boolean"}],
                      "default": "auto",
                      "description": '"auto": copy the disk only when the hosts do not share the '
                                     'instance storage (detected); true: always copy; false: never'})
class BlockMigrationField(serializers.Field):
    default_error_messages = {"invalid": 'must be "auto", true or false'}

    def to_internal_value(self, data: Any) -> bool | str:
        if data == "auto" or isinstance(data, bool):
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


class LiveMigrateSerializer(serializers.Serializer):
    host = StrictCharField(max_length=255, required=False, allow_null=True, default=None,
                           help_text="destination host; null: the scheduler picks one")
    block_migration = BlockMigrationField(required=False, default="auto")


class MigrateSerializer(serializers.Serializer):
    host = StrictCharField(max_length=255, required=False, allow_null=True, default=None,
                           help_text="destination host; null: the scheduler picks one")


class ResizeSerializer(serializers.Serializer):
    flavor = IdOrNameField(help_text="the new flavor (id or name)")

    def validate_flavor(self, ref: str) -> Flavor:
        return _lookup(selectors.flavors_visible_to(self.context["request"].user), ref, kind="flavor",
                       id_kind=int)


class MigrationSerializer(serializers.ModelSerializer):
    server = serializers.UUIDField(source="instance_id", read_only=True)
    source_host = serializers.CharField(source="source_host.name", default=None, allow_null=True)
    dest_host = serializers.CharField(source="dest_host.name", default=None, allow_null=True)
    old_flavor = serializers.CharField(source="old_flavor.name")
    new_flavor = serializers.CharField(source="new_flavor.name")
    action_id = serializers.IntegerField(allow_null=True)

    class Meta:
        model = Migration
        fields = ("id", "server", "migration_type", "status", "source_host", "dest_host", "old_flavor",
                  "new_flavor", "block_migration", "shared_storage", "completion_timeout",
                  "memory_total", "memory_processed", "memory_remaining", "disk_total", "disk_processed",
                  "disk_remaining", "downtime_ms", "progress_updated", "error", "action_id", "created",
                  "updated", "started_at", "finished_at")
        read_only_fields = fields


SERVER_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH,
                             description="the server's id")
_ACCEPTED_ACTION = OpenApiResponse(
    ActionSerializer, description="Accepted: the action record; follow it in GET .../actions/")


MIGRATION_ID = OpenApiParameter("migration_id", OpenApiTypes.INT, OpenApiParameter.PATH,
                                description="the migration's id")


def _migration_action(summary: str, request: Any = None) -> Any:
    """extend_schema of a migration request: 202 with the migration record; 409 when the state, the
    host or a pre-flight check (``code`` ``preflight_failed``, ``check`` naming it) forbids it."""
    return extend_schema(summary=summary, parameters=[SERVER_ID], request=request,
                         responses={202: MigrationSerializer,
                                    **error_responses(400, 401, 403, 404, 409, 503)})


def _server_action(summary: str, request: Any = None, *, bad_request: bool = False) -> Any:
    """extend_schema of a server action: 202 with the action record, 409 when the state forbids."""
    codes = (400, 401, 403, 404, 409) if bad_request else (401, 403, 404, 409)
    return extend_schema(summary=summary, parameters=[SERVER_ID], request=request,
                         responses={202: _ACCEPTED_ACTION, **error_responses(*codes)})


@extend_schema_view(
    list=extend_schema(summary="List the servers visible to you",
                       responses={200: ServerSerializer(many=True), **error_responses(401, 403)}),
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
class ServerViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = ServerSerializer
    lookup_value_regex = "[0-9a-fA-F-]{36}"

    def get_queryset(self) -> QuerySet[Instance]:
        return selectors.servers_visible_to(self.request.user)

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
        return Response(ActionSerializer(action_record, context={"request": self.request}).data,
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

    def _migration_accepted(self, migration: Migration) -> Response:
        migration = selectors.migrations_visible_to(self.request.user).get(pk=migration.pk)
        return Response(MigrationSerializer(migration).data, status=status.HTTP_202_ACCEPTED)

    @_migration_action("Live-migrate a running server to another host (admin); checked before it "
                       "starts, then followed in GET .../migrations/", LiveMigrateSerializer)
    @action(detail=True, methods=["post"], url_path="live-migrate", permission_classes=[IsAdminUser])
    def live_migrate(self, request: Request, pk: str | None = None) -> Response:
        body = LiveMigrateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return self._migration_accepted(migration_requests.server_live_migrate(
            instance=self.get_object(), user=request.user, host=body.validated_data["host"],
            block_migration=body.validated_data["block_migration"]))

    @_migration_action("Cold-migrate a server to another host (admin): stopped, moved, started "
                       "there if it ran", MigrateSerializer)
    @action(detail=True, methods=["post"], permission_classes=[IsAdminUser])
    def migrate(self, request: Request, pk: str | None = None) -> Response:
        body = MigrateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return self._migration_accepted(migration_requests.server_migrate(
            instance=self.get_object(), user=request.user, host=body.validated_data["host"]))

    @_migration_action("Resize a server to a bigger flavor: ends in VERIFY_RESIZE, then confirm or "
                       "revert (confirmed automatically after RESIZE_CONFIRM_WINDOW)", ResizeSerializer)
    @action(detail=True, methods=["post"])
    def resize(self, request: Request, pk: str | None = None) -> Response:
        body = ResizeSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        return self._migration_accepted(migration_requests.server_resize(
            instance=self.get_object(), user=request.user, flavor=body.validated_data["flavor"]))

    @_migration_action("Confirm a resize: the old copy and its resources on the source are freed")
    @action(detail=True, methods=["post"], url_path="confirm-resize")
    def confirm_resize(self, request: Request, pk: str | None = None) -> Response:
        return self._migration_accepted(migration_requests.server_confirm_resize(
            instance=self.get_object(), user=request.user))

    @_migration_action("Revert a resize: back to the old host and flavor, with the disk as it was")
    @action(detail=True, methods=["post"], url_path="revert-resize")
    def revert_resize(self, request: Request, pk: str | None = None) -> Response:
        return self._migration_accepted(migration_requests.server_revert_resize(
            instance=self.get_object(), user=request.user))

    @extend_schema(summary="The server's migrations and resizes, newest first, with their progress",
                   parameters=[SERVER_ID],
                   responses={200: MigrationSerializer(many=True), **error_responses(401, 403, 404)})
    @action(detail=True, methods=["get"], url_path="migrations")
    def server_migrations(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        found = selectors.migrations_visible_to(request.user).filter(instance=instance)
        return Response(MigrationSerializer(found, many=True).data)

    @extend_schema(summary="One migration of the server", parameters=[SERVER_ID, MIGRATION_ID],
                   responses={200: MigrationSerializer, **error_responses(401, 403, 404)})
    @action(detail=True, methods=["get"], url_path=r"migrations/(?P<migration_id>[0-9]+)")
    def server_migration(self, request: Request, pk: str | None = None,
                         migration_id: str | None = None) -> Response:
        return Response(MigrationSerializer(self._migration(migration_id)).data)

    @extend_schema(summary="Abort a live migration (admin): the server stays on its source, running",
                   parameters=[SERVER_ID, MIGRATION_ID], request=None,
                   responses={202: MigrationSerializer,
                              409: OpenApiResponse(CodedErrorSerializer,
                                                   description="The migration cannot be aborted now"),
                              **error_responses(401, 403, 404)})
    @action(detail=True, methods=["post"], url_path=r"migrations/(?P<migration_id>[0-9]+)/abort",
            permission_classes=[IsAdminUser])
    def abort_migration(self, request: Request, pk: str | None = None,
                        migration_id: str | None = None) -> Response:
        migration = migration_requests.migration_abort(migration=self._migration(migration_id),
                                                       user=request.user)
        return self._migration_accepted(migration)

    @extend_schema(summary="Force a running live migration to complete (admin): switch to post-copy where "
                           "the source host permits it, else pause the guest until the copy converges",
                   parameters=[SERVER_ID, MIGRATION_ID], request=None,
                   responses={202: MigrationSerializer,
                              409: OpenApiResponse(CodedErrorSerializer,
                                                   description="The migration is not a running live "
                                                               "migration"),
                              **error_responses(401, 403, 404)})
    @action(detail=True, methods=["post"], url_path=r"migrations/(?P<migration_id>[0-9]+)/force-complete",
            permission_classes=[IsAdminUser])
    def force_complete_migration(self, request: Request, pk: str | None = None,
                                 migration_id: str | None = None) -> Response:
        migration = migration_requests.migration_force_complete(migration=self._migration(migration_id),
                                                                user=request.user)
        return self._migration_accepted(migration)

    def _migration(self, migration_id: str | None) -> Migration:
        instance = self.get_object()
        found = selectors.migrations_visible_to(self.request.user).filter(
            instance=instance, pk=int(migration_id or 0)).first()
        if found is None:
            raise NotFound(f"server {instance.uuid} has no migration {migration_id}")
        return found

    @extend_schema(summary="The server's actions, newest first, with their events",
                   parameters=[SERVER_ID],
                   responses={200: ActionSerializer(many=True), **error_responses(401, 403, 404)})
    @action(detail=True, methods=["get"])
    def actions(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        records = selectors.server_actions(instance=instance)
        return Response(ActionSerializer(records, many=True, context={"request": request}).data)

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
    permission_classes = [IsAdminOrReadOnly]

    def get_queryset(self) -> QuerySet[Flavor]:
        return selectors.flavors_visible_to(self.request.user)

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


class DisableSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=255, required=False, default="", allow_blank=True)


class HostLiveMigrateServersSerializer(serializers.Serializer):
    block_migration = BlockMigrationField(required=False, default="auto")


class EvacuationSerializer(serializers.Serializer):
    """One server of a host evacuation: accepted with its migration, or refused with the reason."""

    server = serializers.UUIDField(source="server.uuid")
    name = serializers.CharField(source="server.name")
    accepted = serializers.BooleanField()
    migration_id = serializers.IntegerField(source="migration.pk", default=None, allow_null=True)
    dest_host = serializers.CharField(source="migration.dest_host.name", default=None, allow_null=True)
    refused = serializers.CharField(help_text="why the server stays (empty when accepted)")


class HostEvacuationSerializer(serializers.Serializer):
    host = HostSerializer()
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
    permission_classes = [IsAdminUser]
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
                               "is kept), then live-migrates each of its servers to a host the scheduler "
                               "picks, each with the pre-flight checks of live-migrate. Per server: "
                               "accepted with its migration (follow it in GET /migrations/), or refused "
                               "with the reason (a stopped server must be cold-migrated).",
                   parameters=[HOST_NAME], request=HostLiveMigrateServersSerializer,
                   responses={202: HostEvacuationSerializer, **error_responses(400, 401, 403, 404)})
    @action(detail=True, methods=["post"], url_path="live-migrate-servers")
    def live_migrate_servers(self, request: Request, name: str | None = None) -> Response:
        body = HostLiveMigrateServersSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        host = self.get_object()
        results = migration_requests.host_live_migrate_servers(
            host=host, user=request.user, block_migration=body.validated_data["block_migration"])
        return Response({"host": self._host_data(host),
                         "servers": EvacuationSerializer(results, many=True).data},
                        status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Enable a host again", parameters=[HOST_NAME], request=None,
                   responses={200: HostSerializer, **error_responses(401, 403, 404)})
    @action(detail=True, methods=["post"])
    def enable(self, request: Request, name: str | None = None) -> Response:
        return self._shown(services.host_set_enabled(host=self.get_object(), enabled=True))


class ServerGroupSerializer(serializers.ModelSerializer):
    name = StrictCharField(max_length=255)
    project = serializers.CharField(source="project.name", read_only=True)
    members = serializers.SerializerMethodField()

    class Meta:
        model = ServerGroup
        fields = ("id", "name", "policy", "project", "members", "created")
        read_only_fields = ("id", "project", "members", "created")

    def get_members(self, group: ServerGroup) -> list[dict[str, Any]]:
        return [{"id": str(m.uuid), "name": m.name, "status": m.status,
                 "host": m.host.name if m.host else None}
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
class ServerGroupViewSet(mixins.CreateModelMixin, mixins.ListModelMixin,
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


class AvailabilityZoneSerializer(serializers.Serializer):
    """Documentation only: one availability zone."""

    name = serializers.CharField()
    available = serializers.BooleanField(help_text="some host of the zone is up and enabled")
    hosts = serializers.ListField(child=serializers.CharField(), required=False,
                                  help_text="the zone's hosts; shown to administrators only")


class AvailabilityZoneView(viewsets.ViewSet):
    """Zones; administrators also see each zone's hosts."""

    @extend_schema(summary="List the availability zones",
                   responses={200: AvailabilityZoneSerializer(many=True),
                              **error_responses(401, 403)})
    def list(self, request: Request) -> Response:
        zones = selectors.availability_zones()
        admin = is_admin(request.user)
        return Response([
            {"name": name, "available": any(h.is_up and h.enabled for h in hosts),
             **({"hosts": [h.name for h in hosts]} if admin else {})}
            for name, hosts in sorted(zones.items())])


class AggregateSerializer(serializers.ModelSerializer):
    name = StrictCharField(max_length=255)
    availability_zone = StrictCharField(max_length=255, required=False, allow_blank=True)
    hosts = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = Aggregate
        fields = ("id", "name", "availability_zone", "metadata", "hosts", "created")
        read_only_fields = ("id", "hosts", "created")

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
    permission_classes = [IsAdminUser]
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


MIGRATION_FILTERS = [
    OpenApiParameter("status", OpenApiTypes.STR, description="only migrations in this status",
                     enum=MigrationStatus.values),
    OpenApiParameter("migration_type", OpenApiTypes.STR, enum=MigrationType.values),
    OpenApiParameter("host", OpenApiTypes.STR, description="source or destination host name"),
    OpenApiParameter("server", OpenApiTypes.UUID),
    OpenApiParameter("in_progress", OpenApiTypes.BOOL, description="only migrations not finished yet"),
]


@extend_schema_view(
    list=extend_schema(summary="Every migration and resize, newest first (admin)",
                       parameters=MIGRATION_FILTERS,
                       responses={200: MigrationSerializer(many=True), **error_responses(400, 401, 403)}),
    retrieve=extend_schema(summary="Show a migration (admin)",
                           parameters=[OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH)],
                           responses={200: MigrationSerializer, **error_responses(401, 403, 404)}),
)
class MigrationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = MigrationSerializer
    permission_classes = [IsAdminUser]

    def get_queryset(self) -> QuerySet[Migration]:
        if getattr(self, "action", None) != "list":
            return selectors.migrations_visible_to(self.request.user)
        return selectors.migrations_list(user=self.request.user, **self._filters())

    def _filters(self) -> dict[str, Any]:
        """The list's query parameters, checked (400 naming the parameter)."""
        query = self.request.query_params
        filters: dict[str, Any] = {}
        if "status" in query:
            if query["status"] not in MigrationStatus.values:
                raise serializers.ValidationError({"status": [f"one of {', '.join(MigrationStatus.values)}"]})
            filters["status"] = query["status"]
        if "migration_type" in query:
            if query["migration_type"] not in MigrationType.values:
                raise serializers.ValidationError(
                    {"migration_type": [f"one of {', '.join(MigrationType.values)}"]})
            filters["migration_type"] = query["migration_type"]
        if "host" in query:
            filters["host"] = query["host"]
        if "server" in query:
            try:
                filters["server"] = uuid.UUID(query["server"])
            except ValueError:
                raise serializers.ValidationError({"server": ["must be a server id (uuid)"]}) from None
        filters["in_progress"] = query.get("in_progress") in ("1", "true", "True")
        return filters
