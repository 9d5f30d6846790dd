"""The resources a project's quota limits: their names, where their defaults come from, and how
Nova's ``GET /limits`` names them.

A limit of -1 is unlimited (as Nova and Neutron). Most resources are counted per project; two are
counted per owner inside the project: ``server_group_members`` per server group (as Nova) and
``keypairs`` per user (as Nova; counted once key pairs exist).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

UNLIMITED = -1


@dataclass(frozen=True)
class Resource:
    name: str
    # The Django setting (and environment variable) holding the default limit.
    setting: str
    description: str
    # What one limit counts in: "project", or a narrower owner inside the project.
    per: str = "project"
    # Nova's GET /limits keys (absolute): the limit's and, where Nova has one, the usage's.
    nova_max: str = ""
    nova_used: str = ""

    @property
    def default(self) -> int:
        return int(getattr(settings, self.setting))


RESOURCES: tuple[Resource, ...] = (
    Resource("instances", "QUOTA_INSTANCES", "servers not deleted (ERROR included)",
             nova_max="maxTotalInstances", nova_used="totalInstancesUsed"),
    Resource("cores", "QUOTA_CORES", "vCPUs of those servers (the larger flavor while a resize "
             "is pending)", nova_max="maxTotalCores", nova_used="totalCoresUsed"),
    Resource("ram", "QUOTA_RAM", "MiB of RAM of those servers (the larger flavor while a resize "
             "is pending)", nova_max="maxTotalRAMSize", nova_used="totalRAMUsed"),
    Resource("server_groups", "QUOTA_SERVER_GROUPS", "server groups",
             nova_max="maxServerGroups", nova_used="totalServerGroupsUsed"),
    Resource("server_group_members", "QUOTA_SERVER_GROUP_MEMBERS",
             "servers not deleted in one server group", per="server_group",
             nova_max="maxServerGroupMembers"),
    Resource("keypairs", "QUOTA_KEYPAIRS", "key pairs of one user", per="user",
             nova_max="maxTotalKeypairs"),
    Resource("images", "QUOTA_IMAGES", "images owned by the project, not deleted"),
    Resource("image_bytes", "QUOTA_IMAGE_BYTES", "bytes of the project's active images"),
    Resource("networks", "QUOTA_NETWORKS", "networks"),
    Resource("ports", "QUOTA_PORTS", "ports, except cloudctl's own (device_owner network:*: DHCP, "
             "router and floating-IP ports)"),
    Resource("routers", "QUOTA_ROUTERS", "routers"),
    Resource("floating_ips", "QUOTA_FLOATING_IPS", "floating IPs"),
    Resource("security_groups", "QUOTA_SECURITY_GROUPS", "security groups (default included)"),
    Resource("security_group_rules", "QUOTA_SECURITY_GROUP_RULES",
             "rules of the project's security groups"),
)

BY_NAME: dict[str, Resource] = {r.name: r for r in RESOURCES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
