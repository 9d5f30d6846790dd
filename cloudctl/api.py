"""REST API plumbing shared by every endpoint: errors as JSON with the reason, and their
OpenAPI description (the serializers below only document the shapes the handler renders); the
lists' pagination (``limit`` and ``marker``, as Nova) and the JSON bodies' size limit."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import F, Model, Q, QuerySet
from django.db.models.expressions import OrderBy
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.utils import OpenApiResponse, extend_schema_field
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.pagination import BasePagination
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param

from cloudctl.errors import CloudctlError


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler plus cloudctl's errors, each of which says its status code and body (409 with
    the blocking state, 400 with the field, 503 when a compute worker did not answer). A database
    outage (:func:`cloudctl.database.database_unavailable`: a lost or refused connection, in the
    view or already in the authentication) is 503 ``database_unavailable`` with ``Retry-After``,
    and the broken connection is closed so that the next request connects anew."""
    # Imported here: rest_framework.views reads DEFAULT_PARSER_CLASSES, which names this module.
    from rest_framework.views import exception_handler as drf_exception_handler
    from rest_framework.views import set_rollback

    from cloudctl import database

    if database.database_unavailable(exc):
        set_rollback()
        return _response(database.request_failed(exc))
    if isinstance(exc, CloudctlError):
        return _response(exc)
    return drf_exception_handler(exc, context)


def _response(error: CloudctlError) -> Response:
    return Response(error.body(), status=error.status_code, headers=error.headers())


# --- errors Django answers itself (no view matched, or a view crashed) --------------------------------

def _is_api(request: HttpRequest) -> bool:
    return request.path_info.startswith("/api/")


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler404: a path under /api/ that matches no URL pattern (an id that is not an id, an unknown
    collection) answers DRF's JSON error body like a 404 from a view; elsewhere (the admin) Django's
    HTML page."""
    if _is_api(request):
        return JsonResponse({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500: an unhandled exception under /api/ answers JSON (logged by Django as usual)."""
    if _is_api(request):
        return JsonResponse({"detail": "Internal server error."},
                            status=status.HTTP_500_INTERNAL_SERVER_ERROR)
    return defaults.server_error(request)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler400: Django's own 400s (e.g. a SuspiciousOperation, a bad Host) as JSON under /api/."""
    if _is_api(request):
        return JsonResponse({"detail": "Bad request."}, status=status.HTTP_400_BAD_REQUEST)
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler403: Django's own PermissionDenied outside DRF's views, as JSON under /api/."""
    if _is_api(request):
        return JsonResponse({"detail": "You do not have permission to perform this action."},
                            status=status.HTTP_403_FORBIDDEN)
    return defaults.permission_denied(request, exception)


def _operations(result: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every operation of a generated schema with its path: what each postprocessing hook below
    walks (a path's entries that are not operations, e.g. its ``parameters`` list, are skipped)."""
    for url, operations in result.get("paths", {}).items():
        for operation in operations.values():
            if isinstance(operation, dict):
                yield url, operation


def document_not_found(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Schema postprocessing hook: every operation on a path with a parameter answers 404 (no such
    object, one not visible to the caller, or a parameter that cannot be an id: see ``not_found``)."""
    error = {"$ref": "#/components/schemas/Error"}
    for url, operation in _operations(result):
        if "{" in url and "responses" in operation:
            operation["responses"].setdefault("404", {
                "description": "No such object (or not visible to you)",
                "content": {"application/json": {"schema": error}},
            })
    return result


# --- fields every API module uses ------------------------------------------------------------------

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

    default_error_messages = {"invalid": "must be an id or a name (string or integer)",
                              "null_characters": "Null characters are not allowed."}

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, bool) or not isinstance(data, (str, int)) or str(data).strip() == "":
            self.fail("invalid")
        if "\x00" in str(data):  # as DRF's CharField: PostgreSQL cannot even compare such a string
            self.fail("null_characters")
        return str(data).strip()

    def to_representation(self, value: Any) -> Any:
        return value


class StrictSerializer(serializers.Serializer):
    """Refuses keys it does not know (400 naming them) instead of ignoring them: a PATCH of a field
    that cannot change must not answer 200 with nothing changed."""

    unchangeable: tuple[str, ...] = ()

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({
                    key: ["cannot be changed after creation" if key in self.unchangeable
                          else "unknown field"] for key in unknown})
        return super().to_internal_value(data)


def lookup(queryset: QuerySet[Any], ref: str, *, kind: str, id_kind: type) -> Any:
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


class ProjectRefSerializer(serializers.Serializer):
    """A project as other objects name it: ``{"id", "name"}``."""

    id = serializers.IntegerField()
    name = serializers.CharField()


# --- OpenAPI: the error shapes ---------------------------------------------------------------------

class ErrorSerializer(serializers.Serializer):
    """401, 403, 404, ...: DRF's error body."""

    detail = serializers.CharField()


class ValidationErrorSerializer(serializers.Serializer):
    """400: the rejected fields, each with its messages (``non_field_errors`` for the whole body).
    A body that is not JSON at all answers ``{"detail": "JSON parse error - ..."}``."""


class ValidationErrorSchema(OpenApiSerializerExtension):
    target_class = ValidationErrorSerializer

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        return {"oneOf": [
            {
                "type": "object",
                "description": "field name -> messages; a nested object for nested fields",
                "additionalProperties": {"oneOf": [
                    {"type": "array", "items": {"type": "string"}},
                    {"type": "object", "additionalProperties": {}},
                ]},
                "example": {"name": ["This field is required."]},
            },
            {
                "type": "object",
                "description": "a body that is not JSON at all, or a query that is not understood",
                "properties": {"detail": {"type": "string"}},
                "required": ["detail"],
                "additionalProperties": False,
                "example": {"detail": "JSON parse error - Expecting value: line 1 column 1 (char 0)"},
            },
        ]}


class CodedErrorSerializer(ErrorSerializer):
    """409 of a console that cannot be read (``conflict``), 503 of a compute worker that did not
    answer (``compute_unavailable``) or of a database that cannot be reached
    (``database_unavailable``, with ``Retry-After``)."""

    code = serializers.CharField()


class ConflictSerializer(ErrorSerializer):
    """409: the server's state forbids the action (``conflict``) or its host is down or missing
    (``host_unavailable``)."""

    code = serializers.ChoiceField(choices=["conflict", "host_unavailable"])
    status = serializers.CharField()
    vm_state = serializers.CharField()
    task_state = serializers.CharField(allow_null=True)


class ImageConflictSerializer(ErrorSerializer):
    """409: the image is not in a state that accepts the operation (e.g. data already uploaded)."""

    code = serializers.ChoiceField(choices=["conflict"])
    status = serializers.CharField()


def error_responses(*codes: int) -> dict[int, OpenApiResponse]:
    """The documented error answers of an endpoint, by status code."""
    known = {
        400: OpenApiResponse(ValidationErrorSerializer, description="Invalid request body or query"),
        401: OpenApiResponse(ErrorSerializer, description="No token, or an unknown one"),
        403: OpenApiResponse(ErrorSerializer, description="Not allowed to this user"),
        404: OpenApiResponse(ErrorSerializer, description="No such object (or not visible to you)"),
        409: OpenApiResponse(ConflictSerializer,
                             description="The server's state or its host forbids this now"),
        503: OpenApiResponse(CodedErrorSerializer,
                             description="The server's compute worker did not answer in time"),
    }
    return {code: known[code] for code in codes}


def document_unsupported_media_type(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Schema postprocessing hook: every operation that takes a body answers 415 to a body of another
    media type (DRF's parsers: JSON, or the raw bytes of an image upload)."""
    error = {"$ref": "#/components/schemas/Error"}
    for _url, operation in _operations(result):
        if "requestBody" in operation:
            accepted = ", ".join(sorted(operation["requestBody"].get("content", {})))
            operation.setdefault("responses", {}).setdefault("415", {
                "description": f"The body is not {accepted}",
                "content": {"application/json": {"schema": error}},
            })
    return result


class TokenScheme(OpenApiAuthenticationExtension):
    """``Authorization: Token <key>``; described here to mention the compute workers' token."""

    target_class = "cloudctl.identity.authentication.TokenAuthentication"
    name = "tokenAuth"
    priority = 1  # over drf-spectacular's own description of TokenAuthentication

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        scheme = build_bearer_security_scheme_object(header_name="Authorization",
                                                     token_prefix="Token")
        scheme["description"] = (
            "`Authorization: Token <token>` with the token from POST /api/v1/auth/token/: scoped to "
            "one project, valid TOKEN_TTL seconds (compute workers send CLOUDCTL_SERVICE_TOKEN the "
            "same way: image data only)")
        return scheme


class ServiceTokenScheme(OpenApiAuthenticationExtension):
    """The compute workers' token travels in the same header as users' tokens: it adds nothing
    to tokenAuth."""

    target_class = "cloudctl.identity.authentication.ServiceTokenAuthentication"
    name: list[str] = []

    # None: no security requirement of its own (drf-spectacular skips it); the base class's annotation
    # does not say that None is allowed.
    def get_security_requirement(self, auto_schema: Any) -> None:  # type: ignore[override]
        return None

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        return []


DATABASE_UNAVAILABLE_DESCRIPTION = (
    "The database is unavailable (a restart or a failover): `{\"code\": \"database_unavailable\"}`; "
    "nothing was changed, send the same request again after `Retry-After` seconds")


def document_database_unavailable(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Schema postprocessing hook: every operation answers 503 ``database_unavailable`` with
    ``Retry-After`` while the database cannot be reached (:mod:`cloudctl.database`); an operation
    that documents a 503 of its own (a compute worker that did not answer) says both."""
    retry_after = {"Retry-After": {"description": "seconds to wait before sending the request again",
                                   "schema": {"type": "integer"}}}
    for _url, operation in _operations(result):
        if "responses" not in operation:
            continue
        answer = operation["responses"].setdefault("503", {
            "description": DATABASE_UNAVAILABLE_DESCRIPTION,
            "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/CodedError"}}}})
        if answer.get("description") != DATABASE_UNAVAILABLE_DESCRIPTION:
            answer["description"] = (f"{answer.get('description', '')}; or "
                                     f"{DATABASE_UNAVAILABLE_DESCRIPTION[0].lower()}"
                                     f"{DATABASE_UNAVAILABLE_DESCRIPTION[1:]}")
        answer.setdefault("headers", {}).update(retry_after)
    return result


# --- lists: limit and marker -----------------------------------------------------------------------

def _positive_limit(raw: str | None) -> int:
    """The page size asked for: API_LIST_DEFAULT_LIMIT when absent, clamped to API_LIST_MAX_LIMIT
    (as Nova's max_limit); 400 when it is not a positive integer."""
    if raw is None or raw == "":
        return min(settings.API_LIST_DEFAULT_LIMIT, settings.API_LIST_MAX_LIMIT)
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1:
        raise serializers.ValidationError({"limit": [f"{raw!r} is not a positive integer"]})
    return min(int(raw), settings.API_LIST_MAX_LIMIT)


def _no_marker(marker: str) -> serializers.ValidationError:
    return serializers.ValidationError({"marker": [f"no item with id {marker!r}"]})


def _field_nullable(model: type[Model], path: str) -> bool:
    """Whether the ordering key ``path`` (``name``, ``project__name``) can be NULL; an annotation or
    anything that cannot be followed counts as nullable."""
    current: Any = model
    nullable = False
    for part in path.split("__"):
        try:
            field = current._meta.get_field(part)
        except (FieldDoesNotExist, AttributeError):
            return True
        nullable = nullable or bool(getattr(field, "null", False))
        if field.is_relation and field.related_model is not None:
            current = field.related_model
    return nullable


def _is_relation(model: type[Model], path: str) -> bool:
    """Whether ``path`` ends on a relation (``project``): ordering by it would follow the related
    model's own ordering, which a keyset cannot compare, so the list is paged by its id."""
    current: Any = model
    field: Any = None
    for part in path.split("__"):
        try:
            field = current._meta.get_field(part)
        except (FieldDoesNotExist, AttributeError):
            return False
        current = field.related_model if field.is_relation else None
    return bool(field is not None and field.is_relation)


def _has_field(model: type[Model], name: str) -> bool:
    try:
        model._meta.get_field(name)
    except FieldDoesNotExist:
        return False
    return True


class MarkerPagination(BasePagination):
    """Every list, page by page, as Nova: ``?limit=N&marker=<id of the last item seen>``.

    The body stays a plain JSON array; when there is a next page the answer carries
    ``Link: <url>; rel="next"`` (RFC 8288, as GitHub), the same URL with ``marker`` and ``limit``
    set, and no count (counting costs a scan). The page after the marker is a keyset query on the
    list's own ordering (the queryset's, else the model's) completed by the primary key, so paging
    neither skips nor repeats an item when others are added or removed meanwhile. A marker that names
    no item of the list is 400, as Nova's ``marker not found``.

    The marker is the id the API shows for an item: the view's ``lookup_field`` (``name`` for hosts),
    or ``pagination_marker_field`` for a list that is not a queryset (availability zones: ``name``).
    The marker is looked up in the view's unfiltered queryset, so an item that left the filter
    between two pages (a server whose status changed) still marks the place.
    """

    limit_query_param = "limit"
    marker_query_param = "marker"

    def __init__(self) -> None:
        self.next_marker: str | None = None
        self.limit = 0
        self.request: Request | None = None

    # -- paging --

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> list[Any]:
        self.request = request
        self.limit = _positive_limit(request.query_params.get(self.limit_query_param))
        marker = request.query_params.get(self.marker_query_param)
        if isinstance(queryset, QuerySet):
            items, key = self._page_of_queryset(queryset, marker, view)
        else:
            items, key = self._page_of_sequence(list(queryset), marker, view)
        page = items[:self.limit]
        self.next_marker = str(key(page[-1])) if len(items) > self.limit else None
        return page

    @staticmethod
    def _marker_field(view: Any, model: type[Model] | None = None) -> str:
        """The view's ``pagination_marker_field`` or ``lookup_field``; the primary key of a model
        without that field (a list of other objects under a detail route: a server's actions)."""
        field = str(getattr(view, "pagination_marker_field", None) or getattr(view, "lookup_field", "pk"))
        if model is not None and (field == model._meta.pk.name or not _has_field(model, field)):
            return "pk"
        return field

    def _page_of_queryset(self, queryset: QuerySet[Any], marker: str | None,
                          view: Any) -> tuple[list[Any], Callable[[Any], Any]]:
        model = queryset.model
        marker_field = self._marker_field(view, model)
        keys = self._ordering(queryset)
        queryset = queryset.order_by(*[
            OrderBy(F(name), descending=descending,
                    nulls_last=True if _field_nullable(model, name) else None)
            for name, descending in keys])
        if marker is not None:
            queryset = queryset.filter(self._after(model, keys, self._marker_row(
                queryset, marker, marker_field, [name for name, _ in keys], view)))
        items = list(queryset[:self.limit + 1])
        return items, lambda item: getattr(item, marker_field)

    @staticmethod
    def _ordering(queryset: QuerySet[Any]) -> list[tuple[str, bool]]:
        """(field, descending) of the queryset's ordering, ended by the primary key."""
        model = queryset.model
        declared: Sequence[Any] = queryset.query.order_by or (
            model._meta.ordering if queryset.query.default_ordering else ())
        keys: list[tuple[str, bool]] = []
        for entry in declared:
            if isinstance(entry, str):
                descending, name = entry.startswith("-"), entry.lstrip("-+")
            elif isinstance(entry, OrderBy) and isinstance(entry.expression, F):
                descending, name = entry.descending, entry.expression.name
            else:
                raise ImproperlyConfigured(f"{model.__name__}: a list ordered by {entry!r} cannot be "
                                           "paged; order by fields")
            if name == "?":
                raise ImproperlyConfigured(f"{model.__name__}: a random order cannot be paged")
            if name == model._meta.pk.name:
                name = "pk"
            elif _is_relation(model, name):
                name += "__pk"  # compared, as ordered, by the related row's id
            keys.append((name, descending))
        if not any(name == "pk" for name, _ in keys):
            keys.append(("pk", keys[-1][1] if keys else False))
        return keys

    def _marker_row(self, queryset: QuerySet[Any], marker: str, marker_field: str,
                    names: list[str], view: Any) -> dict[str, Any]:
        model = queryset.model
        field = model._meta.pk if marker_field == "pk" else model._meta.get_field(marker_field)
        try:
            value = field.to_python(marker)
        except (DjangoValidationError, ValueError, TypeError):
            raise _no_marker(marker) from None
        scope = queryset
        if view is not None and hasattr(view, "get_queryset"):
            unfiltered = view.get_queryset()
            if isinstance(unfiltered, QuerySet) and unfiltered.model is model:
                scope = unfiltered
        row = scope.filter(**{marker_field: value}).values(*names).first()
        if row is None:
            raise _no_marker(marker)
        return dict(row)

    @staticmethod
    def _after(model: type[Model], keys: list[tuple[str, bool]], row: dict[str, Any]) -> Q:
        """The rows strictly after ``row`` in the order ``keys`` (NULLs last in both directions)."""
        after = Q(pk__in=[])
        equal = Q()
        for name, descending in keys:
            value = row[name]
            nullable = _field_nullable(model, name)
            if value is None:
                # Past a NULL only NULLs follow; within them the next key decides.
                equal &= Q(**{f"{name}__isnull": True})
                continue
            beyond = Q(**{f"{name}__{'lt' if descending else 'gt'}": value})
            if nullable:
                beyond |= Q(**{f"{name}__isnull": True})
            after |= equal & beyond
            equal &= Q(**{name: value})
        return after

    def _page_of_sequence(self, items: list[Any], marker: str | None,
                          view: Any) -> tuple[list[Any], Callable[[Any], Any]]:
        """A list built in Python (already in its order): the items after the marker's."""
        field = self._marker_field(view)

        def key(item: Any) -> Any:
            return item[field] if isinstance(item, dict) else getattr(item, field)

        if marker is not None:
            position = next((i for i, item in enumerate(items) if str(key(item)) == marker), None)
            if position is None:
                raise _no_marker(marker)
            items = items[position + 1:]
        return items[:self.limit + 1], key

    # -- the answer --

    def next_link(self) -> str | None:
        if self.next_marker is None or self.request is None:
            return None
        url = replace_query_param(self.request.build_absolute_uri(), self.marker_query_param,
                                  self.next_marker)
        return replace_query_param(url, self.limit_query_param, self.limit)

    def get_paginated_response(self, data: Any) -> Response:
        response = Response(data)
        link = self.next_link()
        if link is not None:
            response["Link"] = f'<{link}>; rel="next"'
        return response

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return schema  # still the plain array; the next page is in the Link header

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {"name": self.limit_query_param, "required": False, "in": "query",
             "description": f"at most this many items (default {settings.API_LIST_DEFAULT_LIMIT}, "
                            f"larger values count as {settings.API_LIST_MAX_LIMIT}); the answer's "
                            '`Link: <url>; rel="next"` header gives the next page, absent on the '
                            "last",
             "schema": {"type": "integer", "minimum": 1}},
            {"name": self.marker_query_param, "required": False, "in": "query",
             "description": f"the {self._marker_field(view).replace('pk', 'id')} of the last item of "
                            "the previous page: the list goes on after it",
             "schema": {"type": "string"}},
        ]


def paginated(view: Any, items: Any, serialize: Callable[[Any], Any]) -> Response:
    """The answer of a list written by hand (an ``@action`` or a ``list`` of its own): the page
    ``view``'s paginator cuts from ``items``, serialized, with the next page's link."""
    page = view.paginate_queryset(items)
    if page is None:  # a view that opted out of pagination (pagination_class = None)
        return Response(serialize(items))
    return view.get_paginated_response(serialize(page))


def document_paged_lists(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Schema postprocessing hook: every paged list documents its ``Link`` header, and the 400 of a
    ``limit`` or ``marker`` it cannot use."""
    invalid = {"description": "Invalid query (e.g. a `limit` that is not a positive integer, a "
                              "`marker` that names no item)",
               "content": {"application/json": {
                   "schema": {"$ref": "#/components/schemas/ValidationError"}}}}
    for _url, operation in _operations(result):
        names = {p.get("name") for p in operation.get("parameters", [])}
        ok = operation.get("responses", {}).get("200")
        if {"limit", "marker"} <= names and isinstance(ok, dict):
            ok.setdefault("headers", {})["Link"] = {
                "description": '`<url>; rel="next"`: the next page (same query, `marker` and '
                               "`limit` set); absent on the last page",
                "schema": {"type": "string"}}
            operation["responses"].setdefault("400", invalid)
    return result


# --- request bodies --------------------------------------------------------------------------------

def document_body_limits(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Schema postprocessing hook: every operation that takes a body answers 413 to one that is too
    large (a JSON body over API_MAX_BODY_BYTES; image data over IMAGE_SIZE_CAP)."""
    error = {"$ref": "#/components/schemas/Error"}
    for _url, operation in _operations(result):
        if "requestBody" in operation:
            raw = "application/octet-stream" in operation["requestBody"].get("content", {})
            operation.setdefault("responses", {}).setdefault("413", {
                "description": (f"The image data is over IMAGE_SIZE_CAP ({settings.IMAGE_SIZE_CAP} "
                                "bytes): the image is killed" if raw else
                                f"The body is over API_MAX_BODY_BYTES ({settings.API_MAX_BODY_BYTES} "
                                "bytes)"),
                "content": {"application/json": {"schema": error}},
            })
    return result


class RequestBodyTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser, reading at most API_MAX_BODY_BYTES: a larger body is 413.

    DRF's parser reads the request stream itself, so Django's DATA_UPLOAD_MAX_MEMORY_SIZE does not
    apply. A declared Content-Length above the limit is refused before reading a byte; whatever the
    headers say, no more than limit + 1 bytes are read.
    """

    def parse(self, stream: Any, media_type: str | None = None,
              parser_context: dict[str, Any] | None = None) -> Any:
        limit = settings.API_MAX_BODY_BYTES
        request = (parser_context or {}).get("request")
        declared = request.META.get("CONTENT_LENGTH") if request is not None else None
        if declared and str(declared).isdigit() and int(declared) > limit:
            raise RequestBodyTooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
        body = stream.read(limit + 1) if stream is not None else b""
        if len(body) > limit:
            raise RequestBodyTooLarge(f"request body is more than {limit} bytes; the limit is {limit}")
        data = super().parse(io.BytesIO(body), media_type, parser_context)
        if _holds_nul(data):
            # PostgreSQL's text and jsonb cannot store it: refused here, for every field at once,
            # rather than a database error (500) in whichever free-form field holds it.
            raise ParseError("JSON strings may not contain the NUL character (\\u0000)")
        return data


def _holds_nul(value: Any) -> bool:
    """Whether a parsed JSON value has a NUL character in any string, key or value, at any depth."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False
