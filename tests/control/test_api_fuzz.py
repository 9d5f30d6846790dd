"""Schemathesis against the OpenAPI schema: generated requests to every operation, as a member and as
an admin (so that admin-only operations are exercised beyond their 403), must never answer 500 and
every answer must match what the schema promises (status code, content type, body shape). Bounded
examples per operation, derandomized, so the run is repeatable. No operation is excluded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.control.conftest import client_for, make_user

FUZZ_EXAMPLES = 8


schema = schemathesis.openapi.from_wsgi("/api/v1/schema/", WSGIHandler())


@pytest.fixture
def keep_test_connection() -> Iterator[None]:
    """The WSGI handler closes the database connection after each request; in a test that is the
    test's own transaction (Django's test client disconnects the same signal)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture(params=["member", "admin"])
def caller_token(request: pytest.FixtureRequest, project: Any) -> str:
    """One caller per operation's test (hypothesis runs every example inside it): a member of the
    project, or a cloud admin."""
    user = make_user("fuzzer", project, admin=request.param == "admin")
    return str(client_for(user)._credentials["HTTP_AUTHORIZATION"])


@pytest.mark.usefixtures("keep_test_connection", "outbox", "image", "flavors")
@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: Any, caller_token: str) -> None:
    case.call_and_validate(headers={"Authorization": caller_token},
                           checks=[not_a_server_error, status_code_conformance,
                                   content_type_conformance, response_schema_conformance])
