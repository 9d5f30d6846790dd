"""Networks, subnets, ports with their fixed IPs, security groups and their rules (Neutron's shape).

The database guards what must never happen twice: a VNI (``Network.segmentation_id``), a MAC address
and an address of a subnet (``PortFixedIP``: unique per subnet) are unique columns, so a lost race
is an IntegrityError the services retry or turn into 409, never a double allocation.
"""

from __future__ import annotations

import ipaddress
import uuid

from django.db import models
from django.db.models import Q

from cloudctl.identity.models import Project

# VXLAN's encapsulation: outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN header (8).
VXLAN_OVERHEAD = 50


class ProviderType(models.TextChoices):
    VXLAN = "vxlan"
    FLAT = "flat"


class NetworkStatus(models.TextChoices):
    ACTIVE = "ACTIVE"
    BUILD = "BUILD"
    DOWN = "DOWN"
    ERROR = "ERROR"


class PortStatus(models.TextChoices):
    DOWN = "DOWN"
    BUILD = "BUILD"
    ACTIVE = "ACTIVE"


# Device owners of ports the network itself owns: deleted with their network or subnet (Neutron's
# AUTO_DELETE_PORT_OWNERS). A router's interface is not one of them: it blocks the deletion.
DEVICE_OWNER_DHCP = "network:dhcp"
NETWORK_OWNED_DEVICE_OWNERS = (DEVICE_OWNER_DHCP,)
# A router's ports (device_id: the router's id) and a floating IP's port (device_id: the floating
# IP's id): made and deleted by the router and floating-IP services, never through the ports API.
DEVICE_OWNER_ROUTER_INTERFACE = "network:router_interface"
DEVICE_OWNER_ROUTER_GATEWAY = "network:router_gateway"
DEVICE_OWNER_FLOATINGIP = "network:floatingip"
L3_DEVICE_OWNERS = (DEVICE_OWNER_ROUTER_INTERFACE, DEVICE_OWNER_ROUTER_GATEWAY,
                    DEVICE_OWNER_FLOATINGIP)
# Servers' ports: ``compute:<availability zone>`` (Nova's device_owner); the only ones hosts filter.
COMPUTE_DEVICE_OWNER_PREFIX = "compute:"


class Network(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255, blank=True)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="networks")
    shared = models.BooleanField(default=False, help_text="every project may see it and use it")
    external = models.BooleanField(default=False,
                                   help_text="routers' gateways and floating IPs come from it")
    provider_type = models.CharField(max_length=16, choices=ProviderType.choices,
                                     default=ProviderType.VXLAN)
    # The VXLAN network identifier; null for flat networks.
    segmentation_id = models.PositiveIntegerField(null=True, blank=True, unique=True)
    mtu = models.PositiveIntegerField()
    admin_state_up = models.BooleanField(default=True)
    status = models.CharField(max_length=16, choices=NetworkStatus.choices,
                              default=NetworkStatus.ACTIVE)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("created", "id")

    def __str__(self) -> str:
        return self.name or str(self.id)


class Subnet(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    network = models.ForeignKey(Network, on_delete=models.CASCADE, related_name="subnets")
    name = models.CharField(max_length=255, blank=True)
    ip_version = models.PositiveSmallIntegerField(default=4)
    cidr = models.CharField(max_length=64)
    gateway_ip = models.GenericIPAddressField(null=True, blank=True, protocol="IPv4")
    # [{"start": "10.0.0.2", "end": "10.0.0.254"}, ...], ordered, inside the cidr, without the gateway
    allocation_pools = models.JSONField(default=list)
    dns_nameservers = models.JSONField(default=list, blank=True)
    enable_dhcp = models.BooleanField(default=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("created", "id")

    def __str__(self) -> str:
        return f"{self.name or self.id} ({self.cidr})"

    @property
    def ip_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)

    def pool_size(self) -> int:
        return sum(int(ipaddress.IPv4Address(p["end"])) - int(ipaddress.IPv4Address(p["start"])) + 1
                   for p in self.allocation_pools)


class SecurityGroup(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="security_groups")
    name = models.CharField(max_length=255)
    description = models.CharField(max_length=255, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("created", "id")
        constraints = [
            # One "default" group per project, even when two first requests race to create it.
            models.UniqueConstraint(fields=["project"], condition=Q(name="default"),
                                    name="one_default_security_group_per_project"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.project})"

    @property
    def is_default(self) -> bool:
        return self.name == "default"


class Direction(models.TextChoices):
    INGRESS = "ingress"
    EGRESS = "egress"


class Protocol(models.TextChoices):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"


class SecurityGroupRule(models.Model):
    """Traffic a port of the group allows (everything else is dropped). ``remote_ip_prefix`` and
    ``remote_group`` are exclusive; neither: from/to anywhere. For icmp, ``port_range_min`` is the
    ICMP type and ``port_range_max`` the code, as in Neutron."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    security_group = models.ForeignKey(SecurityGroup, on_delete=models.CASCADE, related_name="rules")
    direction = models.CharField(max_length=8, choices=Direction.choices)
    ethertype = models.CharField(max_length=8, default="IPv4")
    protocol = models.CharField(max_length=8, choices=Protocol.choices, null=True, blank=True)
    port_range_min = models.PositiveIntegerField(null=True, blank=True)
    port_range_max = models.PositiveIntegerField(null=True, blank=True)
    remote_ip_prefix = models.CharField(max_length=64, null=True, blank=True)
    # Rules naming a deleted group go with it (Neutron's cascade).
    remote_group = models.ForeignKey(SecurityGroup, null=True, blank=True, on_delete=models.CASCADE,
                                     related_name="remote_rules")
    description = models.CharField(max_length=255, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("created", "id")
        constraints = [
            models.CheckConstraint(condition=Q(remote_ip_prefix__isnull=True) | Q(remote_group__isnull=True),
                                   name="rule_remote_prefix_xor_group"),
        ]

    def __str__(self) -> str:
        ports = ""
        if self.port_range_min is not None:
            ports = f" {self.port_range_min}-{self.port_range_max}"
        remote = self.remote_ip_prefix or (f"group {self.remote_group_id}" if self.remote_group_id
                                           else "any")
        return f"{self.direction} {self.ethertype} {self.protocol or 'any'}{ports} {remote}"


class Port(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    network = models.ForeignKey(Network, on_delete=models.PROTECT, related_name="ports")
    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="ports")
    name = models.CharField(max_length=255, blank=True)
    mac_address = models.CharField(max_length=17, unique=True)
    security_groups = models.ManyToManyField(SecurityGroup, blank=True, related_name="ports")
    device_id = models.CharField(max_length=255, blank=True, db_index=True)
    device_owner = models.CharField(max_length=255, blank=True)
    # The host the port is bound to (set by the compute side when it plugs the port). Indexed with
    # migrating_to: a host's network state (cloudctl.network.hostsync) is read by them.
    binding_host = models.CharField(max_length=255, blank=True, db_index=True)
    # The destination of a live migration of the port's server, from pre_live_migration until the
    # migration lands (binding_host moves there) or fails: that host plugs and filters the port
    # before the guest moves (Neutron's migrating_to binding profile).
    migrating_to = models.CharField(max_length=255, blank=True, default="", db_index=True)
    # Neutron's port security: off, the port has no security groups and no anti-spoofing.
    port_security_enabled = models.BooleanField(default=True)
    status = models.CharField(max_length=8, choices=PortStatus.choices, default=PortStatus.DOWN)
    admin_state_up = models.BooleanField(default=True)
    # A port the user passed to a server's create (Nova's preserve_on_delete): unbound, not deleted,
    # when the server goes. A port the server's create made is deleted with it.
    preserve_on_delete = models.BooleanField(default=False)
    # The port's place among its server's NICs (the order the create asked for); null when unbound.
    device_index = models.PositiveSmallIntegerField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("created", "id")

    def __str__(self) -> str:
        return self.name or str(self.id)


class PortFixedIP(models.Model):
    """An address of a subnet held by a port: the database refuses a second holder."""

    port = models.ForeignKey(Port, on_delete=models.CASCADE, related_name="fixed_ips")
    subnet = models.ForeignKey(Subnet, on_delete=models.PROTECT, related_name="fixed_ips")
    ip_address = models.GenericIPAddressField(protocol="IPv4")

    class Meta:
        ordering = ("id",)
        constraints = [
            models.UniqueConstraint(fields=["subnet", "ip_address"], name="one_port_per_address"),
        ]

    def __str__(self) -> str:
        return f"{self.ip_address} ({self.port_id})"


class RouterStatus(models.TextChoices):
    ACTIVE = "ACTIVE"
    ERROR = "ERROR"


class Router(models.Model):
    """A project's router (Neutron's L3): its interfaces are ports with device_owner
    ``network:router_interface`` and device_id the router's id, each holding its subnet's gateway
    address; its gateway is ``gateway_port`` (``network:router_gateway``) on ``external_network``.
    The network node runs it (namespace ``qrouter-<id>``)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="routers")
    name = models.CharField(max_length=255, blank=True)
    # The gateway's network (external); null: no gateway, so no SNAT and no floating IPs.
    external_network = models.ForeignKey(Network, null=True, blank=True, on_delete=models.PROTECT,
                                         related_name="gateway_routers")
    enable_snat = models.BooleanField(default=True,
                                      help_text="the subnets behind it reach outside as the "
                                                "gateway's address")
    gateway_port = models.OneToOneField(Port, null=True, blank=True, on_delete=models.PROTECT,
                                        related_name="gateway_of")
    status = models.CharField(max_length=16, choices=RouterStatus.choices, default=RouterStatus.ACTIVE)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("created", "id")

    def __str__(self) -> str:
        return self.name or str(self.id)


class FloatingIPStatus(models.TextChoices):
    ACTIVE = "ACTIVE"  # associated: the router DNATs it to the fixed IP
    DOWN = "DOWN"


class FloatingIP(models.Model):
    """An address of an external network (held by ``floating_port``, device_owner
    ``network:floatingip``) that the ``router`` maps to ``fixed_ip_address`` of ``port`` while it is
    associated. A fixed IP has at most one floating IP (a unique constraint: of two concurrent
    associations one gets 409)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="floating_ips")
    floating_network = models.ForeignKey(Network, on_delete=models.PROTECT,
                                         related_name="floating_ips")
    floating_port = models.OneToOneField(Port, on_delete=models.PROTECT, related_name="floating_ip_of")
    floating_ip_address = models.GenericIPAddressField(protocol="IPv4")
    # The association: the fixed port, its address the floating IP maps to, the router doing it.
    port = models.ForeignKey(Port, null=True, blank=True, on_delete=models.PROTECT,
                             related_name="floating_ips")
    fixed_ip_address = models.GenericIPAddressField(protocol="IPv4", null=True, blank=True)
    router = models.ForeignKey(Router, null=True, blank=True, on_delete=models.PROTECT,
                               related_name="floating_ips")
    status = models.CharField(max_length=8, choices=FloatingIPStatus.choices,
                              default=FloatingIPStatus.DOWN)
    description = models.CharField(max_length=255, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("created", "id")
        constraints = [
            models.UniqueConstraint(fields=["port", "fixed_ip_address"],
                                    condition=Q(port__isnull=False),
                                    name="one_floating_ip_per_fixed_ip"),
            models.CheckConstraint(
                condition=(Q(port__isnull=True, fixed_ip_address__isnull=True, router__isnull=True)
                           | Q(port__isnull=False, fixed_ip_address__isnull=False,
                               router__isnull=False)),
                name="floating_ip_associated_whole"),
        ]

    def __str__(self) -> str:
        return self.floating_ip_address
