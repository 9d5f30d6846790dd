"""What the compute API's modules share: strict fields, references by id or name, the server id parameter."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema_field,
)
from rest_framework import serializers


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


@extend_schema_field({"oneOf": [{"type": "string", "enum": ["auto"]}, {"type": "boolean"}],
                      "default": "auto",
                      "description": '"auto": copy the disk only when the hosts do not share the '
                                     'instance storage (detected); true: always copy; false: never'})
class BlockMigrationField(serializers.Field):
    default_error_messages = {"invalid": 'must be "auto", true or false'}

    def to_internal_value(self, data: Any) -> bool | str:
        if data != "auto" and not isinstance(data, bool):
            self.fail("invalid")
        return data

    def to_representation(self, value: Any) -> Any:
        return value


SERVER_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH,
                             description="the server's id")
