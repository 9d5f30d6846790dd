"""Subnet validation (cidr, overlap, gateway, pools), deletion conflicts, and security groups:
the default group's semantics and the rules' validation."""

from __future__ import annotations

from typing import Any

import pytest

from cloudctl.errors import InvalidRequest
from cloudctl.identity.models import Project
from cloudctl.network import services
from cloudctl.network.errors import InUse, NetworkConflict
from cloudctl.network.models import Network, Port, SecurityGroup, SecurityGroupRule, Subnet
from cloudctl.network.services import FixedIPRequest

pytestmark = pytest.mark.django_db


@pytest.fixture
def net(admin: Any, project: Project) -> Network:
    return services.network_create(user=admin, project=project, name="net")


def subnet(admin: Any, net: Network, cidr: str = "10.0.0.0/24", **kw: Any) -> Subnet:
    return services.subnet_create(user=admin, network=net, cidr=cidr, **kw)


@pytest.mark.parametrize(("cidr", "reason"), [
    ("10.0.0.5/24", "has host bits set; did you mean 10.0.0.0/24?"),
    ("banana", "is not a CIDR"),
    ("fd00::/64", "only IPv4"),
    ("10.0.0.0/31", "too small"),
    ("10.0.0.0", "no prefix length"),
])
def test_a_bad_cidr_is_400(admin, net, cidr, reason):
    with pytest.raises(InvalidRequest) as refused:
        subnet(admin, net, cidr)
    assert refused.value.field == "cidr" and reason in refused.value.message


def test_overlapping_subnets_of_one_network_are_400_naming_the_other(admin, project, net):
    first = subnet(admin, net, "10.0.0.0/24", name="first")
    with pytest.raises(InvalidRequest) as refused:
        subnet(admin, net, "10.0.0.128/25")
    assert refused.value.field == "cidr"
    assert refused.value.message == (f"10.0.0.128/25 overlaps 10.0.0.0/24 of subnet {first.id} (first) "
                                     "on the same network")
    other = services.network_create(user=admin, project=project, name="other")
    assert subnet(admin, other, "10.0.0.0/24").cidr == "10.0.0.0/24"  # another network may


def test_gateway_and_default_pools(admin, net):
    middle = subnet(admin, net, "10.0.0.0/24", gateway_ip="10.0.0.100")
    assert middle.allocation_pools == [{"start": "10.0.0.1", "end": "10.0.0.99"},
                                       {"start": "10.0.0.101", "end": "10.0.0.254"}]
    none = subnet(admin, net, "10.0.1.0/29", gateway_ip=None)
    assert none.gateway_ip is None
    assert none.allocation_pools == [{"start": "10.0.1.1", "end": "10.0.1.6"}]
    assert none.pool_size() == 6


@pytest.mark.parametrize(("kw", "field", "reason"), [
    ({"gateway_ip": "10.0.1.1"}, "gateway_ip", "is not a host address of 10.0.0.0/24"),
    ({"gateway_ip": "10.0.0.255"}, "gateway_ip", "is not a host address"),
    ({"allocation_pools": [{"start": "10.0.0.1", "end": "10.0.0.9"}]}, "allocation_pools",
     "contains the gateway 10.0.0.1"),
    ({"allocation_pools": [{"start": "10.0.0.9", "end": "10.0.0.2"}]}, "allocation_pools",
     "ends before it starts"),
    ({"allocation_pools": [{"start": "10.0.0.200", "end": "10.0.1.9"}]}, "allocation_pools",
     "is not inside the host addresses of 10.0.0.0/24"),
    ({"allocation_pools": [{"start": "10.0.0.2", "end": "10.0.0.20"},
                           {"start": "10.0.0.10", "end": "10.0.0.30"}]}, "allocation_pools",
     "overlaps pool 10.0.0.2-10.0.0.20"),
    ({"dns_nameservers": ["8.8.8.8", "8.8.8.8"]}, "dns_nameservers", "listed twice"),
    ({"dns_nameservers": ["dns.example"]}, "dns_nameservers", "is not an IP address"),
])
def test_gateway_pool_and_nameserver_validation(admin, net, kw, field, reason):
    with pytest.raises(InvalidRequest) as refused:
        subnet(admin, net, **kw)
    assert refused.value.field == field and reason in refused.value.message
    assert not Subnet.objects.exists()


def test_given_pools_are_kept_sorted(admin, net):
    sub = subnet(admin, net, allocation_pools=[{"start": "10.0.0.50", "end": "10.0.0.60"},
                                               {"start": "10.0.0.10", "end": "10.0.0.20"}])
    assert sub.allocation_pools == [{"start": "10.0.0.10", "end": "10.0.0.20"},
                                    {"start": "10.0.0.50", "end": "10.0.0.60"}]
    assert sub.pool_size() == 22


def test_deleting_a_network_with_ports_is_409_naming_them_dhcp_ports_go_with_it(admin, project, net):
    sub = subnet(admin, net)
    vm = services.port_create(user=admin, project=project, network=net, name="vm",
                              device_owner="compute:nova", device_id="server-1")
    services.port_create(user=admin, project=project, network=net, device_owner="network:dhcp")
    with pytest.raises(InUse) as refused:
        services.network_delete(network=net, user=admin)
    assert refused.value.ports == [str(vm.id)]
    assert f"{vm.id} (vm, compute:nova server-1)" in str(refused.value)
    services.port_delete(port=vm, user=admin)
    services.network_delete(network=net, user=admin)
    assert not Network.objects.exists() and not Subnet.objects.filter(pk=sub.pk).exists()
    assert not Port.objects.exists()


def test_deleting_a_subnet_with_allocated_addresses_is_409(admin, project, net):
    sub = subnet(admin, net)
    holder = services.port_create(user=admin, project=project, network=net)
    dhcp = services.port_create(user=admin, project=project, network=net, device_owner="network:dhcp")
    with pytest.raises(InUse, match=str(holder.id)):
        services.subnet_delete(subnet=sub, user=admin)
    services.port_delete(port=holder, user=admin)
    services.subnet_delete(subnet=sub, user=admin)
    assert not Subnet.objects.exists()
    assert list(dhcp.fixed_ips.all()) == []  # the DHCP port gave its address up


def test_only_a_router_interface_may_hold_the_gateway(admin, project, net):
    sub = subnet(admin, net)
    router = services.port_create(user=admin, project=project, network=net,
                                  device_owner="network:router_interface",
                                  fixed_ips=[FixedIPRequest(subnet=sub, ip_address="10.0.0.1")])
    assert [f.ip_address for f in router.fixed_ips.all()] == ["10.0.0.1"]


# --- security groups -------------------------------------------------------------------------------


def test_the_default_group_is_made_once_with_neutrons_rules(project):
    group = services.security_group_default(project=project)
    assert services.security_group_default(project=project) == group
    assert SecurityGroup.objects.filter(project=project).count() == 1
    rules = {(r.direction, r.ethertype, r.protocol, r.remote_ip_prefix, r.remote_group_id)
             for r in group.rules.all()}
    assert rules == {("egress", "IPv4", None, None, None), ("ingress", "IPv4", None, None, group.id)}


def test_a_new_port_gets_the_default_group_unless_groups_are_given(admin, project, net):
    web = services.security_group_create(user=admin, project=project, name="web")
    assert [(r.direction, r.remote_ip_prefix) for r in web.rules.all()] == [("egress", None)]
    plain = services.port_create(user=admin, project=project, network=net)
    assert [g.name for g in plain.security_groups.all()] == ["default"]
    chosen = services.port_create(user=admin, project=project, network=net, security_groups=[web])
    assert [g.name for g in chosen.security_groups.all()] == ["web"]
    bare = services.port_create(user=admin, project=project, network=net, security_groups=[])
    assert list(bare.security_groups.all()) == []


def test_the_default_group_and_groups_in_use_cannot_be_deleted(admin, project, net):
    default = services.security_group_default(project=project)
    with pytest.raises(NetworkConflict, match="default group"):
        services.security_group_delete(group=default, user=admin)
    web = services.security_group_create(user=admin, project=project, name="web")
    user = services.port_create(user=admin, project=project, network=net, security_groups=[web])
    with pytest.raises(InUse) as refused:
        services.security_group_delete(group=web, user=admin)
    assert refused.value.ports == [str(user.id)]
    services.port_update(port=user, user=admin, security_groups=[default])
    services.security_group_delete(group=web, user=admin)
    assert not SecurityGroup.objects.filter(name="web").exists()


def test_no_one_names_a_group_default(admin, project):
    with pytest.raises(InvalidRequest, match="default"):
        services.security_group_create(user=admin, project=project, name="default")


def test_a_group_of_another_project_is_refused_on_a_port(admin, project, other_project, net):
    foreign = services.security_group_create(user=admin, project=other_project, name="theirs")
    with pytest.raises(InvalidRequest, match="another project"):
        services.port_create(user=admin, project=project, network=net, security_groups=[foreign])


def rule(admin: Any, group: SecurityGroup, **kw: Any) -> SecurityGroupRule:
    return services.security_group_rule_create(user=admin, security_group=group, **kw)


def test_rules_follow_neutrons_rules(admin, project):
    group = services.security_group_create(user=admin, project=project, name="web")
    ssh = rule(admin, group, direction="ingress", protocol="tcp", port_range_min=22, port_range_max=22,
               remote_ip_prefix="10.0.0.0/8")
    assert ssh.remote_ip_prefix == "10.0.0.0/8"
    echo = rule(admin, group, direction="ingress", protocol="icmp", port_range_min=8, port_range_max=0)
    assert (echo.port_range_min, echo.port_range_max) == (8, 0)
    peers = rule(admin, group, direction="ingress", remote_group=group)
    assert peers.remote_group == group
    with pytest.raises(NetworkConflict, match=str(ssh.id)):
        rule(admin, group, direction="ingress", protocol="tcp", port_range_min=22, port_range_max=22,
             remote_ip_prefix="10.0.0.0/8")


@pytest.mark.parametrize(("kw", "field", "reason"), [
    ({"protocol": "tcp", "port_range_min": 0, "port_range_max": 10}, "port_range_min", "between 1 and 65535"),
    ({"protocol": "udp", "port_range_min": 10, "port_range_max": 70000}, "port_range_max",
     "between 1 and 65535"),
    ({"protocol": "tcp", "port_range_min": 90, "port_range_max": 80}, "port_range_min", "above"),
    ({"protocol": "tcp", "port_range_min": 80}, "port_range_max", "both ends"),
    ({"protocol": "icmp", "port_range_min": 300}, "port_range_min", "between 0 and 255"),
    ({"protocol": "icmp", "port_range_max": 0}, "port_range_max", "needs a type"),
    ({"port_range_min": 80, "port_range_max": 80}, "port_range_min", "needs a protocol"),
    ({"remote_ip_prefix": "nope"}, "remote_ip_prefix", "is not a CIDR"),
    ({"remote_ip_prefix": "fd00::/8"}, "remote_ip_prefix", "IPv4"),
    ({"ethertype": "IPv6"}, "ethertype", "only IPv4"),
])
def test_bad_rules_are_400_naming_the_field(admin, project, kw, field, reason):
    group = services.security_group_create(user=admin, project=project, name="web")
    with pytest.raises(InvalidRequest) as refused:
        rule(admin, group, direction="ingress", **kw)
    assert refused.value.field == field and reason in refused.value.message


def test_a_rule_names_a_prefix_or_a_group_not_both(admin, project):
    group = services.security_group_create(user=admin, project=project, name="web")
    with pytest.raises(InvalidRequest, match="not both"):
        rule(admin, group, direction="ingress", remote_ip_prefix="10.0.0.0/8", remote_group=group)


def test_a_network_other_projects_use_stays_shared(admin, project, other_project, net):
    from cloudctl.network.models import Network as NetworkModel

    subnet(admin, net)
    services.network_update(network=net, user=admin, shared=True)
    theirs = services.port_create(user=admin, project=other_project, network=net)
    with pytest.raises(InUse) as refused:
        services.network_update(network=net, user=admin, shared=False)
    assert refused.value.ports == [str(theirs.id)] and "cannot stop being shared" in str(refused.value)
    services.port_delete(port=theirs, user=admin)
    services.port_create(user=admin, project=project, network=net)  # its own project's ports do not count
    assert services.network_update(network=net, user=admin, shared=False).shared is False
    assert NetworkModel.objects.get(pk=net.pk).shared is False


def test_a_port_on_a_network_deleted_meanwhile_is_409(admin, project, net):
    stale = Network.objects.get(pk=net.pk)
    services.network_delete(network=net, user=admin)
    with pytest.raises(NetworkConflict, match="was deleted"):
        services.port_create(user=admin, project=project, network=stale)
