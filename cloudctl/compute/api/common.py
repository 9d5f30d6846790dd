"""What the compute API's modules share: the block_migration field, the server id parameter, the
hiding of host names from tenants (strict fields and references by id or name are every API's:
:mod:`cloudctl.api`)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema_field,
)
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from cloudctl.api import IdOrNameField as IdOrNameField  # re-exported for the compute API's modules
from cloudctl.api import StrictCharField as StrictCharField
from cloudctl.api import lookup as lookup
from cloudctl.compute.host_ids import HostNameRedactor
from cloudctl.identity.services import is_admin, project_id_of


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


class StrictBooleanField(serializers.BooleanField):
    """A JSON boolean only: DRF's BooleanField would take "yes" or 1 (for a choice that forces a host down
    or loses a disk's data, say)."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


ALLOW_DATA_LOSS_HELP = (
    "rebuild from the image a server whose root disk is on the dead host's private storage "
    "(its data is lost); false: only onto a host sharing that storage")


SERVER_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH,
                             description="the server's id")


class HidesHostNames:
    """Mixed into a viewset whose answers tenants read: for a caller who is not an administrator,
    every host name left in the answer (a message, a fault, an error) becomes its host id
    (:mod:`cloudctl.compute.host_ids`). The serializers already show host fields to administrators
    only; this covers free text, including the error answers (they pass here too)."""

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        user = getattr(request, "user", None)
        data = getattr(response, "data", None)
        if user is not None and data is not None and not is_admin(user):
            # A service principal (compute workers' token) has no project: names are hidden all
            # the same.
            project_id = project_id_of(user) if getattr(user, "pk", None) is not None else ""
            response.data = HostNameRedactor.for_project(project_id).data(data)
        return response
