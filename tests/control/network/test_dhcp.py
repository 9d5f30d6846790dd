"""The control plane's side of DHCP: the network's DHCP port (made with its first DHCP subnet, an
address in each, gone with the last) and ``compute.network_dhcp_sync`` sent to NETWORK_DHCP_HOST when
the change commits, carrying the whole DhcpNetworkSpec."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from rest_framework.test import APIClient

from cloudctl.network import dhcp, rpc, services
from cloudctl.network.errors import NetworkConflict
from cloudctl.network.models import DEVICE_OWNER_DHCP, Network, Port, Subnet
from compute_workers import contract
from tests.control.conftest import Outbox

API = "/api/v1"
SPEC_KEYS = set(typing.get_type_hints(contract.DhcpNetworkSpec))
SUBNET_KEYS = set(typing.get_type_hints(contract.DhcpSubnet))
HOST_KEYS = set(typing.get_type_hints(contract.DhcpHost))
FIXED_KEYS = set(typing.get_type_hints(contract.FixedIPSpec))

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _dhcp_host(settings: Any) -> None:
    settings.NETWORK_DHCP_HOST = "netnode"
    settings.NETWORK_DHCP_LEASE_SECONDS = 3600


def syncs(outbox: Outbox) -> list[dict[str, Any]]:
    """The DHCP syncs sent, each checked against the contract's shape and host."""
    sent = []
    for host, task, kwargs in outbox.compute:
        if task != contract.COMPUTE_NETWORK_DHCP_SYNC:
            continue
        assert host == "netnode"
        assert set(kwargs) == {"network"}
        spec = kwargs["network"]
        assert set(spec) == SPEC_KEYS
        assert all(set(s) == SUBNET_KEYS for s in spec["subnets"])
        assert all(set(h) == HOST_KEYS for h in spec["hosts"])
        assert spec["dhcp_port"] is None or set(spec["dhcp_port"]) == FIXED_KEYS
        sent.append(spec)
    outbox.compute.clear()
    return sent


def network(admin: Any, project: Any) -> Network:
    return services.network_create(user=admin, project=project, name="private")


def subnet(admin: Any, net: Network, cidr: str = "10.0.0.0/24", **kw: Any) -> Subnet:
    return services.subnet_create(user=admin, network=net, cidr=cidr, **kw)


def dhcp_port(net: Network) -> Port | None:
    return Port.objects.filter(network=net, device_owner=DEVICE_OWNER_DHCP).first()


def test_the_first_dhcp_subnet_makes_the_dhcp_port_and_sends_the_full_spec(
        admin, project, outbox: Outbox, commit):
    net = network(admin, project)
    with commit():
        sub = subnet(admin, net, dns_nameservers=["9.9.9.9"])
    port = dhcp_port(net)
    assert port is not None
    assert (port.device_id, port.binding_host, port.project_id) == (f"dhcp{net.id}", "netnode", project.pk)
    assert [f.ip_address for f in port.fixed_ips.all()] == ["10.0.0.2"]
    [spec] = syncs(outbox)
    assert spec == {
        "network_id": str(net.id), "deleted": False, "bridge": contract.bridge_name(str(net.id)),
        "provider_type": "vxlan", "segmentation_id": net.segmentation_id, "mtu": 1450,
        "dhcp_port": {"ip_address": "10.0.0.2", "subnet_id": str(sub.id), "cidr": "10.0.0.0/24",
                      "gateway_ip": "10.0.0.1"},
        "dhcp_mac": port.mac_address,
        "subnets": [{"subnet_id": str(sub.id), "cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1",
                     "dns_nameservers": ["9.9.9.9"]}],
        "hosts": [], "lease_seconds": 3600,
    }
    # A second DHCP subnet: the same port gets an address there too; one sync for the transaction.
    with commit():
        second = subnet(admin, net, "10.1.0.0/24")
    assert Port.objects.filter(network=net, device_owner=DEVICE_OWNER_DHCP).count() == 1
    assert sorted(f.ip_address for f in port.fixed_ips.all()) == ["10.0.0.2", "10.1.0.2"]
    [spec] = syncs(outbox)
    assert [s["subnet_id"] for s in spec["subnets"]] == [str(sub.id), str(second.id)]


def test_a_subnet_without_dhcp_makes_no_port_and_sends_nothing(admin, project, outbox: Outbox, commit):
    net = network(admin, project)
    with commit():
        subnet(admin, net, enable_dhcp=False)
        services.port_create(user=admin, project=project, network=net)
    assert dhcp_port(net) is None
    assert syncs(outbox) == []


def test_server_ports_are_hosts_and_leave_when_deleted(admin, project, api: APIClient, outbox: Outbox,
                                                       flavors, image, commit):
    net = network(admin, project)
    with commit():
        subnet(admin, net)
    syncs(outbox)
    with commit():
        server = api.post(f"{API}/servers/", {"name": "Web_01.example", "flavor": "m1.nano",
                                              "image": "tiny", "networks": [{"network": str(net.id)}]},
                          format="json")
    assert server.status_code == 202, server.content
    port = Port.objects.get(device_id=server.json()["id"])
    [spec] = syncs(outbox)
    assert spec["hosts"] == [{"mac_address": port.mac_address, "ip_address": "10.0.0.3",
                              "hostname": "web-01-example"}]
    # A port that is not a server's: host-<ip>.
    with commit():
        plain = services.port_create(user=admin, project=project, network=net)
    [spec] = syncs(outbox)
    assert spec["hosts"][1] == {"mac_address": plain.mac_address, "ip_address": "10.0.0.4",
                                "hostname": "host-10-0-0-4"}
    with commit():
        services.port_delete(port=plain, user=admin)
    [spec] = syncs(outbox)
    assert [h["ip_address"] for h in spec["hosts"]] == ["10.0.0.3"]
    with commit():
        assert api.delete(f"{API}/servers/{server.json()['id']}/").status_code == 204
    [spec] = syncs(outbox)
    assert spec["hosts"] == [] and not spec["deleted"]


def test_the_dhcp_port_is_not_deleted_by_hand(admin, project, outbox: Outbox):
    net = network(admin, project)
    subnet(admin, net)
    port = dhcp_port(net)
    assert port is not None
    with pytest.raises(NetworkConflict, match="DHCP port"):
        services.port_delete(port=port, user=admin)


def test_the_last_dhcp_subnet_gone_removes_the_port_and_sends_deleted(
        admin, project, outbox: Outbox, commit):
    net = network(admin, project)
    with commit():
        dhcp_sub = subnet(admin, net)
        plain = subnet(admin, net, "10.1.0.0/24", enable_dhcp=False)
    syncs(outbox)
    with commit():
        services.subnet_delete(subnet=dhcp_sub, user=admin)
    assert dhcp_port(net) is None
    [spec] = syncs(outbox)
    assert spec["deleted"] is True and spec["network_id"] == str(net.id)
    assert spec["bridge"] == contract.bridge_name(str(net.id)) and spec["dhcp_port"] is None
    # Turning DHCP on and off again on the remaining subnet.
    with commit():
        services.subnet_update(subnet=plain, user=admin, enable_dhcp=True)
    port = dhcp_port(net)
    assert port is not None and [f.ip_address for f in port.fixed_ips.all()] == ["10.1.0.2"]
    [spec] = syncs(outbox)
    assert not spec["deleted"] and spec["dhcp_port"]["subnet_id"] == str(plain.id)
    with commit():
        services.subnet_update(subnet=plain, user=admin, enable_dhcp=False)
    assert dhcp_port(net) is None
    [spec] = syncs(outbox)
    assert spec["deleted"] is True


def test_deleting_the_network_sends_deleted(admin, project, outbox: Outbox, commit):
    net = network(admin, project)
    with commit():
        subnet(admin, net)
    syncs(outbox)
    net_id = str(net.id)
    with commit():
        services.network_delete(network=net, user=admin)
    assert not Port.objects.filter(network_id=net_id).exists()
    [spec] = syncs(outbox)
    assert spec["deleted"] is True and spec["network_id"] == net_id and spec["mtu"] == 1450


def test_nothing_is_sent_before_commit_and_a_transaction_sends_one_sync(admin, project, outbox: Outbox,
                                                            django_capture_on_commit_callbacks):
    net = network(admin, project)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        subnet(admin, net)
        services.port_create(user=admin, project=project, network=net)
        services.port_create(user=admin, project=project, network=net)
    assert syncs(outbox) == []
    dhcp_syncs = [c for c in callbacks if isinstance(c, rpc.CommitSync) and c.key[0] == "dhcp"]
    assert len(dhcp_syncs) == 1, "one sync per transaction"


def test_hostnames():
    assert dhcp.hostname_of("My Server", "10.0.0.5") == "my-server"
    assert dhcp.hostname_of("___", "10.0.0.5") == "host-10-0-0-5"
    assert len(dhcp.hostname_of("x" * 100, "10.0.0.5")) == 63
