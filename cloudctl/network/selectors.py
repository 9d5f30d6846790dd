"""Reads: which networks, subnets, ports and security groups a user may see, and the address
bookkeeping IPAM reads. Members see their project's objects plus shared and external networks (and
those networks' subnets); administrators see everything; whatever else is 404."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Q, QuerySet

from cloudctl.identity.services import is_admin, project_id_of
from cloudctl.network.models import (
    NETWORK_OWNED_DEVICE_OWNERS,
    Network,
    Port,
    PortFixedIP,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
)


def networks_visible_to(user: Any) -> QuerySet[Network]:
    networks = Network.objects.select_related("project")
    if is_admin(user):
        return networks
    return networks.filter(Q(project_id=project_id_of(user)) | Q(shared=True) | Q(external=True))


def subnets_visible_to(user: Any) -> QuerySet[Subnet]:
    return Subnet.objects.filter(network__in=networks_visible_to(user)).select_related("network")


def ports_visible_to(user: Any) -> QuerySet[Port]:
    ports = Port.objects.select_related("network", "project").prefetch_related(
        "fixed_ips", "security_groups")
    if is_admin(user):
        return ports
    return ports.filter(project_id=project_id_of(user))


def security_groups_visible_to(user: Any) -> QuerySet[SecurityGroup]:
    groups = SecurityGroup.objects.select_related("project").prefetch_related("rules")
    if is_admin(user):
        return groups
    return groups.filter(project_id=project_id_of(user))


def security_group_rules_visible_to(user: Any) -> QuerySet[SecurityGroupRule]:
    return SecurityGroupRule.objects.filter(
        security_group__in=security_groups_visible_to(user)).select_related("security_group")


def subnets_with_usage() -> QuerySet[Subnet]:
    """Subnets with their network and, counted in the same query, ``allocated`` (addresses ports
    hold) and ``port_count`` (ports holding one: a port may hold two of a subnet). Read each with
    :func:`subnet_usage`."""
    return Subnet.objects.select_related("network").annotate(
        allocated=Count("fixed_ips"), port_count=Count("fixed_ips__port", distinct=True))


@dataclass(frozen=True)
class SubnetUsage:
    """A subnet's address use, as the dashboard and the admin's subnet list show it. ``used`` counts
    every address ports hold, the DHCP port's too, and a fixed IP asked for outside the pools: it may
    pass ``pool_size``."""

    subnet: Subnet
    used: int
    pool_size: int
    ports: int

    @property
    def percent(self) -> float:
        """``used`` in percent of the pools (0 for a subnet without pools)."""
        return round(100 * self.used / self.pool_size, 1) if self.pool_size else 0.0


def subnet_usage(subnet: Subnet) -> SubnetUsage:
    """The usage of a subnet of :func:`subnets_with_usage` (any other subnet costs two queries)."""
    used = getattr(subnet, "allocated", None)
    if used is None:
        used = subnet.fixed_ips.count()
    ports = getattr(subnet, "port_count", None)
    if ports is None:
        ports = subnet.fixed_ips.values("port_id").distinct().count()
    return SubnetUsage(subnet=subnet, used=used, pool_size=subnet.pool_size(), ports=ports)


def subnets_usage() -> list[SubnetUsage]:
    """Every subnet's usage, by network name then CIDR, in one query (the pool sizes are computed
    from each subnet's pools, not counted in the database)."""
    return [subnet_usage(subnet) for subnet in
            subnets_with_usage().order_by("network__name", "network_id", "cidr", "id")]


# --- IPAM reads ------------------------------------------------------------------------------------


def subnet_allocated_addresses(*, subnet: Subnet) -> set[str]:
    """The addresses of ``subnet`` held by ports, as read now (a concurrent allocation may add one:
    the unique constraint catches it)."""
    return set(PortFixedIP.objects.filter(subnet=subnet).values_list("ip_address", flat=True))


def pool_addresses(subnet: Subnet) -> Iterator[ipaddress.IPv4Address]:
    """Every address of the subnet's allocation pools, lowest first."""
    pools = sorted(subnet.allocation_pools, key=lambda p: int(ipaddress.IPv4Address(p["start"])))
    for pool in pools:
        first = int(ipaddress.IPv4Address(pool["start"]))
        last = int(ipaddress.IPv4Address(pool["end"]))
        for address in range(first, last + 1):
            yield ipaddress.IPv4Address(address)


def subnet_next_free_address(*, subnet: Subnet) -> str | None:
    """The lowest address of the allocation pools no port holds, or None when they are full."""
    taken = subnet_allocated_addresses(subnet=subnet)
    for address in pool_addresses(subnet):
        if str(address) not in taken:
            return str(address)
    return None


def address_holder(*, subnet: Subnet, ip_address: str) -> Port | None:
    held = PortFixedIP.objects.filter(subnet=subnet, ip_address=ip_address).select_related("port").first()
    return held.port if held is not None else None


def ports_blocking_network_delete(*, network: Network) -> list[Port]:
    """Ports on the network other than those the network owns (DHCP): they must go first."""
    return list(network.ports.exclude(device_owner__in=NETWORK_OWNED_DEVICE_OWNERS))


def ports_with_address_in(*, subnet: Subnet, exclude_owners: tuple[str, ...] = ()) -> list[Port]:
    return list(Port.objects.filter(fixed_ips__subnet=subnet)
                .exclude(device_owner__in=exclude_owners).distinct())


def used_segmentation_ids(*, first: int, last: int) -> set[int]:
    return set(Network.objects.filter(segmentation_id__gte=first, segmentation_id__lte=last)
               .values_list("segmentation_id", flat=True))
