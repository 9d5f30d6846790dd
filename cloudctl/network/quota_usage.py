"""The network app's part of the quotas: how its resources are counted.

Ports with a ``network:*`` device owner (DHCP, router interfaces and gateways, floating IPs' ports)
are cloudctl's own and count against no one, as in Neutron; a server's ports count against its
project like any other.
"""

from __future__ import annotations

from cloudctl.network.models import FloatingIP, Network, Port, Router, SecurityGroup, SecurityGroupRule
from cloudctl.quotas import registry

NETWORK_RESOURCES = ("networks", "ports", "routers", "floating_ips", "security_groups",
                     "security_group_rules")
SYSTEM_DEVICE_OWNER_PREFIX = "network:"


def counts_against_quota(device_owner: str) -> bool:
    return not device_owner.startswith(SYSTEM_DEVICE_OWNER_PREFIX)


def count_network(project_id: int) -> dict[str, int]:
    return {
        "networks": Network.objects.filter(project_id=project_id).count(),
        "ports": Port.objects.filter(project_id=project_id)
        .exclude(device_owner__startswith=SYSTEM_DEVICE_OWNER_PREFIX).count(),
        "routers": Router.objects.filter(project_id=project_id).count(),
        "floating_ips": FloatingIP.objects.filter(project_id=project_id).count(),
        "security_groups": SecurityGroup.objects.filter(project_id=project_id).count(),
        "security_group_rules": SecurityGroupRule.objects.filter(
            security_group__project_id=project_id).count(),
    }


def register() -> None:
    registry.register_counter(NETWORK_RESOURCES, count_network)
