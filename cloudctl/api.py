"""REST API plumbing shared by every endpoint: errors as JSON with the reason."""

from __future__ import annotations

from typing import Any

from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from cloudctl.compute.rpc import ComputeUnavailable
from cloudctl.compute.services import (
    ConsoleUnavailable,
    HostUnavailable,
    InstanceInvalidState,
    InvalidRequest,
)
from cloudctl.images.services import ImageConflict, ImageRejected


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler plus cloudctl's domain errors: 409 with the blocking state, 400 with the field."""
    if isinstance(exc, InstanceInvalidState):
        instance = exc.instance
        return Response({"detail": str(exc), "code": "conflict", "status": instance.status,
                         "vm_state": instance.vm_state, "task_state": instance.task_state},
                        status=status.HTTP_409_CONFLICT)
    if isinstance(exc, HostUnavailable):
        instance = exc.instance
        return Response({"detail": str(exc), "code": "host_unavailable", "status": instance.status,
                         "vm_state": instance.vm_state, "task_state": instance.task_state},
                        status=status.HTTP_409_CONFLICT)
    if isinstance(exc, ConsoleUnavailable):
        return Response({"detail": str(exc), "code": "conflict"}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, InvalidRequest):
        return Response({exc.field: [exc.message]}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, ImageConflict):
        return Response({"detail": str(exc), "code": "conflict", "status": exc.image.status},
                        status=status.HTTP_409_CONFLICT)
    if isinstance(exc, ImageRejected):
        return Response({"file": [str(exc)]}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, ComputeUnavailable):
        return Response({"detail": str(exc), "code": "compute_unavailable"},
                        status=status.HTTP_503_SERVICE_UNAVAILABLE)
    return drf_exception_handler(exc, context)
