"""A server's ports: the NICs it is created with (Nova's ``networks`` of a create), their binding to
the server's host, their release when the server is deleted, and how they are shown (``addresses``)
and sent to the compute worker (the spawn spec's ``networks``).

Ports are Neutron-shaped objects of :mod:`cloudctl.network`; a server's are those whose
``device_id`` is its uuid, ordered by ``device_index`` (the order the create asked for). Every
function here runs in its caller's transaction: a create that fails half-way leaves no port, no
address and no binding behind.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db.models import Q, QuerySet
from django.utils import timezone

from cloudctl.compute.models import Instance
from cloudctl.compute.states import VmState
from cloudctl.errors import InvalidRequest
from cloudctl.identity.models import Project
from cloudctl.identity.services import is_admin
from cloudctl.network import dhcp, hostsync, routers
from cloudctl.network import services as network_services
from cloudctl.network.errors import PortInUse
from cloudctl.network.models import Network, Port, PortStatus, SecurityGroup
from compute_workers import contract

# The ``networks`` of a create besides a list (Nova's microversion 2.37 values).
AUTO = "auto"
NONE = "none"
# The availability zone of a port's device_owner when the server has none (Nova's default zone).
DEFAULT_ZONE = "nova"


@dataclass(frozen=True)
class NetworkRequest:
    """One entry of a create's ``networks``: a network (with a fixed IP or not) or a port."""

    network: Network | None = None
    port: Port | None = None
    fixed_ip: str | None = None


def device_owner(availability_zone: str) -> str:
    return f"compute:{availability_zone or DEFAULT_ZONE}"


def networks_available_to(project: Project) -> list[Network]:
    """The networks ``auto`` (or an omitted ``networks``) may pick for ``project``: its own and shared
    ones, not external ones (those are reached through routers and floating IPs)."""
    return list(Network.objects.filter(Q(project=project) | Q(shared=True), external=False))


def _label(network: Network) -> str:
    return f"{network.name} ({network.id})" if network.name else str(network.id)


def requested_networks(*, project: Project,
                       networks: str | list[NetworkRequest] | None) -> list[NetworkRequest]:
    """The NICs a create asks for, as Nova: a list as given; ``none``: no NIC; ``auto``: the one
    network available to the project (400 when there is none, or several); omitted (None): as
    ``auto`` except that no network at all means no NIC (Nova before microversion 2.37)."""
    if networks == NONE:
        return []
    if isinstance(networks, list):
        return networks
    if networks not in (None, AUTO):
        raise InvalidRequest("networks", f'must be "auto", "none" or a list, not {networks!r}')
    available = networks_available_to(project)
    if len(available) == 1:
        return [NetworkRequest(network=available[0])]
    if not available:
        if networks is None:
            return []
        raise InvalidRequest("networks", f"no network available to the project {project.name}: "
                             'create one, or boot with "networks": "none"')
    names = ", ".join(_label(n) for n in available)
    raise InvalidRequest("networks", f"several networks are available to the project {project.name}: "
                         f'{names}; choose with [{{"network": id or name}}]')


def _check_attachable(network: Network, user: Any, project: Project) -> None:
    if is_admin(user) or network.project_id == project.pk or network.shared:
        return
    raise InvalidRequest("networks", f"network {_label(network)} is an external network of another "
                         "project: servers reach it through a router and floating IPs")


def _bind_given_port(instance: Instance, port: Port, index: int) -> Port:
    """Bind a port the user passed (compare-and-swap on an empty device_id: of two servers asking
    for one port, one gets it, the other 409)."""
    if port.project_id != instance.project_id:
        raise InvalidRequest("networks", f"port {port.id} belongs to another project")
    bound = Port.objects.filter(pk=port.pk, device_id="").update(
        device_id=str(instance.uuid), device_owner=device_owner(instance.availability_zone),
        preserve_on_delete=True, device_index=index, binding_host="", status=PortStatus.DOWN,
        updated=timezone.now())
    if not bound:
        holder = Port.objects.filter(pk=port.pk).values("device_id", "device_owner").first() or {}
        raise PortInUse(port_id=str(port.id), device_id=holder.get("device_id", ""),
                        device_owner=holder.get("device_owner", ""))
    bound_port = Port.objects.select_related("network").get(pk=port.pk)
    dhcp.dhcp_sync(bound_port.network)  # its DHCP host entry now has the server's name
    return bound_port


def server_ports_create(*, instance: Instance, user: Any,
                        requests: Iterable[NetworkRequest]) -> list[Port]:
    """Create (or bind) the server's ports, in request order, with the project's default security
    group. An invalid fixed IP is 400 on ``networks``, one in use 409 naming its port, a bound port
    409 naming its server."""
    requests = list(requests)
    given = [r.port.pk for r in requests if r.port is not None]
    if len(given) != len(set(given)):
        raise InvalidRequest("networks", "a port is requested twice")
    project = instance.project
    ports = []
    for index, request in enumerate(requests):
        if request.port is not None:
            ports.append(_bind_given_port(instance, request.port, index))
            continue
        assert request.network is not None
        _check_attachable(request.network, user, project)
        fixed = ([network_services.FixedIPRequest(ip_address=request.fixed_ip)]
                 if request.fixed_ip is not None else None)
        try:
            port = network_services.port_create(
                user=user, project=project, network=request.network, fixed_ips=fixed,
                device_id=str(instance.uuid), device_owner=device_owner(instance.availability_zone))
        except InvalidRequest as invalid:
            raise InvalidRequest("networks", invalid.message) from None
        Port.objects.filter(pk=port.pk).update(device_index=index)
        port.device_index = index
        ports.append(port)
    return ports


def _ports_of(instance_uuid: Any) -> QuerySet[Port]:
    """The ports a server's create made or bound: ``device_id`` is the server and ``device_index``
    is set (only this module sets it). A port someone made through the ports API with the server's
    id as its device_id is not one of them: not plugged, not shown, not deleted with the server."""
    return Port.objects.filter(device_id=str(instance_uuid), device_index__isnull=False)


def server_ports(instance_uuid: Any) -> QuerySet[Port]:
    """The server's ports in NIC order, with their addresses, subnets and networks."""
    return (_ports_of(instance_uuid)
            .select_related("network").prefetch_related("fixed_ips__subnet")
            .order_by("device_index", "created", "id"))


def ports_by_server(instance_uuids: Iterable[Any]) -> dict[str, list[Port]]:
    """The ports of several servers in one query (a server list's ``addresses``), each in NIC order."""
    found: dict[str, list[Port]] = {}
    for port in (Port.objects.filter(device_id__in=[str(u) for u in instance_uuids],
                                     device_index__isnull=False)
                 .select_related("network").prefetch_related("fixed_ips", "floating_ips")
                 .order_by("device_index", "created", "id")):
        found.setdefault(port.device_id, []).append(port)
    return found


def server_ports_bind(instance_uuid: Any, host_name: str, availability_zone: str = "") -> int:
    """The server's ports follow it to ``host_name`` (BUILD until the spawn reports it ACTIVE), or
    lose their binding (``""``: DOWN), e.g. on a reschedule. The hosts concerned get their network
    state when the transaction commits (:func:`cloudctl.network.hostsync.bindings_change`)."""
    values: dict[str, Any] = {"binding_host": host_name, "updated": timezone.now(),
                              "status": PortStatus.BUILD if host_name else PortStatus.DOWN}
    if availability_zone:
        values["device_owner"] = device_owner(availability_zone)
    with hostsync.bindings_change(_ports_of(instance_uuid)):
        return _ports_of(instance_uuid).update(**values)


def server_ports_move(instance_uuid: Any, host_name: str) -> int:
    """A migration landed the server on ``host_name``: its ports' binding follows (a live migration's
    ``migrating_to`` ends), status kept."""
    with hostsync.bindings_change(_ports_of(instance_uuid)):
        return _ports_of(instance_uuid).update(binding_host=host_name, migrating_to="",
                                               updated=timezone.now())


def server_ports_migrating(instance_uuid: Any, host_name: str) -> int:
    """A live migration of the server to ``host_name`` is being prepared: that host holds its ports
    too (``migrating_to``), so its network state carries them with their filtering before the guest
    moves, and the other hosts flood to it already. ``""``: the migration ended (it landed, which
    :func:`server_ports_move` also clears, or it failed: the destination lets them go)."""
    ports = _ports_of(instance_uuid)
    with hostsync.bindings_change(ports):
        return ports.exclude(migrating_to=host_name).update(migrating_to=host_name, updated=timezone.now())


# A server's ports follow its vm_state when a report or the power-state sync changes it: ACTIVE while
# the guest runs (or is paused: its NIC stays plugged), DOWN when it is stopped, suspended or in error.
_PORT_STATUS_OF_VM_STATE = {VmState.ACTIVE: PortStatus.ACTIVE, VmState.PAUSED: PortStatus.ACTIVE,
                            VmState.STOPPED: PortStatus.DOWN, VmState.SUSPENDED: PortStatus.DOWN,
                            VmState.ERROR: PortStatus.DOWN}


def server_ports_follow(instance_uuid: Any, vm_state: str | None) -> int:
    """The server's ports' status after its vm_state changed to ``vm_state`` (None: unchanged)."""
    status = _PORT_STATUS_OF_VM_STATE.get(vm_state) if vm_state else None
    return server_ports_set_status(instance_uuid, status) if status is not None else 0


def server_ports_set_status(instance_uuid: Any, status: str) -> int:
    return (_ports_of(instance_uuid).exclude(status=status)
            .update(status=status, updated=timezone.now()))


def server_ports_release(instance_uuid: Any) -> None:
    """The server is deleted: the ports it created go (their addresses are free at once), the ports
    the user passed in stay, unbound (Nova's preserve_on_delete)."""
    ports = _ports_of(instance_uuid)
    networks = list(Network.objects.filter(pk__in=ports.values("network_id")))
    deleted = ports.filter(preserve_on_delete=False)
    # The groups whose members lose addresses (the ports passed in keep theirs, and their groups).
    groups = list(SecurityGroup.objects.filter(ports__in=deleted.filter(fixed_ips__isnull=False))
                  .values_list("pk", flat=True).distinct())
    # Their floating IPs stay allocated, unmapped (Neutron's); a kept port keeps its floating IPs.
    routers.floating_ips_port_deleting(deleted.values_list("pk", flat=True))
    with hostsync.bindings_change(ports):
        deleted.delete()
        ports.filter(preserve_on_delete=True).update(
            device_id="", device_owner="", binding_host="", migrating_to="", status=PortStatus.DOWN,
            preserve_on_delete=False, device_index=None, updated=timezone.now())
    for network in networks:
        dhcp.dhcp_sync(network)
    hostsync.members_changed(groups)


def addresses_of(ports: Iterable[Port]) -> dict[str, list[dict[str, Any]]]:
    """Nova's ``addresses``: ``{network name: [{"addr", "version", "mac", "type"}]}``, networks and
    addresses in NIC order; each fixed address is followed by the floating IPs mapped to it
    (``"type": "floating"``, Nova's ``OS-EXT-IPS:type``), under the fixed port's network."""
    shown: dict[str, list[dict[str, Any]]] = {}
    for port in ports:
        entries = shown.setdefault(port.network.name or str(port.network_id), [])
        floating = sorted(port.floating_ips.all(), key=lambda f: (f.created, str(f.id)))
        for fixed in port.fixed_ips.all():
            entries.append({"addr": fixed.ip_address, "version": 4, "mac": port.mac_address,
                            "type": "fixed"})
            entries.extend({"addr": f.floating_ip_address, "version": 4, "mac": port.mac_address,
                            "type": "floating"}
                           for f in floating if f.fixed_ip_address == fixed.ip_address)
    return shown


def network_specs(instance_uuid: Any) -> list[contract.NetworkSpec]:
    """The spawn spec's ``networks``: everything a host needs to plug each port, in NIC order, with
    its ``security`` (the same as the host's network state carries), so the guest's filtering is in
    place before it starts, and on a live migration's destination before it moves."""
    return hostsync.port_specs(server_ports(instance_uuid))
