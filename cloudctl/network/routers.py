"""A router as the network node's compute worker runs it.

:func:`router_sync` sends the whole state of a router (:class:`~compute_workers.contract.RouterSpec`:
its gateway, interfaces and associated floating IPs) to ``NETWORK_NODE_HOST``'s compute worker when
the transaction that changed it commits (:mod:`cloudctl.network.rpc`, as the DHCP syncs): once per
router and transaction, built at commit from what the transaction left, ``deleted`` when the router
is gone. The services of :mod:`cloudctl.network.l3` call it for every change of a router or of a
floating IP it maps; :func:`floating_ips_port_deleting` is the one write here, for the port
services below them (a deleted fixed port takes its floating IPs' association with it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS
from django.utils import timezone

from cloudctl.network import rpc
from cloudctl.network.models import (
    DEVICE_OWNER_ROUTER_INTERFACE,
    FloatingIP,
    FloatingIPStatus,
    Port,
    Router,
)
from compute_workers import contract

log = logging.getLogger(__name__)


def interface_ports(router_id: Any) -> list[Port]:
    """The router's interfaces, oldest first, with their addresses, subnets and networks."""
    return list(Port.objects.filter(device_owner=DEVICE_OWNER_ROUTER_INTERFACE, device_id=str(router_id))
                .select_related("network").prefetch_related("fixed_ips__subnet")
                .order_by("created", "id"))


def _port_spec(port: Port, *, gateway: bool) -> contract.RouterPortSpec | None:
    """A router's leg: its first address with that address's subnet. ``gateway_ip`` is the
    external subnet's gateway on the gateway port (the router's default route) and null on an
    interface (whose address *is* its subnet's gateway)."""
    fixed = next(iter(port.fixed_ips.all()), None)
    if fixed is None:
        return None
    network = port.network
    return {
        "port_id": str(port.id), "network_id": str(network.id),
        "bridge": contract.bridge_name(str(network.id)),
        "provider_type": network.provider_type,  # type: ignore[typeddict-item]
        "segmentation_id": network.segmentation_id, "mtu": network.mtu,
        "mac_address": port.mac_address, "ip_address": fixed.ip_address, "cidr": fixed.subnet.cidr,
        "gateway_ip": fixed.subnet.gateway_ip if gateway else None,
    }


def _deleted_spec(router_id: str) -> contract.RouterSpec:
    return {"router_id": router_id, "deleted": True, "gateway": None, "enable_snat": False,
            "interfaces": [], "floating_ips": []}


def router_spec(router_id: Any) -> contract.RouterSpec:
    """The router's whole state now (``deleted`` when it is gone). Without a gateway there is no
    SNAT and no floating IP (``enable_snat`` False, ``floating_ips`` empty), whatever is recorded."""
    router = Router.objects.filter(pk=router_id).first()
    if router is None:
        return _deleted_spec(str(router_id))
    gateway = None
    if router.gateway_port_id is not None:
        gateway_port = (Port.objects.select_related("network").prefetch_related("fixed_ips__subnet")
                        .get(pk=router.gateway_port_id))
        gateway = _port_spec(gateway_port, gateway=True)
    interfaces = [spec for spec in (_port_spec(p, gateway=False) for p in interface_ports(router.pk))
                  if spec is not None]
    floating: list[contract.FloatingIPSpec] = []
    if gateway is not None:
        floating = [{"floating_ip_id": str(f.id), "floating_ip_address": f.floating_ip_address,
                     "fixed_ip_address": f.fixed_ip_address}
                    for f in FloatingIP.objects.filter(router=router, port__isnull=False)
                    .order_by("created", "id")
                    if f.fixed_ip_address is not None]
    return {"router_id": str(router.pk), "deleted": False, "gateway": gateway,
            "enable_snat": router.enable_snat and gateway is not None,
            "interfaces": interfaces, "floating_ips": floating}


class _Sync(rpc.CommitSync):
    """The commit callback of one router's sync (keyed by router, for the dedupe)."""

    def __init__(self, router_id: str) -> None:
        self.router_id = router_id
        self.key = ("router", router_id)

    def send(self) -> None:
        rpc.cast(settings.NETWORK_NODE_HOST, contract.COMPUTE_NETWORK_ROUTER_SYNC,
                 router=router_spec(self.router_id))


def router_sync(router: Router | Any, *, using: str = DEFAULT_DB_ALIAS) -> None:
    """Send the router's state to ``NETWORK_NODE_HOST`` when the current transaction commits (once
    per router and transaction). ``router``: a Router or its id (a deleted router's id sends the
    ``deleted`` spec)."""
    router_id = str(router.pk if isinstance(router, Router) else router)
    rpc.send_on_commit(_Sync(router_id), using=using)


def routers_resync_all() -> int:
    """Send every router's state again (the network node's worker restarted). Returns how many."""
    sent = 0
    for router_id in Router.objects.values_list("pk", flat=True):
        router_sync(router_id)
        sent += 1
    return sent


def floating_ips_port_deleting(port_ids: Iterable[Any]) -> int:
    """The fixed ports ``port_ids`` are about to be deleted (by the caller, in this transaction):
    their floating IPs lose the association but stay allocated to their project (Neutron's
    behaviour), and their routers stop mapping them. Returns how many were disassociated."""
    ids = list(port_ids)
    if not ids:
        return 0
    associated = FloatingIP.objects.filter(port_id__in=ids)
    routers = set(associated.values_list("router_id", flat=True))
    count = associated.update(port=None, fixed_ip_address=None, router=None,
                              status=FloatingIPStatus.DOWN, updated=timezone.now())
    for router_id in routers:
        if router_id is not None:
            router_sync(router_id)
    if count:
        log.info("disassociated %d floating IP(s) of deleted port(s) %s", count,
                 ", ".join(map(str, ids)))
    return count
