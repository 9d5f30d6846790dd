"""Migrations in the API: the migration actions of /api/v1/servers/{id}/ and /api/v1/migrations/ (admin)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
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
from rest_framework.request import Request
from rest_framework.response import Response

from cloudctl.api import CodedErrorSerializer, error_responses, paginated
from cloudctl.compute import evacuation, migration_requests, selectors
from cloudctl.compute.api.common import (
    ALLOW_DATA_LOSS_HELP,
    SERVER_ID,
    BlockMigrationField,
    IdOrNameField,
    StrictBooleanField,
    StrictCharField,
    lookup,
)
from cloudctl.compute.models import (
    Flavor,
    Host,
    Instance,
    Migration,
    MigrationStatus,
    MigrationType,
)
from cloudctl.identity.permissions import IsCloudAdmin
from cloudctl.identity.services import is_admin


class LiveMigrateSerializer(serializers.Serializer):
    host = StrictCharField(max_length=255, required=False, allow_null=True, default=None,
                           help_text="destination host; null: the scheduler picks one")
    block_migration = BlockMigrationField(required=False, default="auto")


class MigrateSerializer(serializers.Serializer):
    host = StrictCharField(max_length=255, required=False, allow_null=True, default=None,
                           help_text="destination host; null: the scheduler picks one")


class EvacuateSerializer(serializers.Serializer):
    host = StrictCharField(max_length=255, required=False, allow_null=True, default=None,
                           help_text="destination host; null: the scheduler picks one")
    allow_data_loss = StrictBooleanField(required=False, default=False, help_text=ALLOW_DATA_LOSS_HELP)


class ResizeSerializer(serializers.Serializer):
    flavor = IdOrNameField(help_text="the new flavor (id or name)")

    def validate_flavor(self, ref: str) -> Flavor:
        return lookup(selectors.flavors_visible_to(self.context["request"].user), ref, kind="flavor",
                       id_kind=int)


class MigrationSerializer(serializers.ModelSerializer):
    server = serializers.UUIDField(source="instance_id", read_only=True)
    source_host = serializers.SerializerMethodField(help_text="administrators only (null for the others)")
    dest_host = serializers.SerializerMethodField(help_text="administrators only (null for the others)")
    old_flavor = serializers.CharField(source="old_flavor.name")
    new_flavor = serializers.CharField(source="new_flavor.name")
    action_id = serializers.IntegerField(allow_null=True)

    class Meta:
        model = Migration
        fields = ("id", "server", "migration_type", "status", "source_host", "dest_host", "old_flavor",
                  "new_flavor", "block_migration", "shared_storage", "completion_timeout",
                  "memory_total", "memory_processed", "memory_remaining", "disk_total", "disk_processed",
                  "disk_remaining", "downtime_ms", "progress_updated", "error", "failed_check", "batch",
                  "action_id", "created", "updated", "started_at", "finished_at")
        read_only_fields = fields

    def _host_name(self, host: Host | None) -> str | None:
        # A tenant's resize shows no hypervisor names (the server's hostId says where it runs).
        if host is None or not is_admin(self.context["request"].user):
            return None
        return host.name

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_source_host(self, migration: Migration) -> str | None:
        return self._host_name(migration.source_host)

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_dest_host(self, migration: Migration) -> str | None:
        return self._host_name(migration.dest_host)


MIGRATION_ID = OpenApiParameter("migration_id", OpenApiTypes.INT, OpenApiParameter.PATH,
                                description="the migration's id")


_CHECKED_LATER = ("Answered at once, without asking any host: 202 with the migration in status "
                  "`checking` (the server shows its task state already). The pre-flight checks run "
                  "next on the scheduler's worker: the migration then goes on (`preparing`, with its "
                  "`dest_host`) or ends `refused` with the reason in `error` and the check in "
                  "`failed_check`, the server exactly as before. 409 only when the server's state or "
                  "its host forbids the request now.")


def _migration_action(summary: str, request: Any = None, *, checked_later: bool = False) -> Any:
    """extend_schema of a migration request: 202 with the migration record; 409 when the state or
    the host forbids it. ``checked_later``: a new migration, whose pre-flight checks run after the
    answer (no host is asked during the request)."""
    codes = (400, 401, 403, 404, 409) if checked_later else (400, 401, 403, 404, 409, 503)
    return extend_schema(summary=summary, description=_CHECKED_LATER if checked_later else None,
                         parameters=[SERVER_ID], request=request,
                         responses={202: MigrationSerializer, **error_responses(*codes)})


class ServerMigrationActions:
    # The migration actions of /api/v1/servers/{id}/ (live-migrate, migrate, resize, confirm or revert,
    # the server's migrations, abort, force-complete), mixed into the server viewset. A comment, not a
    # docstring: drf-spectacular would publish a viewset's (inherited) docstring on every operation.

    # Provided by the viewset it is mixed into (annotations only: nothing here overrides them).
    request: Request
    get_object: Callable[[], Instance]

    def _migration_accepted(self, migration: Migration) -> Response:
        migration = selectors.migrations_visible_to(self.request.user).get(pk=migration.pk)
        return Response(MigrationSerializer(migration, context={"request": self.request}).data,
                        status=status.HTTP_202_ACCEPTED)

    @_migration_action("Live-migrate a running server to another host (admin); checked next, then "
                       "followed in GET .../migrations/", LiveMigrateSerializer, checked_later=True)
    @action(detail=True, methods=["post"], url_path="live-migrate", permission_classes=[IsCloudAdmin])
    def live_migrate(self, request: Request, pk: str | None = None) -> Response:
        body = LiveMigrateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return self._migration_accepted(migration_requests.server_live_migrate(
            instance=self.get_object(), user=request.user, host=body.validated_data["host"],
            block_migration=body.validated_data["block_migration"]))

    @_migration_action("Cold-migrate a server to another host (admin): stopped, moved, started "
                       "there if it ran; checked next", MigrateSerializer, checked_later=True)
    @action(detail=True, methods=["post"], permission_classes=[IsCloudAdmin])
    def migrate(self, request: Request, pk: str | None = None) -> Response:
        body = MigrateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return self._migration_accepted(migration_requests.server_migrate(
            instance=self.get_object(), user=request.user, host=body.validated_data["host"]))

    @_migration_action("Resize a server to a bigger flavor: ends in VERIFY_RESIZE, then confirm or "
                       "revert (confirmed automatically after RESIZE_CONFIRM_WINDOW); checked next",
                       ResizeSerializer, checked_later=True)
    @action(detail=True, methods=["post"])
    def resize(self, request: Request, pk: str | None = None) -> Response:
        body = ResizeSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        return self._migration_accepted(migration_requests.server_resize(
            instance=self.get_object(), user=request.user, flavor=body.validated_data["flavor"]))

    @extend_schema(summary="Evacuate a server of a dead, fenced host: rebuild it on another host (admin; "
                           "Nova's evacuate)",
                   description="Only when the server's host stopped heartbeating and is forced down "
                               "(fenced: POST /hosts/{name}/force-down/ or /fence/). The destination (the "
                               "scheduler's filters, the dead host excluded) is chosen and claimed at once: "
                               "202 with the migration (type `evacuation`, status `rebuilding`), then `done` "
                               "once rebuilt there, `completed` once the dead host, back, removed its stale "
                               "copy. A host sharing the dead host's instance storage keeps the disk; any "
                               "other rebuilds it from the image, losing its data, only with "
                               "`allow_data_loss`. 409 with the reason otherwise.",
                   parameters=[SERVER_ID], request=EvacuateSerializer,
                   responses={202: MigrationSerializer, **error_responses(400, 401, 403, 404, 409)})
    @action(detail=True, methods=["post"], permission_classes=[IsCloudAdmin])
    def evacuate(self, request: Request, pk: str | None = None) -> Response:
        body = EvacuateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return self._migration_accepted(evacuation.server_evacuate(
            instance=self.get_object(), user=request.user, host=body.validated_data["host"],
            allow_data_loss=body.validated_data["allow_data_loss"]))

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
        return paginated(self, found, lambda page: MigrationSerializer(
            page, many=True, context={"request": request}).data)

    @extend_schema(summary="One migration of the server", parameters=[SERVER_ID, MIGRATION_ID],
                   responses={200: MigrationSerializer, **error_responses(401, 403, 404)})
    @action(detail=True, methods=["get"], url_path=r"migrations/(?P<migration_id>[0-9]+)")
    def server_migration(self, request: Request, pk: str | None = None,
                         migration_id: str | None = None) -> Response:
        return Response(MigrationSerializer(self._migration(migration_id),
                                            context={"request": request}).data)

    @extend_schema(summary="Abort a migration (admin): the server stays on its source, running",
                   description="A migration not started yet (`accepted`, `checking`; any kind) ends "
                               "`cancelled` at once, the server idle as before. A live migration "
                               "preparing, queued or running goes to `cancelling`: the source aborts "
                               "libvirt's job and reports.",
                   parameters=[SERVER_ID, MIGRATION_ID], request=None,
                   responses={202: MigrationSerializer,
                              409: OpenApiResponse(CodedErrorSerializer,
                                                   description="The migration cannot be aborted now"),
                              **error_responses(401, 403, 404)})
    @action(detail=True, methods=["post"], url_path=r"migrations/(?P<migration_id>[0-9]+)/abort",
            permission_classes=[IsCloudAdmin])
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
            permission_classes=[IsCloudAdmin])
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
    permission_classes = [IsCloudAdmin]

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
