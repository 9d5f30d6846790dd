"""Routers and floating IPs (Neutron's L3) in the control plane: /api/v1/routers/ (gateway, interfaces)
and floating-ips/ (allocate, associate, disassociate, release) with every refusal, the RouterSpec
sent to NETWORK_NODE_HOST at commit (once per router and transaction), servers' floating addresses,
a server's deletion unmapping its floating IPs, the network node's resync after host_init, and the
demo seed of ``make run``."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from rest_framework.test import APIClient

from cloudctl.compute import recovery
from cloudctl.identity.models import Project
from cloudctl.network import demo, l3, routers, services
from cloudctl.network.errors import FixedIPHasFloatingIP
from cloudctl.network.models import (
    DEVICE_OWNER_FLOATINGIP,
    DEVICE_OWNER_ROUTER_GATEWAY,
    DEVICE_OWNER_ROUTER_INTERFACE,
    FloatingIP,
    Network,
    Port,
    Router,
    Subnet,
)
from compute_workers import contract
from tests.control.conftest import Outbox, client_for, make_user, run_concurrently

API = "/api/v1"
SPEC_KEYS = set(typing.get_type_hints(contract.RouterSpec))
PORT_KEYS = set(typing.get_type_hints(contract.RouterPortSpec))
FIP_KEYS = set(typing.get_type_hints(contract.FloatingIPSpec))

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("_network_node")]


@pytest.fixture
def _network_node(settings: Any) -> None:
    settings.NETWORK_NODE_HOST = "netnode"
    settings.NETWORK_DHCP_HOST = "dhcpnode"


@pytest.fixture
def commit(django_capture_on_commit_callbacks: Any) -> Callable[[], Any]:
    """``with commit():`` runs the block's commit callbacks at its end, as a real commit does."""

    @contextmanager
    def committed() -> Iterator[None]:
        start = len(connection.run_on_commit)
        with django_capture_on_commit_callbacks(execute=True):
            yield
        del connection.run_on_commit[start:]

    return committed


def router_syncs(outbox: Outbox) -> list[dict[str, Any]]:
    """The router syncs sent (each checked against the contract's shape and host), then forgotten."""
    sent = []
    for host, task, kwargs in outbox.compute:
        if task != contract.COMPUTE_NETWORK_ROUTER_SYNC:
            continue
        assert host == "netnode"
        assert set(kwargs) == {"router"}
        spec = kwargs["router"]
        assert set(spec) == SPEC_KEYS
        assert spec["gateway"] is None or set(spec["gateway"]) == PORT_KEYS
        assert all(set(i) == PORT_KEYS for i in spec["interfaces"])
        assert all(set(f) == FIP_KEYS for f in spec["floating_ips"])
        sent.append(spec)
    outbox.compute.clear()
    return sent


def post(api: APIClient, path: str, **body: Any) -> Any:
    return api.post(f"{API}/{path}/", body, format="json")


@pytest.fixture
def other_api(other_project: Project) -> APIClient:
    return client_for(make_user("bob", other_project))


@pytest.fixture
def public(admin_api: APIClient) -> dict[str, Any]:
    """The external network (admin's, flat) with 172.24.4.0/24, pool .10-.250, no DHCP."""
    net = post(admin_api, "networks", name="public", external=True, shared=True, provider_type="flat")
    assert net.status_code == 201, net.content
    sub = post(admin_api, "subnets", network="public", cidr="172.24.4.0/24", gateway_ip="172.24.4.1",
               allocation_pools=[{"start": "172.24.4.10", "end": "172.24.4.250"}], enable_dhcp=False)
    assert sub.status_code == 201, sub.content
    return {**net.json(), "subnet": sub.json()}


def private(api: APIClient, name: str = "private", cidr: str = "10.0.0.0/24",
            **subnet: Any) -> dict[str, Any]:
    net = post(api, "networks", name=name)
    assert net.status_code == 201, net.content
    sub = post(api, "subnets", network=net.json()["id"], cidr=cidr, enable_dhcp=False, **subnet)
    assert sub.status_code == 201, sub.content
    return {**net.json(), "subnet": sub.json()}


def router(api: APIClient, gateway: Any = "public", *interfaces: dict[str, Any],
           name: str = "r1") -> dict[str, Any]:
    body: dict[str, Any] = {"name": name}
    if gateway is not None:
        body["external_gateway"] = gateway
    made = post(api, "routers", **body)
    assert made.status_code == 201, made.content
    for net in interfaces:
        added = post(api, f"routers/{made.json()['id']}/add-interface", subnet=net["subnet"]["id"])
        assert added.status_code == 200, added.content
    return api.get(f"{API}/routers/{made.json()['id']}/").json()


def boot(api: APIClient, network: str = "private", name: str = "web") -> dict[str, Any]:
    answer = post(api, "servers", name=name, flavor="m1.nano", image="tiny",
                  networks=[{"network": network}])
    assert answer.status_code == 202, answer.content
    return answer.json()


# --- routers -----------------------------------------------------------------------------------------


def test_router_with_gateway_and_interface(api, public, outbox: Outbox):
    net = private(api)
    made = post(api, "routers", name="r1", external_gateway="public")
    assert made.status_code == 201, made.content
    body = made.json()
    gateway = Port.objects.get(device_owner=DEVICE_OWNER_ROUTER_GATEWAY)
    assert body["external_gateway"] == {
        "network": public["id"], "enable_snat": True,
        "external_fixed_ips": [{"subnet": public["subnet"]["id"], "ip_address": "172.24.4.10"}]}
    assert (gateway.device_id, gateway.binding_host) == (body["id"], "netnode")
    assert gateway.project.name == "admin", "the external network's, as Neutron's tenant-less port"
    assert body["interfaces"] == [] and body["project"] == "blue" and body["status"] == "ACTIVE"

    added = post(api, f"routers/{body['id']}/add-interface", subnet=net["subnet"]["id"])
    assert added.status_code == 200, added.content
    interface = Port.objects.get(device_owner=DEVICE_OWNER_ROUTER_INTERFACE)
    assert added.json()["interfaces"] == [{"port": str(interface.id), "subnet": net["subnet"]["id"],
                                           "network": net["id"], "ip_address": "10.0.0.1"}]
    assert (interface.device_id, interface.binding_host, interface.project.name) == (
        body["id"], "netnode", "blue")
    assert list(interface.security_groups.all()) == []
    # The member sees the interface among its ports, not the gateway port.
    listed = {p["id"] for p in api.get(f"{API}/ports/").json()}
    assert str(interface.id) in listed and str(gateway.id) not in listed
    assert [r["id"] for r in api.get(f"{API}/routers/").json()] == [body["id"]]
    assert api.get(f"{API}/routers/?name=nope").json() == []

    # The router's ports are its own: the ports API does not delete them.
    refused = api.delete(f"{API}/ports/{interface.id}/")
    assert refused.status_code == 409 and "network:router_interface" in refused.json()["detail"]


def test_gateway_as_object_update_and_clear(api, public):
    body = router(api, {"network": public["id"], "enable_snat": False})
    assert body["external_gateway"]["enable_snat"] is False
    renamed = api.patch(f"{API}/routers/{body['id']}/", {"name": "edge"}, format="json")
    assert renamed.status_code == 200 and renamed.json()["name"] == "edge"
    assert renamed.json()["external_gateway"]["enable_snat"] is False, "unchanged by a rename"
    snat = api.patch(f"{API}/routers/{body['id']}/", {"external_gateway": {"network": "public"}},
                     format="json")
    assert snat.json()["external_gateway"]["enable_snat"] is True
    assert Port.objects.filter(device_owner=DEVICE_OWNER_ROUTER_GATEWAY).count() == 1, "port kept"
    cleared = api.patch(f"{API}/routers/{body['id']}/", {"external_gateway": None}, format="json")
    assert cleared.status_code == 200 and cleared.json()["external_gateway"] is None
    assert not Port.objects.filter(device_owner=DEVICE_OWNER_ROUTER_GATEWAY).exists()
    again = api.patch(f"{API}/routers/{body['id']}/", {"external_gateway": public["id"]}, format="json")
    assert again.json()["external_gateway"]["external_fixed_ips"][0]["ip_address"] == "172.24.4.10"
    without = router(api, None, name="plain")
    assert without["external_gateway"] is None


def test_router_validation(api, public):
    net = private(api)
    not_external = post(api, "routers", name="r", external_gateway=net["id"])
    assert not_external.status_code == 400
    assert "is not external" in not_external.json()["external_gateway"][0]
    unknown = post(api, "routers", name="r", external_gateway="nowhere")
    assert unknown.status_code == 400
    assert unknown.json()["external_gateway"] == ["no network with id or name 'nowhere'"]
    bad_key = post(api, "routers", name="r", external_gateway={"network": "public", "snat": False})
    assert bad_key.status_code == 400 and "snat" in bad_key.json()["external_gateway"][0]
    unknown_field = post(api, "routers", name="r", status="DOWN")
    assert unknown_field.status_code == 400 and unknown_field.json() == {"status": ["unknown field"]}
    assert not Router.objects.exists()


def test_interface_refusals(api, admin_api, other_api, public):
    net = private(api)
    r1 = router(api, "public", net)
    r2 = router(api, "public", name="r2")
    again = post(api, f"routers/{r1['id']}/add-interface", subnet=net["subnet"]["id"])
    assert again.status_code == 409
    assert again.json()["code"] == "subnet_in_use" and again.json()["router"] == r1["id"]
    elsewhere = post(api, f"routers/{r2['id']}/add-interface", subnet=net["subnet"]["id"])
    assert elsewhere.status_code == 409 and elsewhere.json()["router"] == r1["id"]
    assert f"is already on router {r1['id']}" in elsewhere.json()["detail"]

    no_gateway = private(api, "nogw", "10.5.0.0/24", gateway_ip=None)
    refused = post(api, f"routers/{r2['id']}/add-interface", subnet=no_gateway["subnet"]["id"])
    assert refused.status_code == 400 and "has no gateway_ip" in refused.json()["subnet"][0]

    external = post(api, f"routers/{r2['id']}/add-interface", subnet=public["subnet"]["id"])
    assert external.status_code == 400 and "external network" in external.json()["subnet"][0]

    theirs = private(other_api, "theirs", "10.7.0.0/24")
    hidden = post(api, f"routers/{r2['id']}/add-interface", subnet=theirs["subnet"]["id"])
    assert hidden.status_code == 400 and hidden.json()["subnet"][0].startswith("no subnet")

    overlapping = private(api, "overlap", "10.1.0.0/16")
    other_net = private(api, "second", "10.1.0.0/24")
    assert post(api, f"routers/{r2['id']}/add-interface",
                subnet=other_net["subnet"]["id"]).status_code == 200
    overlap = post(api, f"routers/{r2['id']}/add-interface", subnet=overlapping["subnet"]["id"])
    assert overlap.status_code == 400 and "overlaps" in overlap.json()["subnet"][0]

    # The gateway address held by a port that is no router's: 409 naming it.
    taken_net = private(admin_api, "taken", "10.8.0.0/24")
    holder = post(admin_api, "ports", network=taken_net["id"], device_owner="network:router_interface",
                  fixed_ips=[{"ip_address": "10.8.0.1"}])
    assert holder.status_code == 201, holder.content
    admin_router = router(admin_api, None, name="admin-r")
    taken = post(admin_api, f"routers/{admin_router['id']}/add-interface",
                 subnet=taken_net["subnet"]["id"])
    assert taken.status_code == 409
    assert taken.json()["code"] == "ip_address_in_use" and taken.json()["port"] == holder.json()["id"]

    missing = post(api, f"routers/{r2['id']}/remove-interface", subnet=net["subnet"]["id"])
    assert missing.status_code == 400 and "has no interface on subnet" in missing.json()["subnet"][0]


def test_deleting_a_router_subnet_or_network_with_an_interface_is_409(api, public, outbox: Outbox):
    net = private(api)
    body = router(api, "public", net)
    [interface] = body["interfaces"]
    refused = api.delete(f"{API}/routers/{body['id']}/")
    assert refused.status_code == 409
    assert refused.json()["code"] == "in_use" and refused.json()["ports"] == [interface["port"]]
    assert net["subnet"]["id"] in refused.json()["detail"]
    subnet = api.delete(f"{API}/subnets/{net['subnet']['id']}/")
    assert subnet.status_code == 409 and subnet.json()["ports"] == [interface["port"]]
    assert "network:router_interface" in subnet.json()["detail"]
    network = api.delete(f"{API}/networks/{net['id']}/")
    assert network.status_code == 409 and network.json()["ports"] == [interface["port"]]

    removed = post(api, f"routers/{body['id']}/remove-interface", subnet=net["subnet"]["id"])
    assert removed.status_code == 200 and removed.json()["interfaces"] == []
    assert not Port.objects.filter(device_owner=DEVICE_OWNER_ROUTER_INTERFACE).exists()
    assert api.delete(f"{API}/routers/{body['id']}/").status_code == 204
    assert not Port.objects.filter(device_owner=DEVICE_OWNER_ROUTER_GATEWAY).exists()
    assert api.delete(f"{API}/networks/{net['id']}/").status_code == 204


def test_other_projects_routers_are_404(api, other_api, public):
    body = router(api, "public")
    theirs = private(other_api, "theirs", "10.7.0.0/24")
    assert other_api.get(f"{API}/routers/{body['id']}/").status_code == 404
    assert other_api.get(f"{API}/routers/").json() == []
    assert other_api.patch(f"{API}/routers/{body['id']}/", {"name": "x"}, format="json").status_code == 404
    assert other_api.delete(f"{API}/routers/{body['id']}/").status_code == 404
    assert post(other_api, f"routers/{body['id']}/add-interface",
                subnet=theirs["subnet"]["id"]).status_code == 404


# --- floating IPs ------------------------------------------------------------------------------------


def test_floating_ip_lifecycle_with_a_server(api, public, flavors, image, outbox: Outbox):
    net = private(api)
    body = router(api, "public", net)
    server = boot(api)
    fip = post(api, "floating-ips", network="public")
    assert fip.status_code == 201, fip.content
    allocated = fip.json()
    assert allocated["floating_ip_address"] == "172.24.4.11", "after the router's gateway (.10)"
    assert (allocated["floating_network"], allocated["status"], allocated["project"]) == (
        public["id"], "DOWN", "blue")
    assert allocated["port"] is None and allocated["router"] is None and allocated["server"] is None
    assert allocated["fixed_ip_address"] is None
    holder = Port.objects.get(device_owner=DEVICE_OWNER_FLOATINGIP)
    assert (holder.device_id, holder.binding_host) == (allocated["id"], "netnode")

    fixed_port = Port.objects.get(device_id=server["id"])
    associated = post(api, f"floating-ips/{allocated['id']}/associate", server=server["id"])
    assert associated.status_code == 200, associated.content
    assert associated.json() | {"updated": None} == allocated | {
        "port": str(fixed_port.id), "fixed_ip_address": "10.0.0.2", "router": body["id"],
        "server": server["id"], "status": "ACTIVE", "updated": None}
    shown = api.get(f"{API}/servers/{server['id']}/").json()["addresses"]
    assert shown == {"private": [
        {"addr": "10.0.0.2", "version": 4, "mac": fixed_port.mac_address, "type": "fixed"},
        {"addr": "172.24.4.11", "version": 4, "mac": fixed_port.mac_address, "type": "floating"}]}
    listed = api.get(f"{API}/servers/").json()
    assert listed[0]["addresses"] == shown
    assert [f["id"] for f in api.get(f"{API}/floating-ips/?port={fixed_port.id}").json()] == [
        allocated["id"]]

    # One floating IP per fixed IP.
    second = post(api, "floating-ips", network="public", server=server["id"])
    assert second.status_code == 409
    assert second.json()["code"] == "floating_ip_in_use" and second.json()["floating_ip"] == allocated["id"]
    assert FloatingIP.objects.count() == 1, "the refused allocation left nothing"

    # Disassociated: allocated still, unmapped.
    off = post(api, f"floating-ips/{allocated['id']}/disassociate")
    assert off.status_code == 200
    assert (off.json()["status"], off.json()["port"], off.json()["router"], off.json()["server"]) == (
        "DOWN", None, None, None)
    assert [e["type"] for e in api.get(f"{API}/servers/{server['id']}/").json()["addresses"]["private"]] == [
        "fixed"]
    # Allocated and associated in one request, by port.
    both = post(api, "floating-ips", network=public["id"], port=str(fixed_port.id), fixed_ip="10.0.0.2")
    assert both.status_code == 201 and both.json()["status"] == "ACTIVE"
    assert both.json()["floating_ip_address"] == "172.24.4.12"
    # Released: its address free at once.
    assert api.delete(f"{API}/floating-ips/{allocated['id']}/").status_code == 204
    assert not Port.objects.filter(device_id=allocated["id"]).exists()
    assert post(api, "floating-ips", network="public").json()["floating_ip_address"] == "172.24.4.11"


def test_floating_ip_refusals(api, other_api, admin_api, public, flavors, image):
    net = private(api)
    body = router(api, "public", net)
    lonely = private(api, "lonely", "10.3.0.0/24")
    server = boot(api)
    stranded = boot(api, "lonely", name="stranded")

    not_external = post(api, "floating-ips", network="private")
    assert not_external.status_code == 400 and "is not external" in not_external.json()["network"][0]
    unknown = post(api, "floating-ips", network="nowhere")
    assert unknown.status_code == 400
    assert unknown.json()["network"] == ["no network with id or name 'nowhere'"]

    private(other_api, "theirs", "10.7.0.0/24")
    theirs = boot(other_api, network="theirs")
    hidden = post(api, "floating-ips", network="public", server=theirs["id"])
    assert hidden.status_code == 400 and hidden.json()["server"] == [f"no server with id {theirs['id']}"]
    their_port = Port.objects.get(device_id=theirs["id"])
    hidden_port = post(api, "floating-ips", network="public", port=str(their_port.id))
    assert hidden_port.status_code == 400 and hidden_port.json()["port"][0].startswith("no port")

    unreachable = post(api, "floating-ips", network="public", server=stranded["id"])
    assert unreachable.status_code == 409
    assert unreachable.json()["code"] == "external_network_unreachable"
    assert f"server {stranded['id']} has no port on a subnet" in unreachable.json()["detail"]
    lonely_port = Port.objects.get(device_id=stranded["id"])
    by_port = post(api, "floating-ips", network="public", port=str(lonely_port.id))
    assert by_port.status_code == 409
    assert by_port.json()["detail"] == (f"external network {public['id']} (public) is not reachable from "
                                        f"subnet {lonely['subnet']['id']}")

    wrong_ip = post(api, "floating-ips", network="public", server=server["id"], fixed_ip="10.0.0.99")
    assert wrong_ip.status_code == 400 and "has no fixed IP 10.0.0.99" in wrong_ip.json()["fixed_ip"][0]
    both = post(api, "floating-ips", network="public", server=server["id"],
                port=str(lonely_port.id))
    assert both.status_code == 400 and "not both" in both.json()["port"][0]
    interface = body["interfaces"][0]["port"]
    router_port = post(admin_api, "floating-ips", network="public", port=interface)
    assert router_port.status_code == 400 and "network:router_interface" in router_port.json()["port"][0]
    ip_alone = post(api, "floating-ips", network="public", fixed_ip="10.0.0.2")
    assert ip_alone.status_code == 400 and "fixed_ip" in ip_alone.json()
    assert FloatingIP.objects.count() == 0
    assert not Port.objects.filter(device_owner=DEVICE_OWNER_FLOATINGIP).exists()

    fip = post(api, "floating-ips", network="public").json()
    assert other_api.get(f"{API}/floating-ips/{fip['id']}/").status_code == 404
    assert other_api.delete(f"{API}/floating-ips/{fip['id']}/").status_code == 404
    assert post(other_api, f"floating-ips/{fip['id']}/associate", server=theirs["id"]).status_code == 404
    nothing = post(api, f"floating-ips/{fip['id']}/associate")
    assert nothing.status_code == 400 and "server" in nothing.json()


def test_pool_exhausted_says_so(api, admin_api):
    ext = post(admin_api, "networks", name="tiny-ext", external=True).json()
    sub = post(admin_api, "subnets", network=ext["id"], cidr="192.0.2.0/30", enable_dhcp=False).json()
    assert post(api, "floating-ips", network="tiny-ext").status_code == 201
    full = post(api, "floating-ips", network="tiny-ext")
    assert full.status_code == 409
    assert full.json() == {"detail": f"subnet {sub['id']} has no free address in its allocation pools",
                           "code": "ip_address_exhausted"}
    bare = post(admin_api, "networks", name="bare-ext", external=True).json()
    no_subnet = post(api, "floating-ips", network=bare["id"])
    assert no_subnet.status_code == 409 and "has no subnet" in no_subnet.json()["detail"]


def test_mapped_floating_ips_block_the_interface_and_the_gateway(api, public, flavors, image):
    net = private(api)
    body = router(api, "public", net)
    server = boot(api)
    fip = post(api, "floating-ips", network="public", server=server["id"]).json()
    gone = post(api, f"routers/{body['id']}/remove-interface", subnet=net["subnet"]["id"])
    assert gone.status_code == 409
    assert gone.json()["code"] == "in_use" and gone.json()["floating_ips"] == [fip["id"]]
    cleared = api.patch(f"{API}/routers/{body['id']}/", {"external_gateway": None}, format="json")
    assert cleared.status_code == 409 and cleared.json()["floating_ips"] == [fip["id"]]
    assert api.delete(f"{API}/ports/{fip['port']}/").status_code == 204, "the fixed port may go"
    assert FloatingIP.objects.get(pk=fip["id"]).port is None
    assert post(api, f"routers/{body['id']}/remove-interface",
                subnet=net["subnet"]["id"]).status_code == 200


def test_external_network_with_gateways_stays_external(admin_api, api, public):
    router(api, "public")
    refused = admin_api.patch(f"{API}/networks/{public['id']}/", {"external": False}, format="json")
    assert refused.status_code == 409 and "cannot stop being external" in refused.json()["detail"]


# --- what the network node hears ---------------------------------------------------------------------


def test_router_spec_has_gateway_interfaces_and_floating_ips(api, public, flavors, image):
    net = private(api)
    body = router(api, "public", net)
    server = boot(api)
    fip = post(api, "floating-ips", network="public", server=server["id"]).json()
    post(api, "floating-ips", network="public")  # not associated: not in the spec
    gateway = Port.objects.get(device_owner=DEVICE_OWNER_ROUTER_GATEWAY)
    interface = Port.objects.get(device_owner=DEVICE_OWNER_ROUTER_INTERFACE)
    private_net = Network.objects.get(pk=net["id"])
    assert routers.router_spec(body["id"]) == {
        "router_id": body["id"], "deleted": False, "enable_snat": True,
        "gateway": {"port_id": str(gateway.id), "network_id": public["id"],
                    "bridge": contract.bridge_name(public["id"]), "provider_type": "flat",
                    "segmentation_id": None, "mtu": 1500, "mac_address": gateway.mac_address,
                    "ip_address": "172.24.4.10", "cidr": "172.24.4.0/24", "gateway_ip": "172.24.4.1"},
        "interfaces": [{"port_id": str(interface.id), "network_id": net["id"],
                        "bridge": contract.bridge_name(net["id"]), "provider_type": "vxlan",
                        "segmentation_id": private_net.segmentation_id, "mtu": 1450,
                        "mac_address": interface.mac_address, "ip_address": "10.0.0.1",
                        "cidr": "10.0.0.0/24", "gateway_ip": None}],
        "floating_ips": [{"floating_ip_id": fip["id"], "floating_ip_address": "172.24.4.11",
                          "fixed_ip_address": "10.0.0.2"}],
    }
    snatless = router(api, None, name="bare")
    assert routers.router_spec(snatless["id"]) == {
        "router_id": snatless["id"], "deleted": False, "gateway": None, "enable_snat": False,
        "interfaces": [], "floating_ips": []}
    assert routers.router_spec("00000000-0000-0000-0000-000000000000")["deleted"] is True


def test_each_change_sends_one_sync_at_commit(admin, project, outbox: Outbox, commit, public,
                                              django_capture_on_commit_callbacks):
    ext = Network.objects.get(pk=public["id"])
    net = services.network_create(user=admin, project=project, name="private")
    subnet = services.subnet_create(user=admin, network=net, cidr="10.0.0.0/24", enable_dhcp=False)
    # Create, gateway and interface in one transaction: nothing before commit, one sync.
    start = len(connection.run_on_commit)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        made = l3.router_create(user=admin, project=project, name="r",
                                gateway=l3.GatewayRequest(network=ext))
        l3.router_interface_add(router=made, user=admin, subnet=subnet)
        l3.router_update(router=made, user=admin, name="renamed")
    assert router_syncs(outbox) == []
    assert len([c for c in callbacks if isinstance(c, routers._Sync)]) == 1
    for callback in callbacks:
        callback()
    del connection.run_on_commit[start:]  # committed: no longer waiting
    [spec] = router_syncs(outbox)
    assert spec["router_id"] == str(made.id) and len(spec["interfaces"]) == 1 and spec["gateway"]

    port = services.port_create(user=admin, project=project, network=net)
    with commit():
        fip = l3.floating_ip_create(user=admin, project=project, network=ext)
    assert router_syncs(outbox) == [], "an unmapped floating IP is no router's business"
    with commit():
        l3.floating_ip_associate(floating_ip=fip, user=admin, association=l3.AssociationRequest(port=port))
    [spec] = router_syncs(outbox)
    assert spec["floating_ips"] == [{"floating_ip_id": str(fip.id), "floating_ip_address": "172.24.4.11",
                                     "fixed_ip_address": "10.0.0.2"}]
    with commit():
        l3.floating_ip_disassociate(floating_ip=fip, user=admin)
    assert router_syncs(outbox)[0]["floating_ips"] == []
    with commit():
        l3.floating_ip_associate(floating_ip=fip, user=admin, association=l3.AssociationRequest(port=port))
    router_syncs(outbox)
    with commit():
        services.port_delete(port=port, user=admin)
    assert router_syncs(outbox)[0]["floating_ips"] == [], "the fixed port deleted"
    with commit():
        l3.floating_ip_associate(floating_ip=fip, user=admin, association=l3.AssociationRequest(
            port=services.port_create(user=admin, project=project, network=net)))
    router_syncs(outbox)
    with commit():
        l3.floating_ip_delete(floating_ip=fip, user=admin)
    assert router_syncs(outbox)[0]["floating_ips"] == []
    with commit():
        l3.router_interface_remove(router=made, user=admin, subnet=subnet)
    assert router_syncs(outbox)[0]["interfaces"] == []
    with commit():
        l3.router_update(router=made, user=admin, gateway=l3.GatewayRequest(network=None))
    [spec] = router_syncs(outbox)
    assert spec["gateway"] is None and spec["enable_snat"] is False
    router_id = str(made.id)
    with commit():
        l3.router_delete(router=made, user=admin)
    assert router_syncs(outbox) == [{"router_id": router_id, "deleted": True, "gateway": None,
                                     "enable_snat": False, "interfaces": [], "floating_ips": []}]


def test_deleting_a_server_unmaps_its_floating_ip(api, public, flavors, image, outbox: Outbox, commit):
    with commit():
        net = private(api)
        body = router(api, "public", net)
        server = boot(api)
        fip = post(api, "floating-ips", network="public", server=server["id"]).json()
    outbox.compute.clear()
    with commit():
        assert api.delete(f"{API}/servers/{server['id']}/").status_code == 204
    kept = api.get(f"{API}/floating-ips/{fip['id']}/").json()
    assert (kept["status"], kept["port"], kept["fixed_ip_address"], kept["router"], kept["server"]) == (
        "DOWN", None, None, None, None)
    assert kept["floating_ip_address"] == fip["floating_ip_address"], "still allocated"
    [spec] = router_syncs(outbox)
    assert spec["router_id"] == body["id"] and spec["floating_ips"] == []


def test_the_network_node_gets_every_router_and_dhcp_network_after_host_init(
        admin, project, api, public, outbox: Outbox, commit):
    with commit():
        net = private(api)
        first, second = router(api, "public", net), router(api, None, name="r2")
        with_dhcp = services.network_create(user=admin, project=project, name="dhcp-net")
        services.subnet_create(user=admin, network=with_dhcp, cidr="10.9.0.0/24")
    outbox.compute.clear()
    with commit():
        recovery.host_init(host="other", reported={})
    assert outbox.compute == []
    with commit():
        recovery.host_init(host="netnode", reported={})
    assert sorted(s["router_id"] for s in router_syncs(outbox)) == sorted([first["id"], second["id"]])
    with commit():
        recovery.host_init(host="dhcpnode", reported={})
    assert [(host, kw["network"]["network_id"]) for host, task, kw in outbox.compute
            if task == contract.COMPUTE_NETWORK_DHCP_SYNC] == [("dhcpnode", str(with_dhcp.id))]


# --- the demo seed -----------------------------------------------------------------------------------


def test_bootstrap_seeds_the_demo_networks_once(db, outbox: Outbox, capsys, monkeypatch):
    monkeypatch.setenv("CLOUDCTL_ADMIN_PASSWORD", "seed-password-1")
    call_command("bootstrap", "--demo-network")
    call_command("bootstrap", "--demo-network")
    out = capsys.readouterr().out
    assert "demo networks: network public" in out and "all there already" in out
    public_net = Network.objects.get(name="public")
    assert (public_net.external, public_net.shared, public_net.provider_type) == (True, True, "flat")
    public_sub = Subnet.objects.get(network=public_net)
    assert (public_sub.cidr, public_sub.gateway_ip, public_sub.enable_dhcp) == (
        "172.24.4.0/24", "172.24.4.1", False)
    assert public_sub.allocation_pools == [{"start": "172.24.4.10", "end": "172.24.4.250"}]
    private_net = Network.objects.get(name="private")
    private_sub = Subnet.objects.get(network=private_net)
    assert (private_net.project.name, private_sub.cidr, private_sub.enable_dhcp) == (
        "admin", "10.0.0.0/24", True)
    seeded = Router.objects.get()
    assert seeded.name == "router1" and seeded.external_network == public_net
    [interface] = routers.interface_ports(seeded.pk)
    assert [f.ip_address for f in interface.fixed_ips.all()] == ["10.0.0.1"]
    assert Network.objects.count() == 2 and Subnet.objects.count() == 2
    assert not FloatingIP.objects.exists()
    # A seed that finds the router without its gateway gives it one again.
    l3.router_update(router=seeded, user=None, gateway=l3.GatewayRequest(network=None))
    result = demo.demo_networks_seed(user=get_user_model().objects.get(username="admin"),
                                     project=seeded.project)
    assert result.created == ["gateway of router1"]


def test_with_a_demo_user_the_private_network_and_router_are_the_demo_projects(
        db, outbox: Outbox, monkeypatch):
    """As DevStack: the demo user boots on `private` and routes through `router1`, both its project's;
    `public` stays the admin project's, shared and external."""
    from tests.control.conftest import client_for

    monkeypatch.setenv("CLOUDCTL_ADMIN_PASSWORD", "seed-password-1")
    monkeypatch.setenv("CLOUDCTL_DEMO_PASSWORD", "demo-password-1")
    call_command("bootstrap", "--demo-network", "--demo-user")
    assert Network.objects.get(name="public").project.name == "admin"
    assert Network.objects.get(name="private").project.name == "demo"
    assert Router.objects.get(name="router1").project.name == "demo"
    demo_api = client_for(get_user_model().objects.get(username="demo"))
    names = {n["name"] for n in demo_api.get("/api/v1/networks/").json()}
    assert names == {"public", "private"}
    assert [r["name"] for r in demo_api.get("/api/v1/routers/").json()] == ["router1"]


# --- the admin ---------------------------------------------------------------------------------------


def test_admin_pages_show_routers_floating_ips_and_pool_usage(api, admin, public, flavors, image):
    from django.test import Client

    net = private(api)
    body = router(api, "public", net)
    server = boot(api)
    fip = post(api, "floating-ips", network="public", server=server["id"]).json()
    staff = Client()
    staff.force_login(admin)
    for page in ("network/router/", f"network/router/{body['id']}/change/", "network/floatingip/",
                 f"network/floatingip/{fip['id']}/change/"):
        assert staff.get(f"/admin/{page}").status_code == 200, page
    detail = staff.get(f"/admin/network/router/{body['id']}/change/").content.decode()
    assert "10.0.0.1" in detail and "172.24.4.10" in detail and "172.24.4.11" in detail
    listing = staff.get("/admin/network/floatingip/").content.decode()
    assert "172.24.4.11" in listing and server["id"] in listing
    # public: the gateway (.10) and the floating IP (.11) of 241; private: the server only (the
    # interface holds the gateway address, outside the pools).
    subnets = staff.get("/admin/network/subnet/").content.decode()
    assert "2 / 241" in subnets and "1 / 253" in subnets
    refused = staff.post("/admin/network/router/", {"action": "delete_routers",
                                                    "_selected_action": [body["id"]]}, follow=True)
    assert "not deleted" in refused.content.decode() and Router.objects.exists()
    staff.post("/admin/network/floatingip/", {"action": "disassociate", "_selected_action": [fip["id"]]})
    assert FloatingIP.objects.get(pk=fip["id"]).port is None
    staff.post("/admin/network/floatingip/", {"action": "release", "_selected_action": [fip["id"]]})
    assert not FloatingIP.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_associations_to_one_fixed_ip_give_one_winner(admin, project, public):
    ext = Network.objects.get(pk=public["id"])
    net = services.network_create(user=admin, project=project, name="private")
    subnet = services.subnet_create(user=admin, network=net, cidr="10.0.0.0/24", enable_dhcp=False)
    made = l3.router_create(user=admin, project=project, gateway=l3.GatewayRequest(network=ext))
    l3.router_interface_add(router=made, user=admin, subnet=subnet)
    port = services.port_create(user=admin, project=project, network=net)
    fips = [l3.floating_ip_create(user=admin, project=project, network=ext) for _ in range(4)]

    def associate(fip: FloatingIP) -> str:
        try:
            l3.floating_ip_associate(floating_ip=fip, user=admin,
                                     association=l3.AssociationRequest(port=port))
        except FixedIPHasFloatingIP:
            return "409"
        return "ok"

    assert sorted(run_concurrently(associate, fips)) == ["409", "409", "409", "ok"]
    assert FloatingIP.objects.filter(port=port).count() == 1
