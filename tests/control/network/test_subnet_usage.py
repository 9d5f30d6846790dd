"""Address use per subnet (selectors.subnets_usage): what the dashboard's subnet table and the admin's
subnet list show, counted for every subnet in two queries."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from cloudctl.identity.models import Project
from cloudctl.network import selectors, services
from cloudctl.network.models import Subnet
from cloudctl.network.services import FixedIPRequest

pytestmark = pytest.mark.django_db


@pytest.fixture
def subnets(admin: Any, project: Project) -> dict[str, Subnet]:
    """web 10.1.0.0/24 (DHCP port .2; a port holding two addresses; two ports of one; a port
    without address), web 10.1.1.0/28 (no DHCP, no port), db 10.2.0.0/29 (no DHCP, one port)."""
    web = services.network_create(user=admin, project=project, name="web")
    db = services.network_create(user=admin, project=project, name="db")
    busy = services.subnet_create(user=admin, network=web, cidr="10.1.0.0/24")
    empty = services.subnet_create(user=admin, network=web, cidr="10.1.1.0/28", enable_dhcp=False)
    small = services.subnet_create(user=admin, network=db, cidr="10.2.0.0/29", enable_dhcp=False)
    services.port_create(user=admin, project=project, network=web, name="two", fixed_ips=[
        FixedIPRequest(subnet=busy), FixedIPRequest(subnet=busy, ip_address="10.1.0.200")])
    for name in ("a", "b"):
        services.port_create(user=admin, project=project, network=web, name=name,
                             fixed_ips=[FixedIPRequest(subnet=busy)])
    services.port_create(user=admin, project=project, network=web, name="none", fixed_ips=[])
    services.port_create(user=admin, project=project, network=db, name="db1")
    return {"busy": busy, "empty": empty, "small": small}


def test_used_pool_size_percent_and_ports_of_each_subnet_in_two_queries(
        subnets, django_assert_num_queries):
    with django_assert_num_queries(2):
        rows = selectors.subnets_usage()
        shown = [(u.subnet.network.name, u.subnet.cidr, u.used, u.pool_size, u.percent, u.ports)
                 for u in rows]
    assert shown == [
        ("db", "10.2.0.0/29", 1, 5, 20.0, 1),         # .2-.6: the gateway .1 is not in the pool
        ("web", "10.1.0.0/24", 5, 253, 2.0, 4),       # DHCP .2, "two" .3 and .200, "a" .4, "b" .5
        ("web", "10.1.1.0/28", 0, 13, 0.0, 0),
    ]
    # A subnet not read through subnets_with_usage says the same (a query of its own).
    assert selectors.subnet_usage(Subnet.objects.get(pk=subnets["busy"].pk)) == rows[1]


def test_the_dashboard_and_the_subnet_list_show_it(admin, subnets, django_assert_max_num_queries):
    staff = Client()
    staff.force_login(admin)
    page = staff.get("/admin/dashboard/")
    assert page.status_code == 200
    row = page.content.decode().split(f'id="subnet-{subnets["busy"].pk}"', 1)[1].split("</tr>", 1)[0]
    assert "10.1.0.0/24" in row and ">web</a>" in row
    assert "<em>5 / 253</em>" in row
    assert '<td class="percent">2.0 %</td>' in row and '<td class="ports">4</td>' in row

    changelist = staff.get("/admin/network/subnet/").content.decode()
    assert "5 / 253 (2 %)" in changelist and "1 / 5 (20 %)" in changelist and "0 / 13 (0 %)" in changelist
    # The list costs the same whatever the number of subnets: no query per row.
    with django_assert_max_num_queries(12) as few:
        staff.get("/admin/network/subnet/")
    for index in range(5):
        services.subnet_create(user=admin, network=subnets["busy"].network,
                               cidr=f"10.1.{10 + index}.0/28", enable_dhcp=False)
    with django_assert_max_num_queries(len(few.captured_queries)):
        staff.get("/admin/network/subnet/")
