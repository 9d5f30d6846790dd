"""Authentication: users' API tokens, and the compute workers, which have no database and so no
user row.

Users present ``Authorization: Token <secret>`` (from POST /api/v1/auth/token/); the user returned
carries the token's :class:`~cloudctl.identity.services.Scope`. Compute workers present
``Authorization: Token <CLOUDCTL_SERVICE_TOKEN>`` and become a :class:`ServicePrincipal`, allowed
only what :func:`is_service` checks permit (image download).
"""

from __future__ import annotations

import hmac
from typing import Any

from django.conf import settings
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from cloudctl.identity import services


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


class TokenAuthentication(BaseAuthentication):
    """``Authorization: Token <secret>``: the token's user, scoped to the token's project. An
    expired, revoked or otherwise unusable token is a 401 that says why."""

    keyword = b"token"

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None
        if len(parts) != 2:
            raise AuthenticationFailed("invalid token header: give `Token <token>`")
        try:
            secret = parts[1].decode()
        except UnicodeError:
            raise AuthenticationFailed("invalid token") from None
        user, scope = services.token_authenticate(secret)
        services.scope_attach(user, scope)
        return user, scope

    def authenticate_header(self, request: Request) -> str:
        return "Token"


def is_service(user: Any) -> bool:
    return bool(getattr(user, "is_service", False))
