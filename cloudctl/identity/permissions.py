"""API permissions: the default one of every view (an authenticated user; readers only read; compute
workers only where a view allows them) and the administrators'."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import SAFE_METHODS, IsAuthenticated
from rest_framework.request import Request

from cloudctl.identity.authentication import is_service
from cloudctl.identity.services import is_admin, is_reader, scope_of


class IsAuthenticatedUser(IsAuthenticated):
    """A logged-in user; a request scoped with the ``reader`` role may only use safe methods (list,
    show). The service principal passes only views that list the action in ``service_actions``
    (image download)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if not super().has_permission(request, view):
            return False
        if is_service(request.user):
            return getattr(view, "action", None) in getattr(view, "service_actions", ())
        if request.method not in SAFE_METHODS and is_reader(request.user):
            scope = scope_of(request.user)
            project = scope.project_name if scope is not None else "?"
            raise PermissionDenied(f"your role in project {project} is reader: it may list and show, "
                                   f"not {request.method}")
        return True


class IsCloudAdmin(IsAuthenticatedUser):
    """A request scoped with the ``admin`` role (a cloud administrator)."""

    message = "only administrators (the admin role) may do this"

    def has_permission(self, request: Request, view: Any) -> bool:
        return super().has_permission(request, view) and is_admin(request.user)
