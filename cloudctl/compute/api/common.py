"""What the compute API's modules share: the block_migration field, the server id parameter (strict
fields and references by id or name are every API's: :mod:`cloudctl.api`)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema_field,
)
from rest_framework import serializers

from cloudctl.api import IdOrNameField as IdOrNameField  # re-exported for the compute API's modules
from cloudctl.api import StrictCharField as StrictCharField
from cloudctl.api import lookup as lookup


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
