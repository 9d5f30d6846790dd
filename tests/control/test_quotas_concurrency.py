"""Quotas under concurrency (PostgreSQL): creations in one project take turns on the project's row
between counting and commit, so 50 simultaneous creates never exceed a limit, and none is refused
while there is room."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from django.db import connection
from rest_framework.test import APIClient

from cloudctl.compute.models import Instance
from cloudctl.quotas.models import ProjectQuota
from cloudctl.quotas.services import quota_usage
from tests.control.conftest import Outbox, client_for, run_concurrently

pytestmark = pytest.mark.django_db(transaction=True)

CONCURRENT = 50


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("concurrency needs PostgreSQL's row locks (SQLite serialises whole transactions: "
                    "run with DATABASE_URL=postgres://...)")


def _create_all(member: Any, names: list[str]) -> list[Any]:
    def create(name: str) -> Any:
        api: APIClient = client_for(member)
        answer = api.post("/api/v1/servers/", {"name": name, "flavor": "m1.nano", "image": "tiny"},
                          format="json")
        return answer.status_code, answer.json()

    return run_concurrently(create, names, timeout=120)


def test_fifty_concurrent_creates_with_an_instances_quota_of_ten(member, project, flavors, image,
                                                                 outbox: Outbox):
    ProjectQuota.objects.create(project=project, resource="instances", limit=10)
    client_for(member)  # its token exists before the threads ask for it
    results = _create_all(member, [f"s{i}" for i in range(CONCURRENT)])
    assert len(results) == CONCURRENT
    assert Counter(status for status, _ in results) == {202: 10, 403: 40}
    for status, body in results:
        if status == 403:
            assert body == {"code": "quota_exceeded", "resource": "instances", "requested": 1,
                            "in_use": 10, "limit": 10,
                            "detail": "quota exceeded for instances: 1 requested, 10 in use of the "
                                      "project's limit of 10"}
    assert Instance.objects.filter(project=project).count() == 10
    assert len(outbox.scheduler) == 10, "only the accepted servers were sent to the scheduler"
    assert quota_usage(project)["instances"] == {"limit": 10, "in_use": 10}


def test_at_the_limit_minus_one_exactly_one_of_fifty_succeeds(member, project, flavors, image,
                                                              outbox: Outbox):
    ProjectQuota.objects.create(project=project, resource="instances", limit=10)
    api = client_for(member)
    for i in range(9):
        assert api.post("/api/v1/servers/", {"name": f"old{i}", "flavor": "m1.nano", "image": "tiny"},
                        format="json").status_code == 202
    results = _create_all(member, [f"s{i}" for i in range(CONCURRENT)])
    statuses = Counter(status for status, _ in results)
    assert statuses == {202: 1, 403: CONCURRENT - 1}, statuses
    refusals = [body for status, body in results if status == 403]
    # No false refusal: every refused request saw the project full.
    assert all((b["code"], b["in_use"], b["limit"]) == ("quota_exceeded", 10, 10) for b in refusals)
    assert Instance.objects.filter(project=project).count() == 10


def test_concurrent_creates_within_the_limit_are_all_accepted(member, project, flavors, image,
                                                              outbox: Outbox):
    ProjectQuota.objects.create(project=project, resource="instances", limit=CONCURRENT)
    ProjectQuota.objects.create(project=project, resource="cores", limit=CONCURRENT)
    client_for(member)
    results = _create_all(member, [f"s{i}" for i in range(CONCURRENT)])
    assert Counter(status for status, _ in results) == {202: CONCURRENT}
