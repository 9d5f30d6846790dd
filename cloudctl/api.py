"""REST API plumbing shared by every endpoint: errors as JSON with the reason, and their
OpenAPI description (the serializers below only document the shapes the handler renders)."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.utils import OpenApiResponse, extend_schema_field
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from cloudctl.errors import CloudctlError


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler plus cloudctl's errors, each of which says its status code and body (409 with
    the blocking state, 400 with the field, 503 when a compute worker did not answer)."""
    if isinstance(exc, CloudctlError):
        return Response(exc.body(), status=exc.status_code)
    return drf_exception_handler(exc, context)


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

    default_error_messages = {"invalid": "must be an id or a name (string or integer)"}

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, bool) or not isinstance(data, (str, int)) or str(data).strip() == "":
            self.fail("invalid")
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
    answer (``compute_unavailable``)."""

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
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and "requestBody" in operation:
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
