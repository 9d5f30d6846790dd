"""Network operations: one function per operation, keyword-only arguments, called by every interface
(API, admin). Validation errors are :class:`~cloudctl.errors.InvalidRequest` (400 naming the field),
conflicts :mod:`cloudctl.network.errors` (409 naming what blocks).

Races are settled by the database: a VNI, a MAC address and an address of a subnet are unique
columns. Allocation reads what is free, inserts in a savepoint and, when a concurrent transaction got
there first (IntegrityError), reads again and takes the next one. What changes a network's ports or
subnets (port create, subnet create and delete, network delete, un-sharing) also locks the network's
row (``FOR NO KEY UPDATE`` on PostgreSQL; SQLite's IMMEDIATE transactions serialise writers anyway):
allocators on one network take turns instead of all chasing the same lowest address, and a port
cannot appear on a network being deleted (its foreign key is checked only at commit there, which
would end in a 500). The unique constraints stay the last word on what is allocated twice.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from django.conf import settings
from django.db import IntegrityError, transaction

from cloudctl.errors import InvalidRequest
from cloudctl.identity.models import Project
from cloudctl.identity.services import is_admin, project_id_of
from cloudctl.network import dhcp, hostsync, routers, selectors
from cloudctl.network.errors import (
    AddressInUse,
    InUse,
    MacAddressInUse,
    NetworkConflict,
    NotOwner,
    PoolExhausted,
    SegmentationIdExhausted,
    SegmentationIdInUse,
)
from cloudctl.network.models import (
    DEVICE_OWNER_DHCP,
    DEVICE_OWNER_ROUTER_INTERFACE,
    L3_DEVICE_OWNERS,
    NETWORK_OWNED_DEVICE_OWNERS,
    VXLAN_OVERHEAD,
    Direction,
    Network,
    Port,
    PortFixedIP,
    Protocol,
    ProviderType,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
)
from cloudctl.network.quota_usage import counts_against_quota
from cloudctl.quotas.services import quota_enforce

log = logging.getLogger(__name__)

T = TypeVar("T")

# Attempts at an allocation that lost a race (another transaction inserted the same VNI, MAC or
# address between our read and our insert) before giving up with 409.
ALLOCATION_ATTEMPTS = 10
VNI_MAX = 16777215  # 24 bits
MIN_MTU = 68  # IPv4's minimum
DEFAULT_SECURITY_GROUP = "default"
# A subnet's gateway_ip when the caller does not give one: the first host address.
AUTO = "auto"


def _require_owner(network: Network, user: Any, verb: str) -> None:
    """A shared or external network is visible to every project, but only its own project (or an
    administrator) may change it: 403 for the others."""
    if is_admin(user) or network.project_id == project_id_of(user):
        return
    raise NotOwner(f"network {network.id} belongs to another project; only that project or an "
                   f"administrator may {verb} it")


def _lock_network(network: Network) -> Network:
    """Lock the network's row for the transaction (see the module's docstring); 409 when it has
    been deleted meanwhile."""
    locked = Network.objects.select_for_update(no_key=True).filter(pk=network.pk).first()
    if locked is None:
        raise NetworkConflict(f"network {network.id} was deleted")
    return locked


def _refuse_admin_only(user: Any, **given: Any) -> None:
    """400 for a non-administrator who sets one of the administrators' fields."""
    if is_admin(user):
        return
    for field, value in given.items():
        if value is not None:
            raise InvalidRequest(field, "only administrators may set this field")


def _savepoint_retry(attempt: Callable[[], T], *, attempts: int, on_exhausted: Callable[[], Exception]) -> T:
    """Run ``attempt`` in a savepoint until it does not raise IntegrityError (a concurrent insert of
    the same unique value), at most ``attempts`` times."""
    for _ in range(attempts):
        try:
            with transaction.atomic():
                return attempt()
        except IntegrityError:
            log.info("allocation lost a race; reading again")
    raise on_exhausted()


# --- networks --------------------------------------------------------------------------------------


def network_max_mtu(provider_type: str) -> int:
    """The largest MTU a network of this type carries: the physical MTU, minus VXLAN's 50 bytes."""
    physical: int = settings.NETWORK_PHYSICAL_MTU
    return physical - VXLAN_OVERHEAD if provider_type == ProviderType.VXLAN else physical


def _check_mtu(mtu: int, provider_type: str) -> None:
    most = network_max_mtu(provider_type)
    if not MIN_MTU <= mtu <= most:
        raise InvalidRequest("mtu", f"must be between {MIN_MTU} and {most} for a {provider_type} network"
                             + (f" ({settings.NETWORK_PHYSICAL_MTU} minus {VXLAN_OVERHEAD} bytes of "
                                "VXLAN overhead)" if provider_type == ProviderType.VXLAN else ""))


def _allocate_vni() -> int:
    first, last = settings.NETWORK_VNI_RANGE
    used = selectors.used_segmentation_ids(first=first, last=last)
    for vni in range(first, last + 1):
        if vni not in used:
            return vni
    raise SegmentationIdExhausted(f"no free VXLAN VNI in NETWORK_VNI_RANGE {first}:{last} "
                                  f"(all {last - first + 1} are in use)")


@transaction.atomic
def network_create(*, user: Any, project: Project, name: str = "", shared: bool = False,
                   admin_state_up: bool = True, mtu: int | None = None, external: bool | None = None,
                   provider_type: str | None = None, segmentation_id: int | None = None) -> Network:
    """A network of ``project``. ``external``, ``provider_type`` and ``segmentation_id`` are for
    administrators (None: not given). A vxlan network gets the lowest free VNI of NETWORK_VNI_RANGE
    unless an administrator names one; its MTU defaults to the largest it can carry."""
    _refuse_admin_only(user, external=external, provider_type=provider_type,
                       segmentation_id=segmentation_id)
    kind = provider_type or ProviderType.VXLAN
    if kind not in ProviderType.values:
        raise InvalidRequest("provider_type", f"must be one of {', '.join(ProviderType.values)}")
    if kind == ProviderType.FLAT and segmentation_id is not None:
        raise InvalidRequest("segmentation_id", "a flat network has no segmentation id")
    if segmentation_id is not None and not 1 <= segmentation_id <= VNI_MAX:
        raise InvalidRequest("segmentation_id", f"a VXLAN VNI is between 1 and {VNI_MAX}")
    if mtu is None:
        mtu = network_max_mtu(kind)
    _check_mtu(mtu, kind)
    quota_enforce(project=project, requested={"networks": 1})
    fields = {"name": name, "project": project, "shared": shared, "external": bool(external),
              "provider_type": kind, "mtu": mtu, "admin_state_up": admin_state_up}
    if kind == ProviderType.FLAT:
        return Network.objects.create(**fields, segmentation_id=None)
    if segmentation_id is not None:
        try:
            with transaction.atomic():
                return Network.objects.create(**fields, segmentation_id=segmentation_id)
        except IntegrityError:
            holder = Network.objects.filter(segmentation_id=segmentation_id).first()
            raise SegmentationIdInUse(f"VNI {segmentation_id} is in use by network "
                                      f"{holder.id if holder else '(being created)'}") from None
    return _savepoint_retry(
        lambda: Network.objects.create(**fields, segmentation_id=_allocate_vni()),
        attempts=ALLOCATION_ATTEMPTS,
        on_exhausted=lambda: SegmentationIdExhausted("no VNI could be allocated: too many concurrent "
                                                     "network creations; try again"))


@transaction.atomic
def network_update(*, network: Network, user: Any, name: str | None = None, shared: bool | None = None,
                   admin_state_up: bool | None = None, mtu: int | None = None,
                   external: bool | None = None) -> Network:
    """Change what may change of a network (None: unchanged); its project or an administrator."""
    _require_owner(network, user, "change")
    _refuse_admin_only(user, external=external)
    if mtu is not None:
        _check_mtu(mtu, network.provider_type)
    if external is False and network.external:
        _lock_network(network)
        users = selectors.ports_on_external_network(network=network)
        if users:
            raise InUse(f"network {network.id} cannot stop being external: routers' gateways or "
                        f"floating IPs are on it: {', '.join(port_label(p) for p in users)}",
                        ports=[str(p.id) for p in users])
    if shared is False and network.shared:
        _lock_network(network)
        foreign = list(network.ports.exclude(project_id=network.project_id))
        if foreign:
            raise InUse(f"network {network.id} cannot stop being shared: other projects have "
                        f"{len(foreign)} port(s) on it: {', '.join(port_label(p) for p in foreign)}",
                        ports=[str(p.id) for p in foreign])
    changes = {key: value for key, value in (("name", name), ("shared", shared), ("mtu", mtu),
                                              ("admin_state_up", admin_state_up),
                                              ("external", external)) if value is not None}
    mtu_changed = mtu is not None and mtu != network.mtu
    for key, value in changes.items():
        setattr(network, key, value)
    if changes:
        network.save(update_fields=[*changes, "updated"])
    if mtu_changed:
        hostsync.network_changed(network)  # the hosts' bridges and taps take the new MTU
    return network


@transaction.atomic
def network_delete(*, network: Network, user: Any) -> None:
    """Delete a network with its subnets and the ports it owns (DHCP); 409 naming any other port."""
    _require_owner(network, user, "delete")
    network = Network.objects.select_for_update().get(pk=network.pk)
    blocking = selectors.ports_blocking_network_delete(network=network)
    if blocking:
        names = [port_label(p) for p in blocking]
        raise InUse(f"network {network.id} has {len(blocking)} port(s) in use: {', '.join(names)}; "
                    "delete them first", ports=[str(p.id) for p in blocking])
    dhcp.dhcp_sync(network, force=dhcp.has_dhcp(network))  # sent at commit: the network is gone
    owned = Port.objects.filter(network_id=network.pk, device_owner__in=NETWORK_OWNED_DEVICE_OWNERS)
    with hostsync.bindings_change(owned):  # the network node's bridge goes
        owned.delete()
    network.subnets.all().delete()
    network.delete()


def port_label(port: Port) -> str:
    owner = f", {port.device_owner} {port.device_id}".rstrip() if port.device_owner else ""
    return f"{port.id} ({port.name or 'unnamed'}{owner})"


# --- subnets ---------------------------------------------------------------------------------------


def _address(value: Any, field: str) -> ipaddress.IPv4Address:
    try:
        address = ipaddress.ip_address(value)
    except (ValueError, TypeError):
        raise InvalidRequest(field, f"{value!r} is not an IP address") from None
    if not isinstance(address, ipaddress.IPv4Address):
        raise InvalidRequest(field, f"{value} is an IPv6 address; only IPv4 is supported for now")
    return address


def _parse_cidr(cidr: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
    except (ValueError, TypeError, AttributeError):
        raise InvalidRequest("cidr", f"{cidr!r} is not a CIDR (e.g. 10.0.0.0/24)") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise InvalidRequest("cidr", "only IPv4 subnets are supported for now")
    if "/" not in cidr:
        raise InvalidRequest("cidr", f"{cidr} has no prefix length (e.g. 10.0.0.0/24)")
    if ipaddress.ip_interface(cidr.strip()).ip != net.network_address:
        raise InvalidRequest("cidr", f"{cidr} has host bits set; did you mean {net}?")
    if net.prefixlen > 30:
        raise InvalidRequest("cidr", f"{net} is too small: a subnet needs a prefix of /30 or shorter")
    return net


def _usable(net: ipaddress.IPv4Network, address: ipaddress.IPv4Address) -> bool:
    """Inside the network and neither its network nor its broadcast address."""
    return address in net and address not in (net.network_address, net.broadcast_address)


def _default_pools(net: ipaddress.IPv4Network,
                   gateway: ipaddress.IPv4Address | None) -> list[dict[str, str]]:
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    ranges = [(first, last)]
    if gateway is not None:
        g = int(gateway)
        ranges = [(first, g - 1), (g + 1, last)]
    return [{"start": str(ipaddress.IPv4Address(a)), "end": str(ipaddress.IPv4Address(b))}
            for a, b in ranges if a <= b]


def _check_pools(net: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address | None,
                 pools: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    checked: list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]] = []
    for pool in pools:
        if not isinstance(pool, dict) or set(pool) != {"start", "end"}:
            raise InvalidRequest("allocation_pools", 'each pool is {"start": address, "end": address}')
        start = _address(pool["start"], "allocation_pools")
        end = _address(pool["end"], "allocation_pools")
        if start > end:
            raise InvalidRequest("allocation_pools", f"pool {start}-{end} ends before it starts")
        for edge in (start, end):
            if not _usable(net, edge):
                raise InvalidRequest("allocation_pools", f"pool {start}-{end} is not inside the host "
                                     f"addresses of {net}")
        if gateway is not None and start <= gateway <= end:
            raise InvalidRequest("allocation_pools", f"pool {start}-{end} contains the gateway "
                                 f"{gateway}")
        for other_start, other_end in checked:
            if start <= other_end and other_start <= end:
                raise InvalidRequest("allocation_pools", f"pool {start}-{end} overlaps pool "
                                     f"{other_start}-{other_end}")
        checked.append((start, end))
    checked.sort()
    return [{"start": str(a), "end": str(b)} for a, b in checked]


def _check_nameservers(nameservers: Sequence[Any]) -> list[str]:
    found: list[str] = []
    for value in nameservers:
        address = str(_address(value, "dns_nameservers"))
        if address in found:
            raise InvalidRequest("dns_nameservers", f"{address} is listed twice")
        found.append(address)
    return found


@transaction.atomic
def subnet_create(*, user: Any, network: Network, cidr: str, name: str = "",
                  gateway_ip: str | None = AUTO, allocation_pools: Sequence[dict[str, Any]] | None = None,
                  dns_nameservers: Sequence[str] = (), enable_dhcp: bool = True) -> Subnet:
    """An IPv4 subnet of ``network``. ``gateway_ip``: an address, None (no gateway) or AUTO (the first
    host address). Pools default to the host addresses minus the gateway. The network's row is locked
    so that two concurrent subnets cannot both pass the overlap check."""
    _require_owner(network, user, "add subnets to")
    net = _parse_cidr(cidr)
    gateway: ipaddress.IPv4Address | None
    if gateway_ip == AUTO:
        gateway = net.network_address + 1
    elif gateway_ip is None:
        gateway = None
    else:
        gateway = _address(gateway_ip, "gateway_ip")
        if not _usable(net, gateway):
            raise InvalidRequest("gateway_ip", f"{gateway} is not a host address of {net}")
    pools = (_default_pools(net, gateway) if allocation_pools is None
             else _check_pools(net, gateway, allocation_pools))
    nameservers = _check_nameservers(dns_nameservers)
    _lock_network(network)
    for other in network.subnets.all():
        if net.overlaps(other.ip_network):
            raise InvalidRequest("cidr", f"{net} overlaps {other.cidr} of subnet {other.id}"
                                 f"{f' ({other.name})' if other.name else ''} on the same network")
    subnet = Subnet.objects.create(network=network, name=name, cidr=str(net),
                                   gateway_ip=str(gateway) if gateway is not None else None,
                                   allocation_pools=pools, dns_nameservers=nameservers,
                                   enable_dhcp=enable_dhcp)
    _dhcp_changed(network)
    return subnet


@transaction.atomic
def subnet_update(*, subnet: Subnet, user: Any, name: str | None = None,
                  dns_nameservers: Sequence[str] | None = None, enable_dhcp: bool | None = None) -> Subnet:
    """Change a subnet's name, DNS servers or DHCP; turning DHCP on or off gives the network's DHCP
    port an address in it or takes it back (and makes or removes that port)."""
    _require_owner(subnet.network, user, "change subnets of")
    if enable_dhcp is not None and enable_dhcp != subnet.enable_dhcp:
        _lock_network(subnet.network)
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if dns_nameservers is not None:
        changes["dns_nameservers"] = _check_nameservers(dns_nameservers)
    if enable_dhcp is not None:
        changes["enable_dhcp"] = enable_dhcp
    for key, value in changes.items():
        setattr(subnet, key, value)
    if changes:
        subnet.save(update_fields=[*changes, "updated"])
        if "enable_dhcp" in changes or subnet.enable_dhcp:
            _dhcp_changed(subnet.network)
    return subnet


@transaction.atomic
def subnet_delete(*, subnet: Subnet, user: Any) -> None:
    """Delete a subnet no port holds an address of (the network's DHCP ports give theirs up);
    409 naming the ports otherwise."""
    _require_owner(subnet.network, user, "delete subnets of")
    _lock_network(subnet.network)
    holders = selectors.ports_with_address_in(subnet=subnet, exclude_owners=NETWORK_OWNED_DEVICE_OWNERS)
    if holders:
        raise InUse(f"subnet {subnet.id} has {len(holders)} port(s) with addresses in it: "
                    f"{', '.join(port_label(p) for p in holders)}; delete them first",
                    ports=[str(p.id) for p in holders])
    PortFixedIP.objects.filter(subnet=subnet).delete()
    network = subnet.network
    subnet.delete()
    _dhcp_changed(network)


# --- security groups -------------------------------------------------------------------------------


def security_group_default(*, project: Project) -> SecurityGroup:
    """The project's ``default`` group, created on first need with Neutron's default rules: egress
    allowed to anywhere, ingress only from ports of the same group. Two first needs at once make
    one group (a conditional unique constraint), both get it."""
    found = SecurityGroup.objects.filter(project=project, name=DEFAULT_SECURITY_GROUP).first()
    if found is not None:
        return found
    try:
        with transaction.atomic():
            group = SecurityGroup.objects.create(project=project, name=DEFAULT_SECURITY_GROUP,
                                                 description="Default security group")
            SecurityGroupRule.objects.create(security_group=group, direction=Direction.EGRESS)
            SecurityGroupRule.objects.create(security_group=group, direction=Direction.INGRESS,
                                             remote_group=group)
            return group
    except IntegrityError:
        return SecurityGroup.objects.get(project=project, name=DEFAULT_SECURITY_GROUP)


@transaction.atomic
def security_group_create(*, user: Any, project: Project, name: str,
                          description: str = "") -> SecurityGroup:
    """A group of ``project`` that allows egress anywhere (as Neutron's new groups) and no ingress."""
    if name == DEFAULT_SECURITY_GROUP:
        raise InvalidRequest("name", "'default' is the name of the project's default group, made by "
                             "cloudctl; choose another")
    quota_enforce(project=project, requested={"security_groups": 1, "security_group_rules": 1})
    group = SecurityGroup.objects.create(project=project, name=name, description=description)
    SecurityGroupRule.objects.create(security_group=group, direction=Direction.EGRESS)
    return group


@transaction.atomic
def security_group_delete(*, group: SecurityGroup, user: Any) -> None:
    """Delete a group no port uses; the default group stays (409)."""
    if group.is_default:
        raise NetworkConflict(f"security group {group.id} is the project's default group; it cannot "
                              "be deleted")
    SecurityGroup.objects.select_for_update().filter(pk=group.pk).first()
    users = list(group.ports.all())
    if users:
        raise InUse(f"security group {group.id} is used by {len(users)} port(s): "
                    f"{', '.join(port_label(p) for p in users)}", ports=[str(p.id) for p in users])
    # Other groups' rules naming it as remote_group go with it (cascade): read their hosts first.
    hostsync.members_changed([group.pk])
    group.delete()


def _check_rule_ports(protocol: str | None, low: int | None, high: int | None) -> None:
    if protocol in (Protocol.TCP, Protocol.UDP):
        for field, value in (("port_range_min", low), ("port_range_max", high)):
            if value is not None and not 1 <= value <= 65535:
                raise InvalidRequest(field, f"a {protocol} port is between 1 and 65535")
        if (low is None) != (high is None):
            raise InvalidRequest("port_range_max" if high is None else "port_range_min",
                                 "give both ends of the port range (or neither: every port)")
        if low is not None and high is not None and low > high:
            raise InvalidRequest("port_range_min", f"{low} is above port_range_max {high}")
    elif protocol == Protocol.ICMP:
        # As Neutron: port_range_min is the ICMP type, port_range_max the code.
        for field, value in (("port_range_min", low), ("port_range_max", high)):
            if value is not None and not 0 <= value <= 255:
                raise InvalidRequest(field, "an ICMP type or code is between 0 and 255")
        if low is None and high is not None:
            raise InvalidRequest("port_range_max", "an ICMP code (port_range_max) needs a type "
                                 "(port_range_min)")
    elif low is not None or high is not None:
        raise InvalidRequest("port_range_min" if low is not None else "port_range_max",
                             "a port range needs a protocol (tcp, udp, or icmp for type/code)")


@transaction.atomic
def security_group_rule_create(*, user: Any, security_group: SecurityGroup, direction: str,
                               ethertype: str = "IPv4", protocol: str | None = None,
                               port_range_min: int | None = None, port_range_max: int | None = None,
                               remote_ip_prefix: str | None = None,
                               remote_group: SecurityGroup | None = None,
                               description: str = "") -> SecurityGroupRule:
    """A rule of ``security_group``; 409 when the same rule exists."""
    if direction not in Direction.values:
        raise InvalidRequest("direction", "must be ingress or egress")
    if ethertype != "IPv4":
        raise InvalidRequest("ethertype", "only IPv4 is supported for now")
    if protocol is not None and protocol not in Protocol.values:
        raise InvalidRequest("protocol", f"must be null (any) or one of {', '.join(Protocol.values)}")
    _check_rule_ports(protocol, port_range_min, port_range_max)
    if remote_ip_prefix is not None and remote_group is not None:
        raise InvalidRequest("remote_group", "give remote_ip_prefix or remote_group, not both")
    if remote_ip_prefix is not None:
        try:
            prefix = ipaddress.ip_network(remote_ip_prefix, strict=False)
        except (ValueError, TypeError):
            raise InvalidRequest("remote_ip_prefix", f"{remote_ip_prefix!r} is not a CIDR") from None
        if not isinstance(prefix, ipaddress.IPv4Network):
            raise InvalidRequest("remote_ip_prefix", "an IPv4 rule needs an IPv4 prefix")
        remote_ip_prefix = str(prefix)
    if remote_group is not None and remote_group.project_id != security_group.project_id:
        raise InvalidRequest("remote_group", f"security group {remote_group.id} belongs to another "
                             "project")
    quota_enforce(project=security_group.project_id, requested={"security_group_rules": 1})
    SecurityGroup.objects.select_for_update().filter(pk=security_group.pk).first()
    fields = {"direction": direction, "ethertype": ethertype, "protocol": protocol,
              "port_range_min": port_range_min, "port_range_max": port_range_max,
              "remote_ip_prefix": remote_ip_prefix, "remote_group": remote_group}
    same = security_group.rules.filter(**fields).first()
    if same is not None:
        raise NetworkConflict(f"security group {security_group.id} already has this rule: {same.id}")
    rule = SecurityGroupRule.objects.create(security_group=security_group, description=description,
                                            **fields)
    hostsync.rules_changed([security_group.pk])
    return rule


@transaction.atomic
def security_group_rule_delete(*, rule: SecurityGroupRule, user: Any) -> None:
    """Delete a rule; the hosts of the group's ports drop it (and the connections it allowed)."""
    group_id = rule.security_group_id
    rule.delete()
    hostsync.rules_changed([group_id])


# --- ports and IPAM --------------------------------------------------------------------------------

MAC_PATTERN = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def mac_address_generate() -> str:
    """A random address with Neutron's prefix fa:16:3e (locally administered, unicast)."""
    return "fa:16:3e:" + ":".join(f"{secrets.randbelow(256):02x}" for _ in range(3))


def _check_mac(mac: str) -> str:
    mac = mac.strip().lower().replace("-", ":")
    if not MAC_PATTERN.match(mac):
        raise InvalidRequest("mac_address", f"{mac!r} is not a MAC address (six hex pairs: "
                             "fa:16:3e:12:34:56)")
    if int(mac[:2], 16) & 1:
        raise InvalidRequest("mac_address", f"{mac} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise InvalidRequest("mac_address", "00:00:00:00:00:00 is not a usable address")
    return mac


@dataclass(frozen=True)
class FixedIPRequest:
    """One entry of a port's ``fixed_ips``: a subnet, an address, or both."""

    subnet: Subnet | None = None
    ip_address: str | None = None


def _resolve_fixed_ip(network: Network, wanted: FixedIPRequest,
                      device_owner: str) -> tuple[Subnet, str | None]:
    """(subnet, address or None for the next free one) of a requested fixed IP, validated."""
    if wanted.subnet is None and wanted.ip_address is None:
        raise InvalidRequest("fixed_ips", "each entry names a subnet, an ip_address, or both")
    address = _address(wanted.ip_address, "fixed_ips") if wanted.ip_address is not None else None
    subnet = wanted.subnet
    if subnet is None:
        assert address is not None
        subnet = next((s for s in network.subnets.all() if address in s.ip_network), None)
        if subnet is None:
            raise InvalidRequest("fixed_ips", f"{address} is in no subnet of network {network.id}")
    elif subnet.network_id != network.id:
        raise InvalidRequest("fixed_ips", f"subnet {subnet.id} is not on network {network.id}")
    if address is None:
        return subnet, None
    net = subnet.ip_network
    if address not in net:
        raise InvalidRequest("fixed_ips", f"{address} is not inside subnet {subnet.id} ({net})")
    if not _usable(net, address):
        raise InvalidRequest("fixed_ips", f"{address} is the network or broadcast address of {net}")
    if (subnet.gateway_ip == str(address) and device_owner != DEVICE_OWNER_ROUTER_INTERFACE):
        raise InvalidRequest("fixed_ips", f"{address} is the gateway of subnet {subnet.id}; only a "
                             "router interface may hold it")
    return subnet, str(address)


def _allocate_requested(port: Port, subnet: Subnet, address: str) -> PortFixedIP:
    def in_use() -> AddressInUse:
        holder = selectors.address_holder(subnet=subnet, ip_address=address)
        return AddressInUse(ip_address=address, subnet_id=str(subnet.id),
                            port_id=str(holder.id) if holder else "(being created)")

    if selectors.address_holder(subnet=subnet, ip_address=address) is not None:
        raise in_use()
    try:
        with transaction.atomic():
            return PortFixedIP.objects.create(port=port, subnet=subnet, ip_address=address)
    except IntegrityError:
        raise in_use() from None


def _exhausted(subnet: Subnet) -> PoolExhausted:
    return PoolExhausted(f"subnet {subnet.id}{f' ({subnet.name})' if subnet.name else ''} has no free "
                         "address in its allocation pools")


def _allocate_next(port: Port, subnet: Subnet) -> PortFixedIP:
    """The lowest free address of the subnet's pools (the caller holds the network's lock); an insert
    the unique constraint refuses (IntegrityError: someone got there first) sends us to the next one."""

    def attempt() -> PortFixedIP:
        address = selectors.subnet_next_free_address(subnet=subnet)
        if address is None:
            raise _exhausted(subnet)
        return PortFixedIP.objects.create(port=port, subnet=subnet, ip_address=address)

    return _savepoint_retry(attempt, attempts=ALLOCATION_ATTEMPTS, on_exhausted=lambda: _exhausted(subnet))


def _check_usable_network(network: Network, user: Any, project: Project) -> None:
    if is_admin(user) or network.project_id == project.pk or network.shared:
        return
    raise NotOwner(f"network {network.id} belongs to another project and is not shared; only "
                   "administrators may create ports on it")


PORT_SECURITY_NEEDED = ("a port with port_security_enabled false has no security groups (nothing filters "
                        "its traffic); enable port security to use them")


def _check_groups(groups: Sequence[SecurityGroup], project: Project) -> list[SecurityGroup]:
    """The port's groups, of its project, locked against a concurrent deletion (whose foreign-key
    check would otherwise fail only at commit)."""
    foreign = [str(g.id) for g in groups if g.project_id != project.pk]
    if foreign:
        raise InvalidRequest("security_groups", f"security group(s) {', '.join(foreign)} belong to "
                             "another project than the port")
    unique = list(dict.fromkeys(groups))
    still = set(SecurityGroup.objects.select_for_update(no_key=True)
                .filter(pk__in=[g.pk for g in unique]).values_list("pk", flat=True))
    gone = [str(g.id) for g in unique if g.pk not in still]
    if gone:
        raise InvalidRequest("security_groups", f"security group(s) {', '.join(gone)} were deleted")
    return unique


@transaction.atomic
def port_create(*, user: Any, project: Project, network: Network, name: str = "",
                fixed_ips: Sequence[FixedIPRequest] | None = None, mac_address: str | None = None,
                security_groups: Sequence[SecurityGroup] | None = None, device_id: str = "",
                device_owner: str = "", admin_state_up: bool = True,
                port_security_enabled: bool = True) -> Port:
    """A port of ``project`` on ``network`` with its addresses, in one transaction.

    ``fixed_ips`` None: one address, the next free one of the first subnet that has one (none when
    the network has no subnet); ``[]``: no address; else each entry's address (400 outside the
    subnet, 409 naming the port that holds it) or the next free one of its subnet (409 when the pools
    are exhausted). ``mac_address`` None: generated (fa:16:3e:…), else validated (409 in use).
    ``security_groups`` None: the project's default group, or none without port security (Neutron:
    groups on such a port are 400)."""
    if device_owner.startswith("network:") and not is_admin(user):
        raise InvalidRequest("device_owner", "network:* owners are set by cloudctl itself")
    if not port_security_enabled and security_groups:
        raise InvalidRequest("security_groups", PORT_SECURITY_NEEDED)
    _check_usable_network(network, user, project)
    if counts_against_quota(device_owner):
        quota_enforce(project=project, requested={"ports": 1})  # the project's lock before the network's
    network = _lock_network(network)
    if security_groups is None:
        security_groups = [security_group_default(project=project)] if port_security_enabled else []
    groups = _check_groups(security_groups, project)
    wanted = [_resolve_fixed_ip(network, entry, device_owner) for entry in (fixed_ips or [])]
    given = [address for _, address in wanted if address is not None]
    if len(given) != len(set(given)):
        raise InvalidRequest("fixed_ips", "an address is requested twice")
    fields = {"network": network, "project": project, "name": name, "device_id": device_id,
              "device_owner": device_owner, "admin_state_up": admin_state_up,
              "port_security_enabled": port_security_enabled}
    if mac_address is not None:
        mac = _check_mac(mac_address)
        try:
            with transaction.atomic():
                port = Port.objects.create(mac_address=mac, **fields)
        except IntegrityError:
            holder = Port.objects.filter(mac_address=mac).first()
            raise MacAddressInUse(f"MAC address {mac} is in use by port "
                                  f"{holder.id if holder else '(being created)'}") from None
    else:
        port = _port_row_create(fields)
    port.security_groups.set(groups)
    _allocate(port, network, fixed_ips, wanted)
    dhcp.dhcp_sync(network)
    if groups and port.fixed_ips.exists():
        hostsync.members_changed([g.pk for g in groups])  # rules naming its groups admit it now
    return port


def _port_row_create(fields: dict[str, Any]) -> Port:
    """A port with a generated MAC (another one when a concurrent insert took it)."""
    return _savepoint_retry(lambda: Port.objects.create(mac_address=mac_address_generate(), **fields),
                            attempts=ALLOCATION_ATTEMPTS,
                            on_exhausted=lambda: MacAddressInUse("no free MAC address was found"))


def _allocate(port: Port, network: Network, fixed_ips: Sequence[FixedIPRequest] | None,
              wanted: Sequence[tuple[Subnet, str | None]]) -> None:
    if fixed_ips is None:
        _allocate_default(port, network)
    for subnet, address in wanted:
        if address is not None:
            _allocate_requested(port, subnet, address)
        else:
            _allocate_next(port, subnet)


def system_port_create(*, network: Network, project: Project, device_owner: str, device_id: str,
                       fixed_ips: Sequence[FixedIPRequest] | None = None) -> Port:
    """A port cloudctl makes for itself on the network node (a router's interface or gateway, a
    floating IP's address): bound to ``NETWORK_NODE_HOST``, no security group, its addresses
    allocated as :func:`port_create`'s (None: the next free address of the first subnet with one;
    409 when an address is held or the pools are exhausted). Runs in the caller's transaction and
    locks the network's row as every allocation does."""
    network = _lock_network(network)
    wanted = [_resolve_fixed_ip(network, entry, device_owner) for entry in (fixed_ips or [])]
    # The network node holds a port on the network now: its bridge, and the other hosts' peers.
    with hostsync.bindings_change(Port.objects.filter(network=network, device_owner=device_owner,
                                                      device_id=device_id)):
        port = _port_row_create({"network": network, "project": project, "name": "",
                                 "device_id": device_id, "device_owner": device_owner,
                                 "binding_host": settings.NETWORK_NODE_HOST})
    _allocate(port, network, fixed_ips, wanted)
    dhcp.dhcp_sync(network)
    return port


def system_port_delete(port: Port) -> None:
    """Delete a port :func:`system_port_create` made (its addresses are free at once)."""
    network = port.network
    with hostsync.bindings_change(Port.objects.filter(pk=port.pk)):  # the node's bridge may go
        port.delete()
    dhcp.dhcp_sync(network)


def _allocate_default(port: Port, network: Network) -> None:
    """One address from the first subnet of the network that has a free one."""
    subnets = list(network.subnets.all())
    if not subnets:
        return
    for subnet in subnets:
        try:
            with transaction.atomic():
                _allocate_next(port, subnet)
            return
        except PoolExhausted:
            continue
    if len(subnets) == 1:
        raise _exhausted(subnets[0])
    raise PoolExhausted(f"no subnet of network {network.id} has a free address in its allocation pools")


def port_update(*, port: Port, user: Any, name: str | None = None,
                security_groups: Sequence[SecurityGroup] | None = None,
                admin_state_up: bool | None = None, port_security_enabled: bool | None = None) -> Port:
    """Change a port's name, security groups, admin state or port security (None: unchanged).

    As Neutron: groups on a port whose port security is (or becomes) off are 400; turning port
    security off while the port keeps groups is 409 (give ``security_groups: []`` with it). The
    hosts that filter the port, or whose rules name one of the groups it joins or leaves as
    ``remote_group``, get their state when the change commits."""
    with transaction.atomic():
        secured = port.port_security_enabled if port_security_enabled is None else port_security_enabled
        if security_groups and not secured:
            raise InvalidRequest("security_groups", PORT_SECURITY_NEEDED)
        had = set(port.security_groups.values_list("pk", flat=True))
        if not secured and security_groups is None and had:
            raise NetworkConflict(f"port {port.id} has {len(had)} security group(s); port security cannot "
                                  'be disabled while it has any: remove them ("security_groups": []) in '
                                  "the same request or before")
        changes = []
        if name is not None:
            port.name = name
            changes.append("name")
        if admin_state_up is not None:
            port.admin_state_up = admin_state_up
            changes.append("admin_state_up")
        toggled = port_security_enabled is not None and port_security_enabled != port.port_security_enabled
        if toggled:
            port.port_security_enabled = secured
            changes.append("port_security_enabled")
        if changes:
            port.save(update_fields=[*changes, "updated"])
        joined_or_left: set[Any] = set()
        if security_groups is not None:
            groups = _check_groups(security_groups, port.project)
            port.security_groups.set(groups)
            joined_or_left = had ^ {g.pk for g in groups}
        if toggled or joined_or_left:
            hostsync.ports_changed([port])
        if joined_or_left and port.fixed_ips.exists():
            hostsync.members_changed(joined_or_left)
    return port


@transaction.atomic
def port_delete(*, port: Port, user: Any) -> None:
    """Delete a port; its addresses are free at once. The network's DHCP port is the network's: it
    goes when the last DHCP subnet does (409 for anyone deleting it before)."""
    if port.device_owner == DEVICE_OWNER_DHCP and dhcp.dhcp_subnets(port.network):
        raise NetworkConflict(f"port {port.id} is the DHCP port of network {port.network_id}; it goes "
                              "with the network's last DHCP subnet")
    if port.device_owner in L3_DEVICE_OWNERS:
        raise NetworkConflict(f"port {port.id} has owner {port.device_owner} {port.device_id} and "
                              "cannot be deleted through the ports API: remove the router interface, "
                              "clear the router's gateway or delete the floating IP")
    routers.floating_ips_port_deleting([port.pk])
    network = port.network
    groups = list(port.security_groups.values_list("pk", flat=True))
    addressed = port.fixed_ips.exists()
    with hostsync.bindings_change(Port.objects.filter(pk=port.pk)):
        port.delete()
    dhcp.dhcp_sync(network)
    if addressed:
        hostsync.members_changed(groups)


# --- DHCP ------------------------------------------------------------------------------------------


def _dhcp_changed(network: Network) -> None:
    """A subnet of the network was made, changed or deleted (the caller holds the network's lock):
    the network's DHCP port follows its DHCP subnets, and the network node hears of it."""
    had = dhcp.has_dhcp(network)
    dhcp_port_reconcile(network)
    dhcp.dhcp_sync(network, force=had)


def dhcp_port_reconcile(network: Network) -> Port | None:
    """Keep the network's one DHCP port (Neutron's ``network:dhcp``, device_id ``dhcp<network id>``,
    bound to ``NETWORK_DHCP_HOST``): made with the first DHCP subnet, an address (the next free one,
    as any port's) in each DHCP subnet, deleted when no DHCP subnet is left."""
    subnets = dhcp.dhcp_subnets(network)
    owned = Port.objects.filter(network_id=network.pk, device_owner=DEVICE_OWNER_DHCP)
    port = owned.first()
    if not subnets:
        if port is not None:
            with hostsync.bindings_change(owned):  # the network node's bridge may go
                port.delete()
        return None
    if port is None:
        with hostsync.bindings_change(owned):  # the network node holds a port on the network now
            port = _port_row_create({"network": network, "project_id": network.project_id, "name": "",
                                     "device_id": dhcp.dhcp_device_id(network.pk),
                                     "device_owner": DEVICE_OWNER_DHCP,
                                     "binding_host": settings.NETWORK_DHCP_HOST})
    wanted = {s.pk for s in subnets}
    held = set(port.fixed_ips.values_list("subnet_id", flat=True))
    port.fixed_ips.exclude(subnet_id__in=wanted).delete()
    for subnet in subnets:
        if subnet.pk not in held:
            _allocate_next(port, subnet)
    return port
