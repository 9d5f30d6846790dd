"""Default API permission: an authenticated user; compute workers only where a view allows them."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request

from cloudctl.identity.authentication import is_service


class IsAuthenticatedUser(IsAuthenticated):
    """A logged-in user. The service principal passes only views that list the action in
    ``service_actions`` (image download)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if not super().has_permission(request, view):
            return False
        if is_service(request.user):
            return getattr(view, "action", None) in getattr(view, "service_actions", ())
        return True
