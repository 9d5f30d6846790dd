"""The control plane's one error hierarchy: every refusal a request can meet is a CloudctlError that
knows its HTTP answer, so the API's exception handler has one branch for all of them.

A subclass sets ``status_code`` and ``code`` and, where the body says more than the message (the
server's state, the field that is wrong), overrides :meth:`CloudctlError.body`. The compute errors
are in :mod:`cloudctl.compute.errors`, the networks' in :mod:`cloudctl.network.errors`, the
images' in :mod:`cloudctl.images.services`.
"""

from __future__ import annotations

from typing import Any


class CloudctlError(Exception):
    """A request refused with a reason; the API answers ``status_code`` with :meth:`body`."""

    status_code = 409
    code = "conflict"

    def body(self) -> dict[str, Any]:
        """The JSON body of the API's answer."""
        return {"detail": str(self), "code": self.code}

    def headers(self) -> dict[str, str]:
        """Headers of the API's answer besides the body (``Retry-After`` of a 503)."""
        return {}


class InvalidRequest(CloudctlError):
    """A request that is well-formed but cannot be served (HTTP 400), naming the field: the body is
    DRF's validation shape, ``{field: [message]}``."""

    status_code = 400
    code = "invalid"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def body(self) -> dict[str, Any]:
        return {self.field: [self.message]}


class QuotaExceeded(CloudctlError):
    """A creation that would take the project over one of its limits (HTTP 403, as Nova): the body
    names the resource, how much was asked, how much is in use and the limit."""

    status_code = 403
    code = "quota_exceeded"

    def __init__(self, *, resource: str, requested: int, in_use: int, limit: int,
                 owner: str = "project") -> None:
        self.resource = resource
        self.requested = requested
        self.in_use = in_use
        self.limit = limit
        super().__init__(f"quota exceeded for {resource}: {requested} requested, {in_use} in use "
                         f"of the {owner}'s limit of {limit}")

    def body(self) -> dict[str, Any]:
        return {**super().body(), "resource": self.resource, "requested": self.requested,
                "in_use": self.in_use, "limit": self.limit}


class DatabaseUnavailable(CloudctlError):
    """The database cannot be reached now (HTTP 503, ``Retry-After``): a restart or a failover, not
    the request's fault; the same request succeeds once it is back (see :mod:`cloudctl.database`)."""

    status_code = 503
    code = "database_unavailable"

    def __init__(self, message: str = "the database is unavailable; retry shortly") -> None:
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        from django.conf import settings

        return {"Retry-After": str(settings.DATABASE_RETRY_AFTER)}
