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


def test_concurrent_port_creates_respect_the_ports_quota(member, project, outbox: Outbox):
    api = client_for(member)
    net = api.post("/api/v1/networks/", {"name": "n"}, format="json").json()
    assert api.post("/api/v1/subnets/", {"network": net["id"], "cidr": "10.0.0.0/24"},
                    format="json").status_code == 201  # and its DHCP port, which does not count
    ProjectQuota.objects.create(project=project, resource="ports", limit=5)

    def create(i: int) -> Any:
        answer = client_for(member).post("/api/v1/ports/", {"network": net["id"]}, format="json")
        return answer.status_code, answer.json()

    results = run_concurrently(create, list(range(20)), timeout=120)
    assert Counter(status for status, _ in results) == {201: 5, 403: 15}
    assert all(body["in_use"] == 5 for status, body in results if status == 403)
    assert quota_usage(project)["ports"] == {"limit": 5, "in_use": 5}


def test_concurrent_security_group_creates_respect_their_quota(member, project):
    ProjectQuota.objects.create(project=project, resource="security_groups", limit=3)
    client_for(member)

    def create(i: int) -> int:
        return client_for(member).post("/api/v1/security-groups/", {"name": f"g{i}"},
                                       format="json").status_code

    assert Counter(run_concurrently(create, list(range(20)), timeout=120)) == {201: 3, 403: 17}
