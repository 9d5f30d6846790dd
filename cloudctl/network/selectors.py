"""Reads: which networks, subnets, ports and security groups a user may see, and the address
bookkeeping IPAM reads. Members see their project's objects plus shared and external networks (and
those networks' subnets); administrators see everything; whatever else is 404."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.db.models import Count, Prefetch, Q, QuerySet

from cloudctl.identity.services import is_admin, project_id_of
from cloudctl.network.models import (
    DEVICE_OWNER_FLOATINGIP,
    DEVICE_OWNER_ROUTER_GATEWAY,
    DEVICE_OWNER_ROUTER_INTERFACE,
    NETWORK_OWNED_DEVICE_OWNERS,
    FloatingIP,
    Network,
    Port,
    PortFixedIP,
    Router,
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


def routers_visible_to(user: Any) -> QuerySet[Router]:
    routers = Router.objects.select_related("project", "external_network").prefetch_related(
        "gateway_port__fixed_ips")
    if is_admin(user):
        return routers
    return routers.filter(project_id=project_id_of(user))


def floating_ips_visible_to(user: Any) -> QuerySet[FloatingIP]:
    floating = FloatingIP.objects.select_related("project", "floating_network", "port")
    if is_admin(user):
        return floating
    return floating.filter(project_id=project_id_of(user))


def router_interfaces(router_ids: list[Any]) -> dict[str, list[Port]]:
    """The interfaces of several routers in one query, each router's oldest first."""
    found: dict[str, list[Port]] = {}
    for port in (Port.objects.filter(device_owner=DEVICE_OWNER_ROUTER_INTERFACE,
                                     device_id__in=[str(r) for r in router_ids])
                 .prefetch_related("fixed_ips").order_by("created", "id")):
        found.setdefault(port.device_id, []).append(port)
    return found


def server_visible(user: Any, server_id: Any) -> bool:
    """Whether ``user`` sees a live server ``server_id`` (its project's; admins: any). Read through
    the app registry: the network app never imports the compute app."""
    instance = apps.get_model("compute", "Instance")
    servers = instance.objects.filter(uuid=server_id).exclude(vm_state="deleted")
    if not is_admin(user):
        servers = servers.filter(project_id=project_id_of(user))
    return bool(servers.exists())


def subnets_with_usage() -> QuerySet[Subnet]:
    """Subnets with their network, ``port_count`` (ports holding an address of it: a port may hold
    two) counted in the same query, and the addresses ports hold prefetched (one more query for all
    subnets). Read each with :func:`subnet_usage`."""
    return (Subnet.objects.select_related("network")
            .annotate(port_count=Count("fixed_ips__port", distinct=True))
            .prefetch_related(Prefetch("fixed_ips", queryset=PortFixedIP.objects.only(
                "id", "subnet_id", "port_id", "ip_address"))))


@dataclass(frozen=True)
class SubnetUsage:
    """A subnet's address use, as the dashboard and the admin's subnet list show it. ``used`` counts
    the addresses ports hold inside the allocation pools: a router interface's gateway address or an
    address asked for outside the pools does not use them up, so ``used`` never passes
    ``pool_size``."""

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
    pools = [(int(ipaddress.IPv4Address(p["start"])), int(ipaddress.IPv4Address(p["end"])))
             for p in subnet.allocation_pools]
    held = list(subnet.fixed_ips.all())
    used = sum(1 for f in held
               if any(start <= int(ipaddress.IPv4Address(f.ip_address)) <= end for start, end in pools))
    ports = getattr(subnet, "port_count", None)
    if ports is None:
        ports = len({f.port_id for f in held})
    return SubnetUsage(subnet=subnet, used=used, pool_size=subnet.pool_size(), ports=ports)


def subnets_usage() -> list[SubnetUsage]:
    """Every subnet's usage, by network name then CIDR, in two queries (the pool sizes are computed
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


def ports_on_external_network(*, network: Network) -> list[Port]:
    """The routers' gateway ports and the floating IPs' ports on an external network."""
    return list(network.ports.filter(device_owner__in=(DEVICE_OWNER_ROUTER_GATEWAY,
                                                       DEVICE_OWNER_FLOATINGIP)))


def ports_with_address_in(*, subnet: Subnet, exclude_owners: tuple[str, ...] = ()) -> list[Port]:
    return list(Port.objects.filter(fixed_ips__subnet=subnet)
                .exclude(device_owner__in=exclude_owners).distinct())


def used_segmentation_ids(*, first: int, last: int) -> set[int]:
    return set(Network.objects.filter(segmentation_id__gte=first, segmentation_id__lte=last)
               .values_list("segmentation_id", flat=True))
