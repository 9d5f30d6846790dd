"""The control plane's side of ``compute.network_host_sync``: what a host's state holds (its guests'
ports with their filtering resolved, its networks with the VXLAN peers), which hosts each change
sends it to (exactly those, once per transaction, built at commit), port security in the API, the
hosts' tunnel IPs, and the resyncs (a worker's restart, the beat task)."""

from __future__ import annotations

import typing
import uuid
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from cloudctl.compute import migration_reports, recovery
from cloudctl.compute import ports as server_ports
from cloudctl.compute import tasks as conductor_tasks
from cloudctl.compute.models import Host, Migration
from cloudctl.network import hostsync, services
from cloudctl.network import tasks as network_tasks
from cloudctl.network.models import Network, Port, SecurityGroup
from compute_workers import contract
from tests.control.conftest import Outbox, active_server, heartbeat, run_preflights

API = "/api/v1"
STATE_KEYS = set(typing.get_type_hints(contract.HostNetworkState))
NETWORK_KEYS = set(typing.get_type_hints(contract.HostNetwork))
PORT_KEYS = set(typing.get_type_hints(contract.NetworkSpec))
SECURITY_KEYS = set(typing.get_type_hints(contract.PortSecuritySpec))
RULE_KEYS = set(typing.get_type_hints(contract.SecurityRuleSpec))
TUNNELS = {"hv1": "192.0.2.1", "hv2": "192.0.2.2", "hv3": "", "netnode": "192.0.2.9"}

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _network_node(settings: Any) -> None:
    settings.NETWORK_DHCP_HOST = "netnode"


@pytest.fixture
def hosts(db: None) -> dict[str, Host]:
    """hv1, hv2 with tunnel IPs, hv3 without one (flat networks only), the network node."""
    return {name: heartbeat(name, tunnel_ip=ip) for name, ip in TUNNELS.items()}


def synced(outbox: Outbox) -> dict[str, contract.HostNetworkState]:
    """The states sent, by host (checked against the contract's shape, one per host), then forgotten."""
    sent: dict[str, contract.HostNetworkState] = {}
    for host, state in outbox.host_syncs:
        assert host not in sent, f"{host} was sent two states"
        assert set(state) == STATE_KEYS and state["host"] == host
        assert all(set(n) == NETWORK_KEYS for n in state["networks"])
        for port in state["ports"]:
            assert set(port) == PORT_KEYS and set(port["security"]) == SECURITY_KEYS
            assert all(set(rule) == RULE_KEYS for rule in port["security"]["rules"])
        sent[host] = state
    outbox.host_syncs.clear()
    return sent


def forget(outbox: Outbox) -> None:
    """Drop what the setup sent or left waiting for a commit (the test's transaction never commits:
    a sync left waiting would stand for the next change's)."""
    connection.run_on_commit.clear()
    outbox.host_syncs.clear()


def empty(state: contract.HostNetworkState) -> bool:
    return state["networks"] == [] and state["ports"] == []


def network(admin: Any, project: Any, name: str = "private", cidr: str = "10.0.0.0/24",
            dhcp: bool = True, **kw: Any) -> Network:
    net = services.network_create(user=admin, project=project, name=name, **kw)
    services.subnet_create(user=admin, network=net, cidr=cidr, enable_dhcp=dhcp)
    return net


def guest_port(admin: Any, project: Any, net: Network, host: str = "", *, server: str | None = None,
               **kw: Any) -> Port:
    """A server's port (``compute:nova``, NIC 0 of ``server``), bound to ``host``."""
    device = server or str(uuid.uuid4())
    port = services.port_create(user=admin, project=project, network=net, device_id=device,
                                device_owner="compute:nova", **kw)
    Port.objects.filter(pk=port.pk).update(binding_host=host, device_index=0)
    port.refresh_from_db()
    return port


def ip_of(port: Port) -> str:
    return port.fixed_ips.get().ip_address


def rule(group: SecurityGroup, admin: Any, **kw: Any) -> Any:
    return services.security_group_rule_create(user=admin, security_group=group, **kw)


ANY_EGRESS = {"direction": "egress", "ethertype": "IPv4", "protocol": None, "port_range_min": None,
              "port_range_max": None, "remote_ip_prefixes": None}


def ingress(prefixes: list[str] | None, protocol: str | None = None, low: int | None = None,
            high: int | None = None) -> dict[str, Any]:
    return {"direction": "ingress", "ethertype": "IPv4", "protocol": protocol, "port_range_min": low,
            "port_range_max": high, "remote_ip_prefixes": prefixes}


# --- the state -----------------------------------------------------------------------------------------


def test_a_hosts_state_resolves_rules_and_remote_groups_and_lists_vxlan_peers(admin, project, hosts):
    net = network(admin, project)
    flat = network(admin, project, "physnet", "172.16.0.0/24", dhcp=False, provider_type="flat")
    default = services.security_group_default(project=project)
    web = services.security_group_create(user=admin, project=project, name="web")
    rule(web, admin, direction="ingress", protocol="tcp", port_range_min=80, port_range_max=80,
         remote_group=default)
    rule(web, admin, direction="ingress", protocol="icmp", port_range_min=8,
         remote_ip_prefix="198.51.100.0/24")
    mine = guest_port(admin, project, net, "hv1", security_groups=[default, web])
    on_hv2 = guest_port(admin, project, net, "hv2")
    guest_port(admin, project, net, "hv3")  # no tunnel IP: no peer
    unbound = guest_port(admin, project, net)  # a member all the same (Neutron)
    on_flat = guest_port(admin, project, flat, "hv1", security_groups=[])
    guest_port(admin, project, flat, "hv2", security_groups=[])
    members = sorted((ip_of(p) for p in Port.objects.filter(security_groups=default)),
                     key=lambda ip: tuple(int(part) for part in ip.split(".")))
    assert len(members) == 4 and ip_of(unbound) in members

    state = hostsync.host_state("hv1")
    assert state["host"] == "hv1" and isinstance(state["generation"], int)
    assert state["networks"] == [
        {"network_id": str(net.id), "bridge": contract.bridge_name(str(net.id)), "provider_type": "vxlan",
         "segmentation_id": net.segmentation_id, "mtu": 1450,
         "peers": ["192.0.2.2", "192.0.2.9"]},  # hv2 and the network node's DHCP port; hv3 has none
        {"network_id": str(flat.id), "bridge": contract.bridge_name(str(flat.id)), "provider_type": "flat",
         "segmentation_id": None, "mtu": 1500, "peers": []},
    ]
    assert [p["port_id"] for p in state["ports"]] == [str(mine.id), str(on_flat.id)]
    spec = state["ports"][0]
    assert contract.validate_spec({**_spec_frame(), "networks": state["ports"]})
    assert (spec["mac_address"], spec["tap"], spec["bridge"]) == (
        mine.mac_address, contract.tap_name(str(mine.id)), contract.bridge_name(str(net.id)))
    assert spec["security"] == {
        "enabled": True,
        "allowed_addresses": [{"mac_address": mine.mac_address, "ip_address": ip_of(mine)}],
        "rules": [ANY_EGRESS,  # the default group's and web's egress: one rule
                  ingress([f"{ip}/32" for ip in members]),
                  ingress([f"{ip}/32" for ip in members], "tcp", 80, 80),
                  ingress(["198.51.100.0/24"], "icmp", 8, None)],
    }
    # No group: anti-spoofing, and nothing admitted.
    assert state["ports"][1]["security"] == {
        "enabled": True, "allowed_addresses": [{"mac_address": on_flat.mac_address,
                                                "ip_address": ip_of(on_flat)}], "rules": []}
    # The network node holds the DHCP port's network (a bridge) but filters no guest.
    node = hostsync.host_state("netnode")
    assert node["ports"] == [] and [n["network_id"] for n in node["networks"]] == [str(net.id)]
    assert node["networks"][0]["peers"] == ["192.0.2.1", "192.0.2.2"]
    assert hostsync.host_state("hv2")["networks"][0]["peers"] == ["192.0.2.1", "192.0.2.9"]
    assert empty(hostsync.host_state("nowhere"))
    assert hostsync.host_state("hv1")["generation"] > state["generation"]
    assert on_hv2.binding_host == "hv2"


def _spec_frame() -> dict[str, Any]:
    return {"version": 1, "instance_uuid": str(uuid.uuid4()), "name": "s", "host": "hv1",
            "flavor": {"name": "m1", "vcpus": 1, "memory_mb": 64, "root_gb": 1},
            "image": {"id": "i", "url": "http://x", "sha256": "0", "disk_format": "qcow2"}}


def test_a_remote_group_without_members_admits_nobody_and_port_security_off_filters_nothing(
        admin, project, hosts):
    net = network(admin, project, dhcp=False)
    lonely = services.security_group_create(user=admin, project=project, name="lonely")
    web = services.security_group_create(user=admin, project=project, name="web")
    rule(web, admin, direction="ingress", remote_group=lonely)
    guarded = guest_port(admin, project, net, "hv1", security_groups=[web])
    open_port = guest_port(admin, project, net, "hv1", port_security_enabled=False)
    assert list(open_port.security_groups.all()) == [], "no default group without port security"
    by_id = {p["port_id"]: p["security"] for p in hostsync.host_state("hv1")["ports"]}
    assert by_id[str(guarded.id)]["rules"] == [ANY_EGRESS, ingress([])]
    assert by_id[str(open_port.id)] == {"enabled": False, "allowed_addresses": [], "rules": []}
    assert hostsync.port_security(open_port) == by_id[str(open_port.id)]
    assert hostsync.port_security(guarded) == by_id[str(guarded.id)]


def test_a_port_migrating_to_a_host_is_in_its_state_and_a_peer_for_the_others(admin, project, hosts):
    net = network(admin, project, dhcp=False)
    port = guest_port(admin, project, net, "hv1")
    assert empty(hostsync.host_state("hv2"))
    Port.objects.filter(pk=port.pk).update(migrating_to="hv2")
    dest = hostsync.host_state("hv2")
    assert [p["port_id"] for p in dest["ports"]] == [str(port.id)]
    assert dest["ports"][0]["security"]["allowed_addresses"][0]["ip_address"] == ip_of(port)
    assert [(n["network_id"], n["peers"]) for n in dest["networks"]] == [(str(net.id), ["192.0.2.1"])]
    source = hostsync.host_state("hv1")
    assert [p["port_id"] for p in source["ports"]] == [str(port.id)], "still bound to the source"
    assert source["networks"][0]["peers"] == ["192.0.2.2"], "the source floods to the destination already"


def test_the_state_costs_the_same_queries_for_two_ports_or_ten(admin, project, hosts):
    net = network(admin, project)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            hostsync.host_state("hv1")
        return len(captured)

    for _ in range(2):
        guest_port(admin, project, net, "hv1")
    few = queries()
    for _ in range(8):
        guest_port(admin, project, net, "hv1")
        guest_port(admin, project, net, "hv2")
    assert queries() == few <= 10


# --- which hosts each change reaches -------------------------------------------------------------------


def test_nothing_is_sent_before_commit_and_each_host_once_per_transaction(admin, project, hosts, outbox,
                                                                        commit):
    net = network(admin, project, dhcp=False)
    web = services.security_group_create(user=admin, project=project, name="web")
    port = guest_port(admin, project, net, "hv1", security_groups=[web])
    forget(outbox)
    with commit():
        first = rule(web, admin, direction="ingress", protocol="tcp", port_range_min=22, port_range_max=22)
        rule(web, admin, direction="ingress", protocol="tcp", port_range_min=80, port_range_max=80)
        services.security_group_rule_delete(rule=first, user=admin)
        assert outbox.host_syncs == [], "sent when the transaction commits"
    sent = synced(outbox)
    assert list(sent) == ["hv1"]
    # Built at commit: the last word of the transaction.
    assert sent["hv1"]["ports"][0]["port_id"] == str(port.id)
    assert sent["hv1"]["ports"][0]["security"]["rules"] == [ANY_EGRESS, ingress(None, "tcp", 80, 80)]


def test_rules_reach_the_hosts_of_the_groups_ports_and_membership_the_hosts_naming_it_remote(
        admin, project, hosts, outbox, commit):
    net = network(admin, project, dhcp=False)
    web = services.security_group_create(user=admin, project=project, name="web")
    db = services.security_group_create(user=admin, project=project, name="db")
    rule(db, admin, direction="ingress", protocol="tcp", port_range_min=5432, port_range_max=5432,
         remote_group=web)
    front = guest_port(admin, project, net, "hv1", security_groups=[web])
    guest_port(admin, project, net, "hv2", security_groups=[db])
    other = guest_port(admin, project, net, "hv3", security_groups=[])
    forget(outbox)
    with commit():
        rule(web, admin, direction="ingress", protocol="icmp")
    assert list(synced(outbox)) == ["hv1"], "only the hosts of web's ports"
    # hv3's port joins web: its own host, and hv2 whose db rule admits web's members.
    with commit():
        services.port_update(port=other, user=admin, security_groups=[web])
    sent = synced(outbox)
    assert sorted(sent) == ["hv2", "hv3"]
    assert sent["hv2"]["ports"][0]["security"]["rules"][1]["remote_ip_prefixes"] == sorted(
        [f"{ip_of(front)}/32", f"{ip_of(other)}/32"])
    with commit():
        services.port_update(port=other, user=admin, name="renamed", security_groups=[web])
    assert synced(outbox) == {}, "same groups: nothing changed for any host"
    # A new member of web somewhere else (not bound): hv2's rule admits it now.
    with commit():
        unbound = services.port_create(user=admin, project=project, network=net, security_groups=[web])
    assert list(synced(outbox)) == ["hv2"]
    with commit():
        services.port_delete(port=unbound, user=admin)
    assert list(synced(outbox)) == ["hv2"], "bound nowhere: only the host admitting web's members"
    # A group named as remote_group goes: the rules naming it go with it.
    lonely = services.security_group_create(user=admin, project=project, name="lonely")
    rule(web, admin, direction="ingress", remote_group=lonely)
    forget(outbox)
    with commit():
        services.security_group_delete(group=lonely, user=admin)
    assert sorted(synced(outbox)) == ["hv1", "hv3"], "web's ports lost the rule"
    with commit():
        services.port_delete(port=front, user=admin)
    # Its host; hv2 whose rule admitted it; and hv2, hv3 whose peers lose hv1 (its last port there).
    assert sorted(synced(outbox)) == ["hv1", "hv2", "hv3"]


def test_port_security_toggles_reach_the_port_and_the_remote_group_hosts(admin, project, hosts, outbox,
                                                                         commit):
    net = network(admin, project, dhcp=False)
    guest_port(admin, project, net, "hv1")  # default group: its rule admits default's members
    port = guest_port(admin, project, net, "hv2")
    forget(outbox)
    with commit():
        services.port_update(port=port, user=admin, port_security_enabled=False, security_groups=[])
    sent = synced(outbox)
    assert sorted(sent) == ["hv1", "hv2"]
    assert sent["hv2"]["ports"][0]["security"]["enabled"] is False
    assert ip_of(port) not in str(sent["hv1"]["ports"][0]["security"]["rules"])
    with commit():
        services.port_update(port=port, user=admin, port_security_enabled=True)
    sent = synced(outbox)
    assert list(sent) == ["hv2"], "no group joined: only its own host"
    assert sent["hv2"]["ports"][0]["security"] == {
        "enabled": True, "allowed_addresses": [{"mac_address": port.mac_address, "ip_address": ip_of(port)}],
        "rules": []}


def test_bindings_reach_the_hosts_gaining_or_losing_a_port_and_their_vxlan_peers(admin, project, hosts,
                                                                               outbox, commit):
    net = network(admin, project)  # the network node holds its DHCP port
    flat = network(admin, project, "physnet", "172.16.0.0/24", dhcp=False, provider_type="flat")
    server = str(uuid.uuid4())
    port = guest_port(admin, project, net, server=server, security_groups=[])
    guest_port(admin, project, flat, "hv3", security_groups=[])
    forget(outbox)
    with commit():
        server_ports.server_ports_bind(server, "hv1")
    sent = synced(outbox)
    assert sorted(sent) == ["hv1", "netnode"], "hv1 joins the network: the node's peers change"
    assert sent["netnode"]["networks"][0]["peers"] == ["192.0.2.1"]
    with commit():
        server_ports.server_ports_bind(server, "hv1")
    assert synced(outbox) == {}, "nothing moved"
    # A second port of hv1 on the network: the set of hosts is the same, only hv1 hears of it.
    second = str(uuid.uuid4())
    guest_port(admin, project, net, server=second, security_groups=[])
    with commit():
        server_ports.server_ports_bind(second, "hv1")
    assert list(synced(outbox)) == ["hv1"]
    with commit():
        server_ports.server_ports_move(server, "hv2")
    assert sorted(synced(outbox)) == ["hv1", "hv2", "netnode"]
    # Flat: no peers, only the hosts of the port.
    flat_server = str(uuid.uuid4())
    guest_port(admin, project, flat, server=flat_server, security_groups=[])
    with commit():
        server_ports.server_ports_bind(flat_server, "hv1")
    assert list(synced(outbox)) == ["hv1"]
    with commit():
        server_ports.server_ports_release(server)
    assert not Port.objects.filter(pk=port.pk).exists()
    assert sorted(synced(outbox)) == ["hv1", "hv2", "netnode"], "hv2 left: hv1 and the node lose a peer"


def test_dhcp_ports_and_mtu_reach_the_network_node_and_the_hosts_of_the_network(admin, project, hosts,
                                                                              outbox, commit):
    net = services.network_create(user=admin, project=project, name="private")
    guest_port(admin, project, net, "hv1", fixed_ips=[])
    forget(outbox)
    with commit():
        services.subnet_create(user=admin, network=net, cidr="10.0.0.0/24")  # the DHCP port comes
    assert sorted(synced(outbox)) == ["hv1", "netnode"]
    with commit():
        services.network_update(network=net, user=admin, mtu=1400)
    sent = synced(outbox)
    assert sorted(sent) == ["hv1", "netnode"] and sent["hv1"]["networks"][0]["mtu"] == 1400
    with commit():
        services.network_update(network=net, user=admin, name="renamed")
    assert synced(outbox) == {}


def test_a_tunnel_ip_change_reaches_the_hosts_sharing_a_vxlan_network(admin, project, hosts, outbox,
                                                                      commit):
    net = network(admin, project, dhcp=False)
    flat = network(admin, project, "physnet", "172.16.0.0/24", dhcp=False, provider_type="flat")
    guest_port(admin, project, net, "hv1")
    guest_port(admin, project, net, "hv2")
    guest_port(admin, project, flat, "hv1", security_groups=[])
    guest_port(admin, project, flat, "hv3", security_groups=[])
    forget(outbox)
    with commit():
        heartbeat("hv1", tunnel_ip="192.0.2.1")
    assert synced(outbox) == {}, "unchanged"
    with commit():
        record = heartbeat("hv1", tunnel_ip="192.0.2.11")
    assert record.tunnel_ip == "192.0.2.11"
    sent = synced(outbox)
    assert list(sent) == ["hv2"], "hv3 shares a flat network only; hv1's own state does not name it"
    assert sent["hv2"]["networks"][0]["peers"] == ["192.0.2.11"]


# --- port security in the API --------------------------------------------------------------------------


def test_port_security_in_the_api_follows_neutron(api, hosts):
    assert api.post(f"{API}/networks/", {"name": "private"}, format="json").status_code == 201
    web = api.post(f"{API}/security-groups/", {"name": "web"}, format="json").json()
    made = api.post(f"{API}/ports/", {"network": "private"}, format="json").json()
    assert made["port_security_enabled"] is True and len(made["security_groups"]) == 1
    refused = api.post(f"{API}/ports/", {"network": "private", "port_security_enabled": False,
                                         "security_groups": [web["id"]]}, format="json")
    assert refused.status_code == 400
    assert "port_security_enabled false has no security groups" in refused.json()["security_groups"][0]
    bare = api.post(f"{API}/ports/", {"network": "private", "port_security_enabled": False}, format="json")
    assert bare.status_code == 201, bare.content
    assert (bare.json()["port_security_enabled"], bare.json()["security_groups"]) == (False, [])
    url = f"{API}/ports/{made['id']}/"
    conflict = api.patch(url, {"port_security_enabled": False}, format="json")
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "conflict" and "security_groups" in conflict.json()["detail"]
    off = api.patch(url, {"port_security_enabled": False, "security_groups": []}, format="json")
    assert off.status_code == 200, off.content
    assert (off.json()["port_security_enabled"], off.json()["security_groups"]) == (False, [])
    again = api.patch(url, {"security_groups": [web["id"]]}, format="json")
    assert again.status_code == 400 and "security_groups" in again.json()
    on = api.patch(url, {"port_security_enabled": True, "security_groups": [web["id"]]}, format="json")
    assert on.status_code == 200 and on.json()["security_groups"] == [web["id"]]


# --- tunnel IPs in heartbeats -----------------------------------------------------------------------------


def test_the_heartbeat_carries_the_tunnel_ip(db):
    assert heartbeat("hv1").tunnel_ip == ""
    assert heartbeat("hv1", tunnel_ip="2001:db8::1").tunnel_ip == "2001:db8::1"
    resources = {"vcpus": 1, "instances": {}}  # a worker older than the key: kept
    conductor_tasks.host_heartbeat("hv1", resources)
    assert Host.objects.get(name="hv1").tunnel_ip == "2001:db8::1"
    for bad in ("not-an-ip", 42):
        with pytest.raises(contract.ReportError, match="tunnel_ip"):
            conductor_tasks.host_heartbeat("hv1", {**resources, "tunnel_ip": bad})
    with pytest.raises(contract.ReportError, match="tunnel_ip"):
        conductor_tasks.host_init("hv1", {**resources, "tunnel_ip": "300.1.1.1"})
    assert Host.objects.get(name="hv1").tunnel_ip == "2001:db8::1"


# --- resyncs ----------------------------------------------------------------------------------------------


def test_a_restarted_worker_gets_its_state(admin, project, hosts, outbox, commit):
    net = network(admin, project, dhcp=False)
    port = guest_port(admin, project, net, "hv1")
    forget(outbox)
    with commit():
        recovery.host_init(host="hv1", reported={})
    sent = synced(outbox)
    assert list(sent) == ["hv1"] and sent["hv1"]["ports"][0]["port_id"] == str(port.id)
    with commit():
        conductor_tasks.host_init("hv3", {"tunnel_ip": "", "instances": {}})  # no port: sent all the same
    assert empty(synced(outbox)["hv3"])


def test_the_beat_task_resyncs_every_up_host_holding_a_port(admin, project, hosts, outbox, commit):
    net = network(admin, project)  # the network node's DHCP port
    guest_port(admin, project, net, "hv1")
    port = guest_port(admin, project, net, "hv2")
    Port.objects.filter(pk=port.pk).update(binding_host="", migrating_to="hv2")
    guest_port(admin, project, net, "gone")
    heartbeat("gone")
    Host.objects.filter(name="gone").update(last_heartbeat=timezone.now() - timezone.timedelta(hours=1))
    forget(outbox)
    with commit():
        assert network_tasks.network_resync() == 3
    assert sorted(synced(outbox)) == ["hv1", "hv2", "netnode"], "hv3 holds nothing, gone is down"
    schedule = django_settings.CELERY_BEAT_SCHEDULE["network-resync"]
    assert (schedule["task"], schedule["schedule"]) == (network_tasks.NETWORK_RESYNC, 60.0)
    assert network_tasks.NETWORK_RESYNC.startswith("conductor.")  # routed to the conductor's queue
    assert "cloudctl.network.tasks" in django_settings.CELERY_IMPORTS


# --- live migration -------------------------------------------------------------------------------------


@pytest.fixture
def migrating(api, admin_api, checks: Outbox, flavors, image, hosts, send_on_commit) -> tuple[Any, Port, Any]:
    """A server with a port on hv1, a live migration to hv2 accepted and checked (``preparing``)."""
    assert api.post(f"{API}/networks/", {"name": "private"}, format="json").status_code == 201
    assert api.post(f"{API}/subnets/", {"network": "private", "cidr": "10.0.0.0/24", "enable_dhcp": False},
                    format="json").status_code == 201
    server = active_server(api, checks)
    port = Port.objects.get(device_id=str(server.uuid))
    forget(checks)
    answer = admin_api.post(f"{API}/servers/{server.uuid}/live-migrate/", {"host": "hv2"}, format="json")
    assert answer.status_code == 202, answer.content
    assert run_preflights(checks) == ["preparing"]
    return server, port, Migration.objects.get(pk=answer.json()["id"])


def test_a_live_migration_holds_the_ports_on_the_destination_until_it_lands(migrating, checks: Outbox):
    _server, port, migration = migrating
    port.refresh_from_db()
    assert (port.binding_host, port.migrating_to) == ("hv1", "hv2")
    # The destination's state (the port with its filtering) went before pre_live_migration.
    sent = synced(checks)
    assert sorted(sent) == ["hv1", "hv2"], "hv1 floods to hv2 now"
    assert [p["port_id"] for p in sent["hv2"]["ports"]] == [str(port.id)]
    assert sent["hv2"]["ports"][0]["security"]["enabled"] is True
    [prepare] = checks.compute_tasks(contract.COMPUTE_PRE_LIVE_MIGRATION)
    assert prepare["spec"]["networks"][0]["security"] == sent["hv2"]["ports"][0]["security"]
    for host, status in (("hv2", contract.MIGRATION_PREPARED), ("hv1", contract.MIGRATION_RUNNING),
                         ("hv1", contract.MIGRATION_MIGRATED)):
        assert migration_reports.migration_update(migration_id=migration.pk, host=host, status=status)
    assert synced(checks) == {}, "nothing changes for the hosts until it lands"
    assert migration_reports.migration_update(migration_id=migration.pk, host="hv2",
                                              status=contract.MIGRATION_COMPLETED,
                                              values={"power_state": "running"})
    port.refresh_from_db()
    assert (port.binding_host, port.migrating_to) == ("hv2", "")
    sent = synced(checks)
    assert sorted(sent) == ["hv1", "hv2"]
    assert empty(sent["hv1"])
    assert [p["port_id"] for p in sent["hv2"]["ports"]] == [str(port.id)]


def test_a_failed_live_migration_lets_the_destination_go(migrating, checks: Outbox):
    _server, port, migration = migrating
    synced(checks)
    assert migration_reports.migration_update(migration_id=migration.pk, host="hv2",
                                              status=contract.MIGRATION_PREPARED)
    assert migration_reports.migration_update(migration_id=migration.pk, host="hv1",
                                              status=contract.MIGRATION_FAILED, error="boom",
                                              values={"power_state": "running"})
    port.refresh_from_db()
    assert (port.binding_host, port.migrating_to) == ("hv1", "")
    sent = synced(checks)
    assert sorted(sent) == ["hv1", "hv2"]
    assert sent["hv2"]["ports"] == [] and sent["hv1"]["networks"][0]["peers"] == []
