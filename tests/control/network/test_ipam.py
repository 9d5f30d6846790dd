"""IPAM and the allocations the database guards: next free address, requested addresses, exhausted
pools, concurrent ports, VNIs, MAC addresses."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError, transaction

from cloudctl.errors import InvalidRequest
from cloudctl.identity.models import Project
from cloudctl.network import selectors, services
from cloudctl.network.errors import (
    AddressInUse,
    MacAddressInUse,
    PoolExhausted,
    SegmentationIdExhausted,
    SegmentationIdInUse,
)
from cloudctl.network.models import Network, Port, PortFixedIP, Subnet
from cloudctl.network.services import FixedIPRequest
from tests.control.conftest import run_concurrently

pytestmark = pytest.mark.django_db


def network(admin: Any, project: Project, **kw: Any) -> Network:
    return services.network_create(user=admin, project=project, name=kw.pop("name", "net"), **kw)


def subnet(admin: Any, net: Network, cidr: str = "10.0.0.0/24", **kw: Any) -> Subnet:
    # Without DHCP: a DHCP subnet's first free address goes to the network's DHCP port (test_dhcp).
    kw.setdefault("enable_dhcp", False)
    return services.subnet_create(user=admin, network=net, cidr=cidr, **kw)


def port(admin: Any, project: Project, net: Network, **kw: Any) -> Port:
    return services.port_create(user=admin, project=project, network=net, **kw)


def addresses(p: Port) -> list[str]:
    return [f.ip_address for f in p.fixed_ips.all()]


def stale_first(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    """Make the selector ``name``'s first read return nothing (as if another transaction's insert
    were not visible yet), the later ones the truth; the list records every read."""
    real = getattr(selectors, name)
    reads: list[Any] = []

    def read(**kw: Any) -> Any:
        reads.append(kw)
        return set() if len(reads) == 1 else real(**kw)

    monkeypatch.setattr(selectors, name, read)
    return reads


def test_ports_get_the_lowest_free_address_of_the_pools(admin, project):
    net = network(admin, project)
    sub = subnet(admin, net)
    assert sub.gateway_ip == "10.0.0.1"
    assert sub.allocation_pools == [{"start": "10.0.0.2", "end": "10.0.0.254"}]
    first, second = port(admin, project, net), port(admin, project, net)
    assert addresses(first) == ["10.0.0.2"] and addresses(second) == ["10.0.0.3"]
    services.port_delete(port=first, user=admin)
    assert addresses(port(admin, project, net)) == ["10.0.0.2"]  # freed at once, lowest first


def test_a_requested_address_is_given_even_outside_the_pools(admin, project):
    net = network(admin, project)
    sub = subnet(admin, net, allocation_pools=[{"start": "10.0.0.100", "end": "10.0.0.110"}])
    p = port(admin, project, net, fixed_ips=[FixedIPRequest(subnet=sub, ip_address="10.0.0.7")])
    assert addresses(p) == ["10.0.0.7"]
    by_address = port(admin, project, net, fixed_ips=[FixedIPRequest(ip_address="10.0.0.8")])
    assert [(f.subnet_id, f.ip_address) for f in by_address.fixed_ips.all()] == [(sub.id, "10.0.0.8")]
    assert addresses(port(admin, project, net)) == ["10.0.0.100"]


def test_a_requested_address_in_use_is_409_naming_the_port(admin, project):
    net = network(admin, project)
    sub = subnet(admin, net)
    holder = port(admin, project, net, fixed_ips=[FixedIPRequest(subnet=sub, ip_address="10.0.0.9")])
    with pytest.raises(AddressInUse) as refused:
        port(admin, project, net, fixed_ips=[FixedIPRequest(subnet=sub, ip_address="10.0.0.9")])
    assert refused.value.status_code == 409
    assert str(holder.id) in str(refused.value) and refused.value.body()["port"] == str(holder.id)
    assert Port.objects.count() == 1  # nothing created by the refused request


@pytest.mark.parametrize(("wanted", "reason"), [
    ("10.0.1.5", "is not inside subnet"),
    ("10.0.0.0", "network or broadcast address"),
    ("10.0.0.255", "network or broadcast address"),
    ("10.0.0.1", "is the gateway"),
])
def test_a_requested_address_that_cannot_be_given_is_400(admin, project, wanted, reason):
    net = network(admin, project)
    sub = subnet(admin, net)
    with pytest.raises(InvalidRequest) as refused:
        port(admin, project, net, fixed_ips=[FixedIPRequest(subnet=sub, ip_address=wanted)])
    assert refused.value.field == "fixed_ips" and reason in refused.value.message


def test_an_address_in_no_subnet_of_the_network_is_400(admin, project):
    net = network(admin, project)
    subnet(admin, net)
    with pytest.raises(InvalidRequest, match="in no subnet of network"):
        port(admin, project, net, fixed_ips=[FixedIPRequest(ip_address="192.168.9.9")])


def test_a_subnet_of_another_network_is_400(admin, project):
    net, other = network(admin, project), network(admin, project, name="other")
    foreign = subnet(admin, other, "10.9.0.0/24")
    subnet(admin, net)
    with pytest.raises(InvalidRequest, match="is not on network"):
        port(admin, project, net, fixed_ips=[FixedIPRequest(subnet=foreign)])


def test_an_exhausted_pool_is_409_saying_so(admin, project):
    net = network(admin, project)
    sub = subnet(admin, net, "10.0.0.0/30")  # hosts .1 (gateway) and .2
    assert sub.allocation_pools == [{"start": "10.0.0.2", "end": "10.0.0.2"}]
    assert addresses(port(admin, project, net)) == ["10.0.0.2"]
    with pytest.raises(PoolExhausted) as refused:
        port(admin, project, net)
    assert str(refused.value) == f"subnet {sub.id} has no free address in its allocation pools"
    with pytest.raises(PoolExhausted):
        port(admin, project, net, fixed_ips=[FixedIPRequest(subnet=sub)])
    assert Port.objects.count() == 1


def test_a_port_on_a_network_without_subnet_has_no_address_and_empty_list_means_none(admin, project):
    net = network(admin, project)
    assert addresses(port(admin, project, net)) == []
    subnet(admin, net)
    assert addresses(port(admin, project, net, fixed_ips=[])) == []


def test_the_default_allocation_moves_to_the_next_subnet_with_room(admin, project):
    net = network(admin, project)
    subnet(admin, net, "10.0.0.0/30")
    subnet(admin, net, "10.0.1.0/24")
    assert addresses(port(admin, project, net)) == ["10.0.0.2"]
    assert addresses(port(admin, project, net)) == ["10.0.1.2"]


def test_a_lost_race_for_an_address_takes_the_next_one(admin, project, monkeypatch):
    """Another transaction inserted 10.0.0.2 between our read and our insert: the unique constraint
    refuses ours, we read again and take .3 (the retry path, without threads)."""
    net = network(admin, project)
    sub = subnet(admin, net)
    port(admin, project, net)  # holds .2
    reads = stale_first(monkeypatch, "subnet_allocated_addresses")  # the first read misses .2
    p = port(admin, project, net)
    assert addresses(p) == ["10.0.0.3"] and len(reads) == 2
    assert PortFixedIP.objects.filter(subnet=sub, ip_address="10.0.0.2").count() == 1


def test_the_database_refuses_a_double_allocation(admin, project):
    net = network(admin, project)
    sub = subnet(admin, net)
    first = port(admin, project, net)
    second = port(admin, project, net, fixed_ips=[])
    with pytest.raises(IntegrityError), transaction.atomic():
        PortFixedIP.objects.create(port=second, subnet=sub, ip_address=addresses(first)[0])


@pytest.mark.django_db(transaction=True)
def test_concurrent_port_creations_never_share_an_address(admin, project):
    net = network(admin, project)
    sub = subnet(admin, net, "10.0.0.0/28")  # 13 pool addresses (.2 - .14)

    def create(i: int) -> str:
        try:
            return addresses(port(admin, project, net, name=f"p{i}"))[0]
        except PoolExhausted:
            return "exhausted"

    got = run_concurrently(create, list(range(16)))
    given = [a for a in got if a != "exhausted"]
    assert len(got) == 16 and len(given) == 13 and len(set(given)) == 13
    assert got.count("exhausted") == 3
    assert PortFixedIP.objects.filter(subnet=sub).count() == 13


# --- VNIs and MAC addresses ------------------------------------------------------------------------


def test_vxlan_networks_get_the_lowest_free_vni_and_the_mtu_minus_overhead(admin, project):
    a, b = network(admin, project), network(admin, project)
    assert (a.segmentation_id, b.segmentation_id) == (1000, 1001)
    assert a.mtu == 1450 and a.provider_type == "vxlan"
    services.network_delete(network=a, user=admin)
    assert network(admin, project).segmentation_id == 1000


def test_flat_networks_have_no_vni_and_the_physical_mtu(admin, project):
    flat = network(admin, project, provider_type="flat")
    assert flat.segmentation_id is None and flat.mtu == 1500
    with pytest.raises(InvalidRequest, match="between 68 and 1450"):
        network(admin, project, mtu=1500)
    assert network(admin, project, mtu=1400).mtu == 1400


def test_the_vni_range_runs_out_with_409(admin, project, settings):
    settings.NETWORK_VNI_RANGE = (5000, 5001)
    assert [network(admin, project).segmentation_id for _ in range(2)] == [5000, 5001]
    with pytest.raises(SegmentationIdExhausted, match="no free VXLAN VNI in NETWORK_VNI_RANGE 5000:5001"):
        network(admin, project)
    assert network(admin, project, provider_type="flat").segmentation_id is None  # flat needs none


def test_an_administrator_may_name_a_vni_once(admin, project):
    assert network(admin, project, segmentation_id=7777).segmentation_id == 7777
    with pytest.raises(SegmentationIdInUse):
        network(admin, project, segmentation_id=7777)


def test_a_lost_race_for_a_vni_takes_the_next_one(admin, project, monkeypatch):
    network(admin, project)  # holds 1000
    reads = stale_first(monkeypatch, "used_segmentation_ids")  # the first read misses 1000
    assert network(admin, project).segmentation_id == 1001 and len(reads) == 2


def test_mac_addresses_are_generated_like_neutrons_or_given(admin, project):
    net = network(admin, project)
    generated = port(admin, project, net)
    assert generated.mac_address.startswith("fa:16:3e:") and len(generated.mac_address) == 17
    given = port(admin, project, net, mac_address="FA:16:3E:00:00:01")
    assert given.mac_address == "fa:16:3e:00:00:01"
    with pytest.raises(MacAddressInUse, match=str(given.id)):
        port(admin, project, net, mac_address="fa:16:3e:00:00:01")
    with pytest.raises(InvalidRequest, match="multicast"):
        port(admin, project, net, mac_address="01:00:5e:00:00:01")
    with pytest.raises(InvalidRequest, match="is not a MAC address"):
        port(admin, project, net, mac_address="fa:16:3e:00:01")
