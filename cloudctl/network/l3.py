"""Routers and floating IPs (Neutron's L3): one function per operation, keyword-only arguments,
called by every interface (API, admin, the demo seed). Validation errors are
:class:`~cloudctl.errors.InvalidRequest` (400 naming the field), conflicts
:mod:`cloudctl.network.errors` (409 naming what blocks).

A router's ports and a floating IP's port are ordinary ports (IPAM, MAC and the network's lock as
for any port: :func:`~cloudctl.network.services.system_port_create`) bound to the network node:
an interface (``network:router_interface``) holds its subnet's ``gateway_ip``; the gateway
(``network:router_gateway``) and the floating IP's port (``network:floatingip``) hold the next free
address of the external network, and belong to that network's project (as Neutron's have no
tenant, the users of the router do not see them among their ports).

Every change a router's namespace must follow calls :func:`~cloudctl.network.routers.router_sync`
(sent at commit, once per router and transaction). Changes of one router are serialised by a lock
on its row, taken by every operation here that reads or changes what it maps: an interface cannot
go while a floating IP is being associated through it, nor can its gateway.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from cloudctl.errors import InvalidRequest
from cloudctl.identity.models import Project
from cloudctl.identity.services import is_admin
from cloudctl.network import routers
from cloudctl.network.errors import (
    ExternalNetworkUnreachable,
    FixedIPHasFloatingIP,
    FloatingIPsInUse,
    InUse,
    NetworkConflict,
    SubnetOnRouter,
)
from cloudctl.network.models import (
    COMPUTE_DEVICE_OWNER_PREFIX,
    DEVICE_OWNER_FLOATINGIP,
    DEVICE_OWNER_ROUTER_GATEWAY,
    DEVICE_OWNER_ROUTER_INTERFACE,
    FloatingIP,
    FloatingIPStatus,
    Network,
    Port,
    PortFixedIP,
    Router,
    Subnet,
)
from cloudctl.network.services import (
    FixedIPRequest,
    port_label,
    system_port_create,
    system_port_delete,
)
from cloudctl.quotas.services import quota_enforce


def _label(obj: Network | Subnet | Router) -> str:
    return f"{obj.id} ({obj.name})" if obj.name else str(obj.id)


def _lock(router: Router) -> Router:
    locked = Router.objects.select_for_update().filter(pk=router.pk).first()
    if locked is None:
        raise NetworkConflict(f"router {router.id} was deleted")
    return locked


def _floating_labels(floating_ips: Sequence[FloatingIP]) -> str:
    return ", ".join(f"{f.id} ({f.floating_ip_address} -> {f.fixed_ip_address})" for f in floating_ips)


# --- routers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayRequest:
    """A router's ``external_gateway``: the external network (None: no gateway) and SNAT (True
    unless said otherwise, as Neutron's default)."""

    network: Network | None
    enable_snat: bool = True


def _check_external(network: Network, field: str) -> None:
    if not network.external:
        raise InvalidRequest(field, f"network {_label(network)} is not external: a router's gateway "
                             "and floating IPs come from an external network")


def _gateway_clear(router: Router, why: str) -> None:
    """Remove the router's gateway port; 409 naming the floating IPs mapped through it."""
    mapped = list(router.floating_ips.all())
    if mapped:
        raise FloatingIPsInUse(f"router {router.id} cannot {why}: floating IP(s) "
                               f"{_floating_labels(mapped)} are mapped through its gateway; "
                               "disassociate them first", floating_ips=[str(f.id) for f in mapped])
    port = router.gateway_port
    router.gateway_port = None
    router.external_network = None
    router.save(update_fields=["gateway_port", "external_network", "updated"])
    if port is not None:
        system_port_delete(port)


def _gateway_set(router: Router, network: Network) -> None:
    """Give the router a gateway port on ``network``: the next free address of its subnets."""
    _check_external(network, "external_gateway")
    if not network.subnets.exists():
        raise InvalidRequest("external_gateway", f"external network {_label(network)} has no subnet "
                             "to take the gateway's address from")
    port = system_port_create(network=network, project=network.project,
                              device_owner=DEVICE_OWNER_ROUTER_GATEWAY, device_id=str(router.id))
    router.gateway_port = port
    router.external_network = network
    router.save(update_fields=["gateway_port", "external_network", "updated"])


@transaction.atomic
def router_create(*, user: Any, project: Project, name: str = "",
                  gateway: GatewayRequest | None = None) -> Router:
    """A router of ``project``, with a gateway on an external network when ``gateway`` names one
    (400 when the network is not external; 409 when its pools are exhausted)."""
    quota_enforce(project=project, requested={"routers": 1})
    router = Router.objects.create(project=project, name=name,
                                   enable_snat=gateway.enable_snat if gateway is not None else True)
    if gateway is not None and gateway.network is not None:
        _gateway_set(router, gateway.network)
    routers.router_sync(router)
    return router


@transaction.atomic
def router_update(*, router: Router, user: Any, name: str | None = None,
                  gateway: GatewayRequest | None = None) -> Router:
    """Rename the router, or set, change or clear its gateway (``gateway``: None unchanged;
    ``GatewayRequest(None)`` clears it). Moving or clearing a gateway that floating IPs are mapped
    through is 409 naming them."""
    router = _lock(router)
    changes = []
    if name is not None:
        router.name = name
        changes.append("name")
    if gateway is not None:
        if gateway.network is None:
            if router.gateway_port_id is not None:
                _gateway_clear(router, "lose its gateway")
        elif gateway.network.pk != router.external_network_id:
            _check_external(gateway.network, "external_gateway")
            if router.gateway_port_id is not None:
                _gateway_clear(router, f"move its gateway to network {_label(gateway.network)}")
            _gateway_set(router, gateway.network)
        if router.enable_snat != gateway.enable_snat:
            router.enable_snat = gateway.enable_snat
            changes.append("enable_snat")
    if changes:
        router.save(update_fields=[*changes, "updated"])
    routers.router_sync(router)
    return router


@transaction.atomic
def router_delete(*, router: Router, user: Any) -> None:
    """Delete a router without interfaces (409 naming them) and its gateway port."""
    router = _lock(router)
    interfaces = routers.interface_ports(router.pk)
    if interfaces:
        subnets = [str(f.subnet_id) for p in interfaces for f in p.fixed_ips.all()]
        raise InUse(f"router {router.id} still has {len(interfaces)} interface(s), on subnet(s) "
                    f"{', '.join(subnets)}: {', '.join(port_label(p) for p in interfaces)}; remove "
                    "them first", ports=[str(p.id) for p in interfaces])
    if router.gateway_port_id is not None:
        _gateway_clear(router, "be deleted")
    router_id = router.pk
    router.delete()
    routers.router_sync(router_id)


def _router_on(subnet: Subnet) -> str | None:
    """The id of the router with an interface on ``subnet``, if any."""
    owners = set(Port.objects.filter(device_owner=DEVICE_OWNER_ROUTER_INTERFACE, fixed_ips__subnet=subnet)
                 .values_list("device_id", flat=True))
    ids = []
    for owner in owners:
        try:
            ids.append(uuid.UUID(owner))
        except ValueError:
            continue
    router = Router.objects.filter(pk__in=ids).first()
    return str(router.pk) if router is not None else None


@transaction.atomic
def router_interface_add(*, router: Router, user: Any, subnet: Subnet) -> Port:
    """Plug the router into ``subnet`` (Neutron's add_router_interface by subnet): a port holding
    the subnet's ``gateway_ip``. 400 when the subnet has no gateway, is on an external network or
    another project's private network, or overlaps another subnet of the router; 409 when the
    subnet is on a router already or its gateway address is held by another port."""
    router = _lock(router)
    network = subnet.network
    if network.external:
        raise InvalidRequest("subnet", f"subnet {_label(subnet)} is on external network "
                             f"{_label(network)}: a router reaches it through its gateway")
    if not (is_admin(user) or network.project_id == router.project_id or network.shared):
        raise InvalidRequest("subnet", f"subnet {_label(subnet)} is on network {_label(network)} of "
                             "another project")
    if subnet.gateway_ip is None:
        raise InvalidRequest("subnet", f"subnet {_label(subnet)} has no gateway_ip: a router "
                             "interface takes the subnet's gateway address")
    holder = _router_on(subnet)
    if holder is not None:
        raise SubnetOnRouter(f"subnet {_label(subnet)} is already on router {holder}"
                             f"{' (this one)' if holder == str(router.id) else ''}", router_id=holder)
    net = subnet.ip_network
    for port in routers.interface_ports(router.pk):
        for fixed in port.fixed_ips.all():
            if net.overlaps(fixed.subnet.ip_network):
                raise InvalidRequest("subnet", f"subnet {_label(subnet)} ({subnet.cidr}) overlaps "
                                     f"subnet {_label(fixed.subnet)} ({fixed.subnet.cidr}) of router "
                                     f"{router.id}")
    port = system_port_create(network=network, project=router.project,
                              device_owner=DEVICE_OWNER_ROUTER_INTERFACE, device_id=str(router.id),
                              fixed_ips=[FixedIPRequest(subnet=subnet, ip_address=subnet.gateway_ip)])
    Router.objects.filter(pk=router.pk).update(updated=timezone.now())
    routers.router_sync(router)
    return port


@transaction.atomic
def router_interface_remove(*, router: Router, user: Any, subnet: Subnet) -> None:
    """Unplug the router from ``subnet``: 400 when it has no interface there, 409 naming the
    floating IPs mapped through it to fixed IPs of that subnet."""
    router = _lock(router)
    port = next((p for p in routers.interface_ports(router.pk)
                 if any(f.subnet_id == subnet.pk for f in p.fixed_ips.all())), None)
    if port is None:
        raise InvalidRequest("subnet", f"router {router.id} has no interface on subnet {_label(subnet)}")
    net = subnet.ip_network
    behind = [f for f in router.floating_ips.all()
              if f.fixed_ip_address is not None and ipaddress.IPv4Address(f.fixed_ip_address) in net
              and PortFixedIP.objects.filter(port_id=f.port_id, subnet=subnet,
                                             ip_address=f.fixed_ip_address).exists()]
    if behind:
        raise FloatingIPsInUse(f"router {router.id} cannot leave subnet {_label(subnet)}: floating "
                               f"IP(s) {_floating_labels(behind)} are mapped through it to fixed IPs "
                               "there; disassociate them first", floating_ips=[str(f.id) for f in behind])
    system_port_delete(port)
    Router.objects.filter(pk=router.pk).update(updated=timezone.now())
    routers.router_sync(router)


# --- floating IPs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AssociationRequest:
    """What a floating IP is to map to: a server (by id; its first port with a fixed IP on a subnet
    a router joins to the floating network) or a port, and optionally which fixed IP."""

    server_id: str | None = None
    port: Port | None = None
    fixed_ip: str | None = None


def _routers_reaching(network: Network, subnet_ids: Sequence[Any]) -> dict[Any, Router]:
    """For each of ``subnet_ids`` that has one: the router with an interface on it and its gateway
    on ``network`` (a subnet is on one router at most). Any project's router, as Neutron: an admin's
    router on a shared network serves the floating IPs of every project using that network."""
    found: dict[Any, Router] = {}
    interfaces = (PortFixedIP.objects.filter(subnet_id__in=list(subnet_ids),
                                             port__device_owner=DEVICE_OWNER_ROUTER_INTERFACE)
                  .values_list("subnet_id", "port__device_id"))
    by_router: dict[str, Any] = {}
    for subnet_id, router_id in interfaces:
        by_router.setdefault(router_id, []).append(subnet_id)
    valid = []
    for router_id in by_router:
        try:
            valid.append(uuid.UUID(router_id))
        except ValueError:
            continue
    for router in Router.objects.filter(pk__in=valid, external_network=network,
                                        gateway_port__isnull=False):
        for subnet_id in by_router[str(router.pk)]:
            found[subnet_id] = router
    return found


def _candidates(fip: FloatingIP, request: AssociationRequest,
                user: Any) -> tuple[list[tuple[Port, PortFixedIP]], str]:
    """The (port, fixed IP) pairs the association may use, in preference order, and what they are
    (for the messages)."""
    if request.port is not None and request.server_id is not None:
        raise InvalidRequest("port", "give a server or a port, not both")
    if request.port is not None:
        port = request.port
        if not is_admin(user) and port.project_id != fip.project_id:
            raise InvalidRequest("port", f"port {port.id} belongs to another project than the "
                                 "floating IP")
        if port.device_owner.startswith("network:"):
            raise InvalidRequest("port", f"port {port.id} is owned by {port.device_owner}: floating IPs "
                                 "map to servers' and users' ports")
        ports, what = [port], f"port {port.id}"
    elif request.server_id is not None:
        ports = list(Port.objects.filter(device_id=request.server_id,
                                         device_owner__startswith=COMPUTE_DEVICE_OWNER_PREFIX)
                     .order_by("device_index", "created", "id"))
        what = f"server {request.server_id}"
        if not ports:
            raise ExternalNetworkUnreachable(f"server {request.server_id} has no port: external "
                                             f"network {_label(fip.floating_network)} is not reachable "
                                             "from it")
    else:
        raise InvalidRequest("port", "give a server or a port to associate the floating IP with")
    pairs = [(p, f) for p in ports for f in p.fixed_ips.select_related("subnet").order_by("id")
             if ipaddress.ip_address(f.ip_address).version == 4]
    if request.fixed_ip is not None:
        pairs = [(p, f) for p, f in pairs if f.ip_address == request.fixed_ip]
        if not pairs:
            raise InvalidRequest("fixed_ip", f"{what} has no fixed IP {request.fixed_ip}")
    elif not pairs:
        raise InvalidRequest("port" if request.port is not None else "server",
                             f"{what} has no IPv4 fixed IP")
    return pairs, what


def _associate(fip: FloatingIP, request: AssociationRequest, user: Any) -> set[Any]:
    """Map ``fip`` (locked) to the target's first fixed IP behind a router on the floating network;
    returns the routers to sync (the new one and any previous one)."""
    pairs, what = _candidates(fip, request, user)
    network = fip.floating_network
    reaching = _routers_reaching(network, [f.subnet_id for _, f in pairs])
    chosen = next(((p, f) for p, f in pairs if f.subnet_id in reaching), None)
    if chosen is None:
        subnets = ", ".join(dict.fromkeys(_label(f.subnet) for _, f in pairs))
        if request.server_id is not None and request.fixed_ip is None:
            raise ExternalNetworkUnreachable(f"server {request.server_id} has no port on a subnet from "
                                             f"which external network {_label(network)} is reachable "
                                             f"(its subnets: {subnets}); add an interface on one to a "
                                             "router with its gateway there")
        raise ExternalNetworkUnreachable(f"external network {_label(network)} is not reachable from "
                                         f"subnet {subnets}")
    port, fixed = chosen
    router = _lock(reaching[fixed.subnet_id])
    # Read again under the router's lock: its interface or gateway may have gone meanwhile.
    again = _routers_reaching(network, [fixed.subnet_id]).get(fixed.subnet_id)
    if again is None or again.pk != router.pk:
        raise ExternalNetworkUnreachable(f"external network {_label(network)} is not reachable from "
                                         f"subnet {_label(fixed.subnet)}")
    holder = (FloatingIP.objects.filter(port=port, fixed_ip_address=fixed.ip_address)
              .exclude(pk=fip.pk).first())
    if holder is not None:
        raise FixedIPHasFloatingIP(f"fixed IP {fixed.ip_address} of {what} already has floating IP "
                                   f"{holder.floating_ip_address} ({holder.id})",
                                   floating_ip_id=str(holder.id))
    previous = fip.router_id
    fip.port, fip.fixed_ip_address, fip.router = port, fixed.ip_address, router
    fip.status = FloatingIPStatus.ACTIVE
    try:
        with transaction.atomic():
            fip.save(update_fields=["port", "fixed_ip_address", "router", "status", "updated"])
    except IntegrityError:
        raise FixedIPHasFloatingIP(f"fixed IP {fixed.ip_address} of {what} already has a floating IP "
                                   "(associated meanwhile)", floating_ip_id="") from None
    return {router.pk, previous} - {None}


def _lock_fip(fip: FloatingIP) -> FloatingIP:
    locked = (FloatingIP.objects.select_for_update().select_related("floating_network")
              .filter(pk=fip.pk).first())
    if locked is None:
        raise NetworkConflict(f"floating IP {fip.id} was deleted")
    return locked


@transaction.atomic
def floating_ip_create(*, user: Any, project: Project, network: Network,
                       association: AssociationRequest | None = None,
                       description: str = "") -> FloatingIP:
    """Allocate an address of the external ``network`` to ``project`` (400 when it is not
    external, 409 when its pools are exhausted) and, with ``association``, map it at once."""
    if not network.external:
        raise InvalidRequest("network", f"network {_label(network)} is not external: floating IPs "
                             "come from an external network")
    if not network.subnets.exists():
        raise NetworkConflict(f"external network {_label(network)} has no subnet to allocate floating "
                              "IPs from")
    quota_enforce(project=project, requested={"floating_ips": 1})
    fip_id = uuid.uuid4()
    port = system_port_create(network=network, project=network.project,
                              device_owner=DEVICE_OWNER_FLOATINGIP, device_id=str(fip_id))
    address = port.fixed_ips.values_list("ip_address", flat=True).first()
    assert address is not None  # allocated or PoolExhausted
    fip = FloatingIP.objects.create(id=fip_id, project=project, floating_network=network,
                                    floating_port=port, floating_ip_address=address,
                                    description=description)
    if association is not None:
        for router_id in _associate(_lock_fip(fip), association, user):
            routers.router_sync(router_id)
    return fip


@transaction.atomic
def floating_ip_associate(*, floating_ip: FloatingIP, user: Any,
                          association: AssociationRequest) -> FloatingIP:
    """Map the floating IP to a server's or a port's fixed IP (moving it when it maps another)."""
    fip = _lock_fip(floating_ip)
    for router_id in _associate(fip, association, user):
        routers.router_sync(router_id)
    return fip


def _disassociate(fip: FloatingIP) -> None:
    router_id = fip.router_id
    if router_id is None:
        return
    fip.port, fip.fixed_ip_address, fip.router = None, None, None
    fip.status = FloatingIPStatus.DOWN
    fip.save(update_fields=["port", "fixed_ip_address", "router", "status", "updated"])
    routers.router_sync(router_id)


@transaction.atomic
def floating_ip_disassociate(*, floating_ip: FloatingIP, user: Any) -> FloatingIP:
    """Stop mapping the floating IP (it stays allocated); nothing to do when it maps nothing."""
    fip = _lock_fip(floating_ip)
    _disassociate(fip)
    return fip


@transaction.atomic
def floating_ip_delete(*, floating_ip: FloatingIP, user: Any) -> None:
    """Release the floating IP: disassociated, its address free at once."""
    fip = _lock_fip(floating_ip)
    _disassociate(fip)
    port = fip.floating_port
    fip.delete()
    system_port_delete(port)

