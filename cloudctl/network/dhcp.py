"""The DHCP server of a network, as the network node's compute worker runs it.

A network with a subnet that has ``enable_dhcp`` holds one DHCP port (device_owner ``network:dhcp``,
bound to ``NETWORK_DHCP_HOST``; :mod:`cloudctl.network.services` keeps it). :func:`dhcp_sync` sends
the whole DHCP state of a network (:class:`~compute_workers.contract.DhcpNetworkSpec`) to that
host's compute worker when the transaction that changed it commits (:mod:`cloudctl.network.rpc`),
so the worker reads committed state; a network changed several times in one transaction is sent
once, built at commit from what the transaction left. Nothing is sent for a network that never had
DHCP in it (no DHCP subnet and no DHCP port before the change): it has no DHCP server to converge.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS
from django.db.models import Q, QuerySet

from cloudctl.network import rpc
from cloudctl.network.models import (
    COMPUTE_DEVICE_OWNER_PREFIX,
    DEVICE_OWNER_DHCP,
    Network,
    Port,
    PortFixedIP,
    Subnet,
)
from compute_workers import contract

log = logging.getLogger(__name__)

_HOSTNAME_INVALID = re.compile(r"[^a-z0-9-]+")


def dhcp_device_id(network_id: Any) -> str:
    return f"dhcp{network_id}"


def hostname_of(name: str, ip_address: str) -> str:
    """A server's name as a DNS label (lower case, letters, digits and dashes, at most 63), else
    ``host-<ip with dashes>`` (Neutron's default names)."""
    label = _HOSTNAME_INVALID.sub("-", name.lower()).strip("-")[:63].strip("-")
    return label or f"host-{ip_address.replace('.', '-')}"


def _dhcp_subnet_rows(network: Network) -> QuerySet[Subnet]:
    return Subnet.objects.filter(network_id=network.pk, enable_dhcp=True)


def dhcp_subnets(network: Network) -> list[Subnet]:
    return list(_dhcp_subnet_rows(network).order_by("created", "id"))


def _server_names(device_ids: set[str]) -> dict[str, str]:
    """Servers' names by uuid. Read through the app registry: the network app never imports the
    compute app (a server is a port's device, nothing more to this module)."""
    if not device_ids:
        return {}
    instance = apps.get_model("compute", "Instance")
    valid = []
    for device_id in device_ids:
        try:
            valid.append(uuid.UUID(device_id))
        except ValueError:
            continue
    return {str(key): name for key, name in
            instance.objects.filter(uuid__in=valid).values_list("uuid", "name")}


@dataclass(frozen=True)
class _Identity:
    """What a deleted network's ``deleted`` spec still says of it."""

    network_id: str
    provider_type: str
    segmentation_id: int | None
    mtu: int


def _identity(network: Network) -> _Identity:
    return _Identity(str(network.pk), network.provider_type, network.segmentation_id, network.mtu)


def _deleted_spec(identity: _Identity) -> contract.DhcpNetworkSpec:
    return {"network_id": identity.network_id, "deleted": True,
            "bridge": contract.bridge_name(identity.network_id),
            "provider_type": identity.provider_type,  # type: ignore[typeddict-item]
            "segmentation_id": identity.segmentation_id, "mtu": identity.mtu,
            "dhcp_port": None, "dhcp_mac": "", "subnets": [], "hosts": [],
            "lease_seconds": settings.NETWORK_DHCP_LEASE_SECONDS}


def dhcp_spec(network_id: Any, identity: _Identity | None = None) -> contract.DhcpNetworkSpec | None:
    """The DHCP state of a network now: its spec, ``deleted`` when it is gone or has no DHCP subnet
    (or no DHCP port), None when it is gone and nothing is known of it."""
    network = Network.objects.filter(pk=network_id).first()
    if network is None:
        return _deleted_spec(identity) if identity is not None else None
    subnets = dhcp_subnets(network)
    port = Port.objects.filter(network=network, device_owner=DEVICE_OWNER_DHCP).first()
    if not subnets or port is None:
        return _deleted_spec(_identity(network))
    by_id = {s.pk: s for s in subnets}
    own = [f for f in port.fixed_ips.all() if f.subnet_id in by_id]
    fixed = own[0] if own else None
    others = list(PortFixedIP.objects.filter(port__network=network, subnet_id__in=list(by_id))
                  .exclude(port=port).select_related("port").order_by("subnet__created", "ip_address"))
    servers = _server_names({f.port.device_id for f in others
                             if f.port.device_owner.startswith(COMPUTE_DEVICE_OWNER_PREFIX)})
    hosts: list[contract.DhcpHost] = []
    for f in others:
        name = (servers.get(f.port.device_id, "")
                if f.port.device_owner.startswith(COMPUTE_DEVICE_OWNER_PREFIX) else "")
        hosts.append({"mac_address": f.port.mac_address, "ip_address": f.ip_address,
                      "hostname": hostname_of(name, f.ip_address)})
    return {
        "network_id": str(network.pk), "deleted": False, "bridge": contract.bridge_name(str(network.pk)),
        "provider_type": network.provider_type,  # type: ignore[typeddict-item]
        "segmentation_id": network.segmentation_id, "mtu": network.mtu,
        "dhcp_port": ({"ip_address": fixed.ip_address, "subnet_id": str(fixed.subnet_id),
                       "cidr": by_id[fixed.subnet_id].cidr,
                       "gateway_ip": by_id[fixed.subnet_id].gateway_ip} if fixed else None),
        "dhcp_mac": port.mac_address,
        "subnets": [{"subnet_id": str(s.pk), "cidr": s.cidr, "gateway_ip": s.gateway_ip,
                     "dns_nameservers": list(s.dns_nameservers)} for s in subnets],
        "hosts": hosts,
        "lease_seconds": settings.NETWORK_DHCP_LEASE_SECONDS,
    }


class _Sync(rpc.CommitSync):
    """The commit callback of one network's sync (keyed by network, for the dedupe)."""

    def __init__(self, identity: _Identity) -> None:
        self.identity = identity
        self.key = ("dhcp", identity.network_id)

    def send(self) -> None:
        spec = dhcp_spec(self.identity.network_id, self.identity)
        if spec is not None:
            rpc.cast(settings.NETWORK_DHCP_HOST, contract.COMPUTE_NETWORK_DHCP_SYNC, network=spec)


def has_dhcp(network: Network) -> bool:
    """Whether the network has a DHCP server to converge: a DHCP subnet or (until it goes) a DHCP
    port."""
    return (_dhcp_subnet_rows(network).exists()
            or Port.objects.filter(network_id=network.pk, device_owner=DEVICE_OWNER_DHCP).exists())


def dhcp_sync(network: Network, *, force: bool = False, using: str = DEFAULT_DB_ALIAS) -> None:
    """Send the network's DHCP state to ``NETWORK_DHCP_HOST`` when the current transaction commits
    (once per network and transaction). Networks without DHCP send nothing unless ``force`` (a
    change that just removed their DHCP, or the network itself, sends the ``deleted`` spec)."""
    if not force and not has_dhcp(network):
        return
    rpc.send_on_commit(_Sync(_identity(network)), using=using)


def dhcp_resync_all() -> int:
    """Send every network's DHCP state again (the network node's worker restarted: whatever it had
    running is converged to what the database holds). Returns how many were sent."""
    networks = Network.objects.filter(
        Q(subnets__enable_dhcp=True) | Q(ports__device_owner=DEVICE_OWNER_DHCP)).distinct()
    sent = 0
    for network in networks:
        dhcp_sync(network)
        sent += 1
    return sent
