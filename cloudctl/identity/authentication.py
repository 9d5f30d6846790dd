"""Authentication of compute workers, which have no database and so no user row.

They present ``Authorization: Token <CLOUDCTL_SERVICE_TOKEN>`` and become a
:class:`ServicePrincipal`, allowed only what :func:`is_service` checks permit (image download).
"""

from __future__ import annotations

import hmac
from typing import Any

from django.conf import settings
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request


class ServicePrincipal:
    """The identity of a compute worker."""

    is_authenticated = True
    is_active = True
    is_staff = False
    is_superuser = False
    is_service = True
    username = "cloudctl-service"
    pk = None

    def __str__(self) -> str:
        return self.username


class ServiceTokenAuthentication(BaseAuthentication):
    keyword = b"token"

    def authenticate(self, request: Request) -> tuple[ServicePrincipal, None] | None:
        expected = settings.CLOUDCTL_SERVICE_TOKEN
        parts = get_authorization_header(request).split()
        if not expected or len(parts) != 2 or parts[0].lower() != self.keyword:
            return None
        if hmac.compare_digest(parts[1], expected.encode()):
            return ServicePrincipal(), None
        return None  # fall through to user tokens

    def authenticate_header(self, request: Request) -> str:
        return "Token"  # makes a missing or wrong token a 401, not a 403


def is_service(user: Any) -> bool:
    return bool(getattr(user, "is_service", False))
