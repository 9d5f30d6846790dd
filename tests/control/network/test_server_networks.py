"""Servers get ports: POST /servers/ ``networks`` (Nova's forms and errors), the ports made or bound
in the server's transaction, ``addresses``, the spawn spec's ``networks``, the binding following the
server (claim, reschedule, migration), and the ports' fate when the server is deleted."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from rest_framework.test import APIClient

from cloudctl.compute import conductor, migration_reports
from cloudctl.compute.models import Instance, Migration
from cloudctl.compute.scheduling import schedule_instance
from cloudctl.network.models import Network, Port, PortFixedIP, SecurityGroup
from compute_workers import contract
from tests.control.conftest import Outbox, active_server, client_for, heartbeat, make_user, run_preflights

API = "/api/v1"


def post(api: APIClient, path: str, **body: Any) -> Any:
    return api.post(f"{API}/{path}/", body, format="json")


def boot(api: APIClient, name: str = "s", **body: Any) -> Any:
    return post(api, "servers", name=name, flavor="m1.nano", image="tiny", **body)


def network(api: APIClient, name: str = "private", cidr: str | None = "10.0.0.0/24",
            **kw: Any) -> dict[str, Any]:
    net = post(api, "networks", name=name, **kw)
    assert net.status_code == 201, net.content
    if cidr:
        # Without DHCP: its DHCP port would take the first address (test_dhcp covers DHCP).
        assert post(api, "subnets", network=net.json()["id"], cidr=cidr,
                    enable_dhcp=False).status_code == 201
    return net.json()


def counts() -> tuple[int, int, int]:
    return Instance.objects.count(), Port.objects.count(), PortFixedIP.objects.count()


@pytest.fixture
def other_api(other_project: Any) -> APIClient:
    return client_for(make_user("bob", other_project))


@pytest.fixture
def booting(flavors: Any, image: Any) -> None:
    """A flavor and the image every boot here uses."""


pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("booting")]


# --- the forms of networks ---------------------------------------------------------------------------


def test_omitted_without_networks_boots_without_a_nic(api):
    answer = boot(api)
    assert answer.status_code == 202, answer.content
    assert answer.json()["addresses"] == {} and Port.objects.count() == 0


def test_omitted_with_one_network_uses_it(api):
    net = network(api)
    answer = boot(api)
    assert answer.status_code == 202, answer.content
    server = answer.json()
    [port] = Port.objects.all()
    assert port.network_id == Network.objects.get(pk=net["id"]).pk
    assert port.device_id == server["id"] and port.device_owner == "compute:nova"
    assert not port.preserve_on_delete and port.status == "DOWN" and port.binding_host == ""
    assert list(port.security_groups.values_list("name", flat=True)) == ["default"]
    assert server["addresses"] == {"private": [{"addr": "10.0.0.2", "version": 4,
                                                "mac": port.mac_address, "type": "fixed"}]}


def test_omitted_or_auto_with_several_networks_asks_to_choose(api):
    a, b = network(api, "a"), network(api, "b", cidr="10.0.1.0/24")
    for networks in ({}, {"networks": "auto"}):
        answer = boot(api, **networks)
        assert answer.status_code == 400, answer.content
        reason = answer.json()["networks"][0]
        assert "several networks" in reason and a["id"] in reason and b["id"] in reason
    assert counts() == (0, 0, 0)


def test_auto_without_a_network_is_400(api):
    answer = boot(api, networks="auto")
    assert answer.status_code == 400
    assert "no network available to the project" in answer.json()["networks"][0]


def test_auto_counts_shared_networks_but_not_external_ones(api, other_api, admin_api):
    network(admin_api, "public", cidr="172.24.4.0/24", external=True)
    assert boot(api, networks="auto").status_code == 400, "an external network is not picked"
    shared = network(other_api, "shared-net", cidr="10.9.0.0/24", shared=True)
    answer = boot(api, networks="auto")
    assert answer.status_code == 202, answer.content
    assert list(answer.json()["addresses"]) == ["shared-net"]
    port = Port.objects.get(device_id=answer.json()["id"])
    assert str(port.network_id) == shared["id"] and port.project.name == "blue"
    # the port's group is the server's project's default, not the network owner's
    assert port.security_groups.get().project.name == "blue"


def test_none_boots_without_a_nic(api):
    network(api)
    answer = boot(api, networks="none")
    assert answer.status_code == 202 and answer.json()["addresses"] == {}
    assert Port.objects.count() == 0


def test_a_list_in_order_by_id_or_name_with_a_fixed_ip(api):
    a, b = network(api, "a"), network(api, "b", cidr="10.0.1.0/24")
    answer = boot(api, networks=[{"network": "b"}, {"network": a["id"], "fixed_ip": "10.0.0.77"},
                                 {"network": "b"}])
    assert answer.status_code == 202, answer.content
    server = answer.json()
    ports = list(Port.objects.filter(device_id=server["id"]).order_by("device_index"))
    assert [p.device_index for p in ports] == [0, 1, 2]
    assert [str(p.network_id) for p in ports] == [b["id"], a["id"], b["id"]]
    assert list(server["addresses"]) == ["b", "a"], "networks in the order asked"
    assert [e["addr"] for e in server["addresses"]["b"]] == ["10.0.1.2", "10.0.1.3"]
    assert server["addresses"]["a"] == [{"addr": "10.0.0.77", "version": 4,
                                         "mac": ports[1].mac_address, "type": "fixed"}]
    shown = api.get(f"{API}/servers/{server['id']}/").json()
    assert shown["addresses"] == server["addresses"]
    assert api.get(f"{API}/servers/").json()[0]["addresses"] == server["addresses"]


def test_a_passed_in_port_is_bound(api):
    network(api)
    port = post(api, "ports", network="private", name="mine").json()
    answer = boot(api, networks=[{"port": port["id"]}])
    assert answer.status_code == 202, answer.content
    bound = Port.objects.get(pk=port["id"])
    assert bound.device_id == answer.json()["id"] and bound.device_owner == "compute:nova"
    assert bound.preserve_on_delete and Port.objects.count() == 1
    assert answer.json()["addresses"]["private"][0]["addr"] == port["fixed_ips"][0]["ip_address"]
    shown = api.get(f"{API}/ports/{port['id']}/").json()
    assert shown["device_id"] == answer.json()["id"]


@pytest.mark.parametrize(("networks", "reason"), [
    ([{"network": "nope"}], "no network with id or name 'nope'"),
    ([{"network": "00000000-0000-0000-0000-000000000000"}], "no network"),
    ([{"port": "00000000-0000-0000-0000-000000000000"}], "no port"),
    ([{"port": "not-a-uuid"}], "no port"),
    ([{"fixed_ip": "10.0.0.5"}], "needs its \"network\""),
    ([{"network": "private", "port": "x"}], "alone"),
    ([{"network": "private", "bogus": 1}], "must be"),
    ([{"network": ""}], "non-empty"),
    ([{}], "must be"),
    ("everything", "must be"),
    (42, "must be"),
    ([{"network": "private", "fixed_ip": "10.1.0.5"}], "is in no subnet"),
    ([{"network": "private", "fixed_ip": "banana"}], "is not an IP address"),
    ([{"network": "private", "fixed_ip": "10.0.0.1"}], "is the gateway"),
])
def test_bad_networks_are_400_on_the_field_and_create_nothing(api, networks, reason):
    network(api)
    before = counts()
    answer = boot(api, networks=networks)
    assert answer.status_code == 400, answer.content
    assert reason in " ".join(answer.json()["networks"]), answer.json()
    assert counts() == before


def test_another_projects_network_and_port_are_400_not_found(api, other_api):
    theirs = network(other_api, "theirs", cidr="10.5.0.0/24")
    port = post(other_api, "ports", network="theirs").json()
    before = counts()
    for networks, reason in (([{"network": theirs["id"]}], "no network"),
                             ([{"network": "theirs"}], "no network"),
                             ([{"port": port["id"]}], "no port")):
        answer = boot(api, networks=networks)
        assert answer.status_code == 400, answer.content
        assert reason in answer.json()["networks"][0]
    assert counts() == before


def test_an_external_network_is_refused_in_a_list(api, admin_api):
    network(admin_api, "public", cidr="172.24.4.0/24", external=True)
    answer = boot(api, networks=[{"network": "public"}])
    assert answer.status_code == 400 and "external network" in answer.json()["networks"][0]


def test_conflicts_are_409_and_roll_everything_back(api):
    network(api)
    holder = post(api, "ports", network="private", fixed_ips=[{"ip_address": "10.0.0.9"}]).json()
    first = boot(api, "first", networks=[{"port": holder["id"]}]).json()
    groups = SecurityGroup.objects.count()
    before = counts()
    # a fixed IP in use: 409 naming the port, after a first NIC was already made in the transaction
    in_use = boot(api, networks=[{"network": "private"}, {"network": "private", "fixed_ip": "10.0.0.9"}])
    assert in_use.status_code == 409, in_use.content
    assert in_use.json()["code"] == "ip_address_in_use" and in_use.json()["port"] == holder["id"]
    assert counts() == before
    # a bound port: 409 naming the server holding it
    bound = boot(api, networks=[{"network": "private"}, {"port": holder["id"]}])
    assert bound.status_code == 409, bound.content
    assert bound.json()["code"] == "port_in_use" and first["id"] in bound.json()["detail"]
    assert bound.json()["device_id"] == first["id"]
    assert counts() == before and SecurityGroup.objects.count() == groups
    twice = post(api, "ports", network="private").json()
    assert boot(api, networks=[{"port": twice["id"]}, {"port": twice["id"]}]).status_code == 400
    assert Port.objects.get(pk=twice["id"]).device_id == ""


def test_an_exhausted_pool_refuses_the_server(api):
    network(api, cidr="10.0.0.0/30")  # one address in the pool
    assert boot(api, "one").status_code == 202
    before = counts()
    full = boot(api, "two")
    assert full.status_code == 409 and full.json()["code"] == "ip_address_exhausted"
    assert counts() == before


def test_the_default_security_group_made_by_a_refused_boot_is_rolled_back(api, other_api):
    network(other_api, "shared-net", cidr="10.9.0.0/24", shared=True)
    blue_groups = SecurityGroup.objects.filter(project__name="blue")
    assert not blue_groups.exists()
    answer = boot(api, networks=[{"network": "shared-net", "fixed_ip": "10.9.0.200"},
                                 {"network": "shared-net", "fixed_ip": "10.9.0.200"}])
    assert answer.status_code == 409
    assert not blue_groups.exists() and counts() == (0, 0, 0)


# --- the spawn spec, the binding -------------------------------------------------------------------


def test_the_spawn_spec_carries_the_ports_and_the_claim_binds_them(api, outbox: Outbox):
    net = network(api)
    heartbeat("hv1")
    server = boot(api).json()
    schedule_instance(server["id"])
    [spawn] = outbox.compute_tasks(contract.COMPUTE_SPAWN)
    port = Port.objects.get(device_id=server["id"])
    vni = Network.objects.get(pk=net["id"]).segmentation_id
    subnet = port.fixed_ips.get().subnet
    assert spawn["spec"]["networks"] == [{
        "port_id": str(port.id), "network_id": net["id"], "mac_address": port.mac_address,
        "fixed_ips": [{"ip_address": "10.0.0.2", "subnet_id": str(subnet.id), "cidr": "10.0.0.0/24",
                       "gateway_ip": "10.0.0.1"}],
        "mtu": 1450, "provider_type": "vxlan", "segmentation_id": vni,
        "bridge": contract.bridge_name(net["id"]), "tap": contract.tap_name(str(port.id)),
        # Its filtering, applied before the guest starts: the project's default group (egress
        # anywhere, ingress from the group's members: this port alone so far).
        "security": {
            "enabled": True,
            "allowed_addresses": [{"mac_address": port.mac_address, "ip_address": "10.0.0.2"}],
            "rules": [
                {"direction": "egress", "ethertype": "IPv4", "protocol": None, "port_range_min": None,
                 "port_range_max": None, "remote_ip_prefixes": None},
                {"direction": "ingress", "ethertype": "IPv4", "protocol": None, "port_range_min": None,
                 "port_range_max": None, "remote_ip_prefixes": ["10.0.0.2/32"]},
            ],
        },
    }]
    assert contract.validate_spec(spawn["spec"]) == spawn["spec"]
    assert (port.binding_host, port.status, port.device_owner) == ("hv1", "BUILD", "compute:nova")
    conductor.instance_update(instance_uuid=server["id"], host="hv1", expected_task_state="spawning",
                              values={"vm_state": "active", "task_state": None,
                                      "power_state": "running"})
    port.refresh_from_db()
    assert port.status == "ACTIVE"
    shown = api.get(f"{API}/ports/{port.id}/").json()
    # The host a port is bound to is for administrators (Neutron's binding:host_id).
    assert (shown["binding_host"], shown["status"]) == ("", "ACTIVE")


def test_a_server_without_ports_sends_no_networks(api, outbox: Outbox):
    heartbeat("hv1")
    server = boot(api).json()
    schedule_instance(server["id"])
    [spawn] = outbox.compute_tasks(contract.COMPUTE_SPAWN)
    assert spawn["spec"]["networks"] == []


def test_a_reschedule_moves_the_binding(api, outbox: Outbox, settings):
    network(api)
    heartbeat("hv1")
    heartbeat("hv2")
    server = boot(api).json()
    first = schedule_instance(server["id"])
    port = Port.objects.get(device_id=server["id"])
    assert port.binding_host == first
    conductor.build_failed(instance_uuid=server["id"], host=first,
                           fault={"message": "boom", "code": 500, "details": ""}, reschedule=True)
    port.refresh_from_db()
    assert (port.binding_host, port.status) == ("", "DOWN")
    second = schedule_instance(server["id"])
    assert second != first
    port.refresh_from_db()
    assert (port.binding_host, port.status) == (second, "BUILD")
    conductor.build_failed(instance_uuid=server["id"], host=second,
                           fault={"message": "boom", "code": 500, "details": ""}, reschedule=False)
    port.refresh_from_db()
    assert port.status == "DOWN" and Instance.objects.get(pk=server["id"]).vm_state == "error"


def test_ports_follow_the_power_state_reports(api, outbox: Outbox):
    network(api)
    server = active_server(api, outbox)
    port = Port.objects.get(device_id=str(server.uuid))
    assert port.status == "ACTIVE"
    api.post(f"{API}/servers/{server.uuid}/stop/")
    conductor.instance_update(instance_uuid=str(server.uuid), host="hv1", expected_task_state="powering_off",
                              values={"vm_state": "stopped", "task_state": None, "power_state": "shutdown"})
    port.refresh_from_db()
    assert port.status == "DOWN"


@pytest.mark.usefixtures("send_on_commit")
def test_a_live_migration_moves_the_binding(api, admin_api, checks: Outbox):
    network(api)
    server = active_server(api, checks)
    port = Port.objects.get(device_id=str(server.uuid))
    assert port.binding_host == "hv1"
    heartbeat("hv2")
    answer = admin_api.post(f"{API}/servers/{server.uuid}/live-migrate/", {"host": "hv2"}, format="json")
    assert answer.status_code == 202, answer.content
    assert run_preflights(checks) == ["preparing"]
    [prepare] = checks.compute_tasks(contract.COMPUTE_PRE_LIVE_MIGRATION)
    assert [n["port_id"] for n in prepare["spec"]["networks"]] == [str(port.id)]
    migration = Migration.objects.get(pk=answer.json()["id"])
    for host, status in (("hv2", contract.MIGRATION_PREPARED), ("hv1", contract.MIGRATION_RUNNING)):
        assert migration_reports.migration_update(migration_id=migration.pk, host=host, status=status)
    port.refresh_from_db()
    assert port.binding_host == "hv1", "bound to the source until the guest runs on the destination"
    assert migration_reports.migration_update(migration_id=migration.pk, host="hv1",
                                              status=contract.MIGRATION_MIGRATED)
    assert migration_reports.migration_update(migration_id=migration.pk, host="hv2",
                                              status=contract.MIGRATION_COMPLETED,
                                              values={"power_state": "running"})
    server.refresh_from_db()
    port.refresh_from_db()
    assert server.host.name == "hv2" and port.binding_host == "hv2" and port.status == "ACTIVE"


@pytest.mark.usefixtures("send_on_commit")
def test_a_cold_migration_moves_the_binding(api, admin_api, checks: Outbox):
    network(api)
    server = active_server(api, checks)
    heartbeat("hv2")
    answer = admin_api.post(f"{API}/servers/{server.uuid}/migrate/", {}, format="json")
    assert run_preflights(checks) == ["preparing"]
    migration = Migration.objects.get(pk=answer.json()["id"])
    for host, status, values in (("hv2", contract.MIGRATION_PREPARED, None),
                                 ("hv1", contract.MIGRATION_MIGRATED, None),
                                 ("hv2", contract.MIGRATION_FINISHED, {"power_state": "running"})):
        assert migration_reports.migration_update(migration_id=migration.pk, host=host, status=status,
                                                  values=values or {})
    port = Port.objects.get(device_id=str(server.uuid))
    assert port.binding_host == "hv2"


# --- delete ------------------------------------------------------------------------------------------


def test_delete_frees_created_ports_and_keeps_passed_in_ones_unbound(api):
    network(api)
    mine = post(api, "ports", network="private", name="mine").json()
    server = boot(api, networks=[{"network": "private"}, {"port": mine["id"]}]).json()
    created = Port.objects.get(device_id=server["id"], preserve_on_delete=False)
    created_address = created.fixed_ips.get().ip_address
    assert api.delete(f"{API}/servers/{server['id']}/").status_code == 204  # on no host: at once
    assert not Port.objects.filter(pk=created.pk).exists()
    assert not PortFixedIP.objects.filter(ip_address=created_address).exists(), "the address is free"
    kept = Port.objects.get(pk=mine["id"])
    assert (kept.device_id, kept.device_owner, kept.binding_host, kept.status) == ("", "", "", "DOWN")
    assert not kept.preserve_on_delete
    assert kept.fixed_ips.get().ip_address == mine["fixed_ips"][0]["ip_address"], "its address kept"
    # the kept port can boot the next server
    assert boot(api, "next", networks=[{"port": mine["id"]}]).status_code == 202


def test_delete_on_a_host_releases_the_ports_when_the_host_reports(api, outbox: Outbox):
    network(api)
    mine = post(api, "ports", network="private").json()
    server = active_server(api, outbox)
    port = Port.objects.get(device_id=str(server.uuid))
    assert api.delete(f"{API}/servers/{server.uuid}/").status_code == 202
    assert Port.objects.filter(pk=port.pk).exists(), "kept until the host destroyed the guest"
    conductor.instance_destroyed(instance_uuid=str(server.uuid), host="hv1")
    assert not Port.objects.filter(pk=port.pk).exists()
    assert Port.objects.filter(pk=mine["id"]).exists()


# --- admin ---------------------------------------------------------------------------------------------


def test_the_admin_change_page_shows_the_addresses(api, admin):
    network(api)
    server = boot(api).json()
    port = Port.objects.get(device_id=server["id"])
    staff = APIClient()
    staff.force_login(admin)
    page = staff.get(reverse("admin:compute_instance_change", args=[server["id"]])).content.decode()
    assert "private: 10.0.0.2" in page and port.mac_address in page
    assert reverse("admin:network_port_change", args=[port.pk]) in page


def test_a_server_list_reads_the_ports_once(api):
    network(api)
    network(api, "b", cidr="10.0.1.0/24")
    for i in range(2):
        assert boot(api, f"s{i}", networks=[{"network": "private"}]).status_code == 202
    with CaptureQueriesContext(connection) as two:
        assert len(api.get(f"{API}/servers/").json()) == 2
    for i in range(2, 6):
        assert boot(api, f"s{i}", networks=[{"network": "b"}, {"network": "private"}]).status_code == 202
    with CaptureQueriesContext(connection) as six:
        listed = api.get(f"{API}/servers/").json()
    assert len(listed) == 6 and len(six.captured_queries) == len(two.captured_queries)
    assert {s["name"]: list(s["addresses"]) for s in listed}["s5"] == ["b", "private"]


def test_a_port_naming_a_server_as_its_device_is_not_the_servers(api, other_api):
    """Only the create binds ports to a server: a port made through the ports API with the server's
    id as device_id is neither shown, nor plugged, nor deleted with it."""
    network(api)
    server = boot(api).json()
    network(other_api, "theirs", cidr="10.5.0.0/24")
    stray = post(other_api, "ports", network="theirs", device_id=server["id"],
                 device_owner="compute:nova").json()
    assert list(api.get(f"{API}/servers/{server['id']}/").json()["addresses"]) == ["private"]
    assert api.delete(f"{API}/servers/{server['id']}/").status_code == 204
    assert Port.objects.filter(pk=stray["id"], device_id=server["id"]).exists()


def test_the_power_state_sync_moves_and_sets_the_ports(api, outbox: Outbox):
    from datetime import timedelta

    from django.utils import timezone

    from cloudctl.compute import sync

    network(api)
    server = active_server(api, outbox)
    port = Port.objects.get(device_id=str(server.uuid))
    # the hypervisor says the guest stopped behind cloudctl's back: the port is DOWN
    assert sync.power_state_update(host="hv1", instance_uuid=str(server.uuid), power_state="shutdown",
                                   observed_at=(timezone.now() + timedelta(seconds=1)).timestamp())
    port.refresh_from_db()
    assert port.status == "DOWN"
    # its domain turns up running on another host: the record and the port's binding move there
    Instance.objects.filter(uuid=server.uuid).update(vm_state="active", power_state="running")
    heartbeat("hv2", instances={str(server.uuid): "running"})
    source = heartbeat("hv1", instances={})
    sync.sync_host(source, {}, conductor.observed_at_of({"observed_at": timezone.now().timestamp() + 2}))
    port.refresh_from_db()
    assert Instance.objects.get(pk=server.uuid).host.name == "hv2"
    assert (port.binding_host, port.status) == ("hv2", "ACTIVE")
