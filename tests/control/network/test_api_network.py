"""/api/v1/networks/, subnets/, ports/, security-groups/, security-group-rules/: status codes,
validation naming the field, project scoping, admin-only fields, filters."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from cloudctl.network.models import Network, Port, SecurityGroup
from tests.control.conftest import client_for, make_user

pytestmark = pytest.mark.django_db

API = "/api/v1"


def post(api: APIClient, path: str, **body: Any) -> Any:
    return api.post(f"{API}/{path}/", body, format="json")


@pytest.fixture
def other_api(other_project) -> APIClient:
    return client_for(make_user("bob", other_project))


def setup_network(api: APIClient, name: str = "private", cidr: str = "10.0.0.0/24") -> tuple[dict, dict]:
    net = post(api, "networks", name=name)
    assert net.status_code == 201, net.content
    # Without DHCP: a DHCP subnet's first free address goes to the network's DHCP port (test_dhcp).
    sub = post(api, "subnets", network=net.json()["id"], cidr=cidr, enable_dhcp=False)
    assert sub.status_code == 201, sub.content
    return net.json(), sub.json()


def test_create_network_subnet_port(api):
    net, sub = setup_network(api)
    assert net["provider_type"] == "vxlan" and net["segmentation_id"] == 1000 and net["mtu"] == 1450
    assert net["project"] == "blue" and net["status"] == "ACTIVE" and not net["shared"]
    assert sub["gateway_ip"] == "10.0.0.1" and sub["enable_dhcp"] is False
    assert sub["allocation_pools"] == [{"start": "10.0.0.2", "end": "10.0.0.254"}]
    assert api.get(f"{API}/networks/{net['id']}/").json()["subnets"] == [sub["id"]]
    port = post(api, "ports", network="private", name="vm-port", device_id="s1", device_owner="compute:nova")
    assert port.status_code == 201, port.content
    body = port.json()
    assert body["fixed_ips"] == [{"subnet": sub["id"], "ip_address": "10.0.0.2"}]
    assert body["mac_address"].startswith("fa:16:3e:") and body["status"] == "DOWN"
    assert body["binding_host"] == "" and body["admin_state_up"] is True
    default = SecurityGroup.objects.get(name="default")
    assert body["security_groups"] == [str(default.id)]


def test_fixed_ips_by_subnet_and_address(api):
    net, sub = setup_network(api)
    by_both = post(api, "ports", network=net["id"],
                   fixed_ips=[{"subnet": sub["id"], "ip_address": "10.0.0.50"}])
    assert by_both.json()["fixed_ips"] == [{"subnet": sub["id"], "ip_address": "10.0.0.50"}]
    by_address = post(api, "ports", network=net["id"], fixed_ips=[{"ip_address": "10.0.0.51"}])
    assert by_address.json()["fixed_ips"][0]["ip_address"] == "10.0.0.51"
    in_use = post(api, "ports", network=net["id"], fixed_ips=[{"ip_address": "10.0.0.50"}])
    assert in_use.status_code == 409
    assert in_use.json()["code"] == "ip_address_in_use" and in_use.json()["port"] == by_both.json()["id"]
    outside = post(api, "ports", network=net["id"],
                   fixed_ips=[{"subnet": sub["id"], "ip_address": "10.1.0.5"}])
    assert outside.status_code == 400 and "is not inside subnet" in outside.json()["fixed_ips"][0]
    empty = post(api, "ports", network=net["id"], fixed_ips=[{}])
    assert empty.status_code == 400 and "fixed_ips" in empty.json()
    # A NUL in a reference is a 400 (PostgreSQL cannot even look such a name up: it was a 500): the
    # JSON parser refuses it in any string; IdOrNameField refuses it too for non-JSON callers.
    nul = post(api, "ports", network=net["id"], fixed_ips=[{"subnet": "sub\x00net"}])
    assert nul.status_code == 400
    assert nul.json() == {"detail": "JSON strings may not contain the NUL character (\\u0000)"}


def test_an_exhausted_pool_answers_409_saying_so(api):
    net, sub = setup_network(api, cidr="10.0.0.0/30")
    assert post(api, "ports", network=net["id"]).status_code == 201
    full = post(api, "ports", network=net["id"])
    assert full.status_code == 409
    assert full.json() == {"detail": f"subnet {sub['id']} has no free address in its allocation pools",
                           "code": "ip_address_exhausted"}


def test_validation_errors_name_the_field(api):
    net, _ = setup_network(api)
    overlap = post(api, "subnets", network=net["id"], cidr="10.0.0.0/16")
    assert overlap.status_code == 400 and "overlaps 10.0.0.0/24" in overlap.json()["cidr"][0]
    gateway = post(api, "subnets", network=net["id"], cidr="10.5.0.0/24", gateway_ip="10.6.0.1")
    assert gateway.status_code == 400 and list(gateway.json()) == ["gateway_ip"]
    unknown = post(api, "subnets", network="nowhere", cidr="10.7.0.0/24")
    assert unknown.status_code == 400
    assert unknown.json() == {"network": ["no network with id or name 'nowhere'"]}
    mtu = post(api, "networks", name="big", mtu=9000)
    assert mtu.status_code == 400 and "mtu" in mtu.json()
    mac = post(api, "ports", network=net["id"], mac_address="zz")
    assert mac.status_code == 400 and "mac_address" in mac.json()
    stray = post(api, "networks", name="n", colour="red")
    assert stray.status_code == 400 and stray.json() == {"colour": ["unknown field"]}


@pytest.mark.parametrize("field", [{"external": True}, {"external": False}, {"provider_type": "flat"},
                                   {"segmentation_id": 1500}])
def test_admin_only_fields_are_400_for_members(api, admin_api, field):
    refused = post(api, "networks", name="n", **field)
    assert refused.status_code == 400
    assert refused.json() == {next(iter(field)): ["only administrators may set this field"]}
    assert not Network.objects.exists()
    assert post(admin_api, "networks", name="n", **field).status_code == 201


def test_admin_creates_flat_external_networks(admin_api):
    public = post(admin_api, "networks", name="public", external=True, provider_type="flat")
    assert public.status_code == 201
    shown = public.json()
    assert (shown["external"], shown["segmentation_id"], shown["mtu"]) == (True, None, 1500)


def test_another_projects_objects_are_404(api, other_api):
    net, sub = setup_network(api)
    port = post(api, "ports", network=net["id"]).json()
    group = post(api, "security-groups", name="web").json()
    for path in (f"networks/{net['id']}", f"subnets/{sub['id']}", f"ports/{port['id']}",
                 f"security-groups/{group['id']}", f"security-group-rules/{group['rules'][0]['id']}"):
        assert other_api.get(f"{API}/{path}/").status_code == 404, path
        assert other_api.delete(f"{API}/{path}/").status_code == 404, path
    assert other_api.get(f"{API}/networks/").json() == []
    assert other_api.get(f"{API}/ports/").json() == []
    refused = post(other_api, "ports", network=net["id"])
    assert refused.status_code == 400 and "network" in refused.json()


def test_shared_and_external_networks_are_visible_but_owned(api, other_api, admin_api):
    net, sub = setup_network(api)
    assert api.patch(f"{API}/networks/{net['id']}/", {"shared": True}, format="json").status_code == 200
    public = post(admin_api, "networks", name="public", external=True).json()
    seen = {n["name"] for n in other_api.get(f"{API}/networks/").json()}
    assert seen == {"private", "public"}
    assert other_api.get(f"{API}/subnets/{sub['id']}/").status_code == 200
    # a port of bob's project on alice's shared network
    port = post(other_api, "ports", network=net["id"])
    assert port.status_code == 201 and port.json()["project"] == "green"
    assert api.get(f"{API}/ports/{port.json()['id']}/").status_code == 404  # bob's port, not alice's
    # visible is not owned: changing it is 403
    renamed = other_api.patch(f"{API}/networks/{net['id']}/", {"name": "mine"}, format="json")
    assert renamed.status_code == 403 and renamed.json()["code"] == "forbidden"
    assert other_api.delete(f"{API}/networks/{net['id']}/").status_code == 403
    assert post(other_api, "subnets", network=net["id"], cidr="10.9.0.0/24").status_code == 403
    # an external network that is not shared: ports are for administrators
    assert post(other_api, "ports", network=public["id"]).status_code == 403


def test_admins_see_everything(api, admin_api):
    net, _ = setup_network(api)
    post(api, "ports", network=net["id"])
    assert [n["id"] for n in admin_api.get(f"{API}/networks/").json()] == [net["id"]]
    assert len(admin_api.get(f"{API}/ports/").json()) == 1


def test_filters(api):
    net, sub = setup_network(api)
    other, _ = setup_network(api, name="other", cidr="10.1.0.0/24")
    a = post(api, "ports", network=net["id"], name="a", device_id="server-1").json()
    post(api, "ports", network=other["id"], name="b", device_id="server-2")
    assert [p["id"] for p in api.get(f"{API}/ports/?network={net['id']}").json()] == [a["id"]]
    assert [p["id"] for p in api.get(f"{API}/ports/?device_id=server-1").json()] == [a["id"]]
    assert [p["name"] for p in api.get(f"{API}/ports/?name=b").json()] == ["b"]
    assert [s["id"] for s in api.get(f"{API}/subnets/?network={net['id']}").json()] == [sub["id"]]
    assert [n["name"] for n in api.get(f"{API}/networks/?name=other").json()] == ["other"]
    bad = api.get(f"{API}/ports/?network=xyz")
    assert bad.status_code == 400 and bad.json() == {"network": ["'xyz' is not an id"]}


def test_delete_conflicts_name_the_ports(api):
    net, sub = setup_network(api)
    port = post(api, "ports", network=net["id"], name="vm").json()
    busy = api.delete(f"{API}/networks/{net['id']}/")
    assert busy.status_code == 409 and busy.json()["ports"] == [port["id"]]
    assert port["id"] in busy.json()["detail"]
    busy_subnet = api.delete(f"{API}/subnets/{sub['id']}/")
    assert busy_subnet.status_code == 409 and busy_subnet.json()["ports"] == [port["id"]]
    assert api.delete(f"{API}/ports/{port['id']}/").status_code == 204
    assert api.delete(f"{API}/networks/{net['id']}/").status_code == 204
    assert api.get(f"{API}/subnets/{sub['id']}/").status_code == 404


def test_port_patch(api):
    net, _ = setup_network(api)
    port = post(api, "ports", network=net["id"]).json()
    web = post(api, "security-groups", name="web").json()
    changed = api.patch(f"{API}/ports/{port['id']}/", {"name": "renamed", "security_groups": ["web"],
                                                       "admin_state_up": False}, format="json")
    assert changed.status_code == 200, changed.content
    assert (changed.json()["name"], changed.json()["security_groups"], changed.json()["admin_state_up"]) == (
        "renamed", [web["id"]], False)
    fixed = api.patch(f"{API}/ports/{port['id']}/", {"fixed_ips": []}, format="json")
    assert fixed.status_code == 400 and fixed.json() == {"fixed_ips": ["cannot be changed after creation"]}
    assert Port.objects.get(pk=port["id"]).fixed_ips.count() == 1


def test_security_groups_api(api, other_api):
    listed = api.get(f"{API}/security-groups/").json()
    assert [g["name"] for g in listed] == ["default"]  # made on first need
    default = listed[0]
    assert {(r["direction"], r["remote_group"]) for r in default["rules"]} == {
        ("egress", None), ("ingress", default["id"])}
    assert api.get(f"{API}/security-groups/").json() == listed  # made once
    web = post(api, "security-groups", name="web", description="web servers").json()
    icmp = post(api, "security-group-rules", security_group=web["id"], direction="ingress",
                protocol="icmp", remote_ip_prefix="0.0.0.0/0")
    assert icmp.status_code == 201 and icmp.json()["protocol"] == "icmp"
    again = post(api, "security-group-rules", security_group=web["id"], direction="ingress",
                 protocol="icmp", remote_ip_prefix="0.0.0.0/0")
    assert again.status_code == 409
    bad = post(api, "security-group-rules", security_group=web["id"], direction="ingress",
               protocol="tcp", port_range_min=10, port_range_max=5)
    assert bad.status_code == 400 and "port_range_min" in bad.json()
    both = post(api, "security-group-rules", security_group=web["id"], direction="ingress",
                remote_ip_prefix="10.0.0.0/8", remote_group="default")
    assert both.status_code == 400 and "remote_group" in both.json()
    rules = api.get(f"{API}/security-group-rules/?security_group={web['id']}").json()
    assert len(rules) == 2  # the egress rule every new group gets, and icmp
    assert api.delete(f"{API}/security-group-rules/{icmp.json()['id']}/").status_code == 204
    refused = api.delete(f"{API}/security-groups/{default['id']}/")
    assert refused.status_code == 409 and "default group" in refused.json()["detail"]
    foreign = post(other_api, "security-group-rules", security_group=web["id"], direction="ingress")
    assert foreign.status_code == 400 and "security_group" in foreign.json()
    assert api.delete(f"{API}/security-groups/{web['id']}/").status_code == 204
    reserved = post(api, "security-groups", name="default")
    assert reserved.status_code == 400 and "name" in reserved.json()


def test_a_group_in_use_cannot_be_deleted(api):
    net, _ = setup_network(api)
    web = post(api, "security-groups", name="web").json()
    port = post(api, "ports", network=net["id"], security_groups=[web["id"]]).json()
    refused = api.delete(f"{API}/security-groups/{web['id']}/")
    assert refused.status_code == 409 and refused.json()["ports"] == [port["id"]]


def test_members_may_not_set_network_device_owners(api):
    net, _ = setup_network(api)
    refused = post(api, "ports", network=net["id"], device_owner="network:dhcp")
    assert refused.status_code == 400 and "device_owner" in refused.json()


def test_no_token_is_401(client):
    assert client.get(f"{API}/networks/").status_code == 401


def test_admin_pages_render_with_ip_usage_and_delete_through_the_services(api, admin):
    from django.test import Client

    net, sub = setup_network(api)
    port = post(api, "ports", network=net["id"]).json()
    staff = Client()
    staff.force_login(admin)
    for page in ("network/network/", f"network/network/{net['id']}/change/", "network/subnet/",
                 f"network/subnet/{sub['id']}/change/", "network/port/",
                 f"network/port/{port['id']}/change/", "network/securitygroup/"):
        assert staff.get(f"/admin/{page}").status_code == 200, page
    assert "1 / 253" in staff.get("/admin/network/subnet/").content.decode()
    refused = staff.post("/admin/network/network/", {"action": "delete_networks",
                                                     "_selected_action": [net["id"]]}, follow=True)
    assert "not deleted" in refused.content.decode() and Network.objects.exists()


def test_a_subnet_serves_dhcp_by_default_and_its_first_free_address_is_the_dhcp_port(api, outbox):
    net = post(api, "networks", name="dhcp-default").json()
    sub = post(api, "subnets", network=net["id"], cidr="10.9.0.0/24")
    assert sub.status_code == 201, sub.content
    assert sub.json()["enable_dhcp"] is True
    [dhcp] = [p for p in api.get(f"{API}/ports/?network={net['id']}").json()
              if p["device_owner"] == "network:dhcp"]
    assert [ip["ip_address"] for ip in dhcp["fixed_ips"]] == ["10.9.0.2"]
    port = post(api, "ports", network=net["id"], name="next")
    assert [ip["ip_address"] for ip in port.json()["fixed_ips"]] == ["10.9.0.3"]
