"""A host's networking, as its compute worker converges it (``compute.network_host_sync``).

:func:`host_state` reads the whole of one host's part (:class:`~compute_workers.contract.HostNetworkState`):
the guests' ports bound to it or being live-migrated to it (``Port.migrating_to``), each with its
filtering (:func:`port_security`: anti-spoofing and the rules of its security groups, a
``remote_group`` resolved to its member ports' addresses), and every network with a port there (the
network node's DHCP and router ports count: they hold bridges too) with the VXLAN ``peers``: the
tunnel IPs (``Host.tunnel_ip``) of the other hosts with a port on it.

:func:`host_sync` sends it to the host's queue when the transaction commits, built then from
committed state, once per host and transaction (:func:`cloudctl.network.rpc.send_on_commit`,
as the DHCP sync). The functions below it say which hosts a change affects, each in a query or three
whatever the number of ports: :func:`bindings_change` (ports bound, unbound, moved, migrating,
created or deleted with a binding), :func:`members_changed` (who is in a group a rule names as
``remote_group``, or their addresses), :func:`rules_changed` (a group's rules), :func:`ports_changed`
(a port's own groups or port security), :func:`network_changed` (its MTU), :func:`tunnel_changed`
(a host's tunnel IP). A worker that restarts is sent its state after ``conductor.host_init``, and
every up host with ports every ``NETWORK_RESYNC_INTERVAL`` seconds (:func:`resync`): a lost message
costs at most that long.

The compute app's models are read through the app registry (``Host``): the network app never
imports the compute app.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS
from django.db.models import Q, QuerySet, prefetch_related_objects
from django.utils import timezone

from cloudctl.network import rpc
from cloudctl.network.models import (
    COMPUTE_DEVICE_OWNER_PREFIX,
    Network,
    Port,
    ProviderType,
    SecurityGroupRule,
)
from compute_workers import contract

log = logging.getLogger(__name__)

# What a port's filtering needs loaded with it (and the spec its network and addresses).
_SPEC_RELATED = ("fixed_ips__subnet", "security_groups__rules")


def _on_host(host: str) -> Q:
    """Ports the host holds: bound there, or the destination of their server's live migration."""
    return Q(binding_host=host) | Q(migrating_to=host)


def _guest_ports() -> QuerySet[Port]:
    """Ports of servers (``compute:*``): the only ones a host filters."""
    return Port.objects.filter(device_owner__startswith=COMPUTE_DEVICE_OWNER_PREFIX)


def _hosts(rows: Iterable[Iterable[str]]) -> set[str]:
    """The host names of ``(binding_host, migrating_to)`` rows."""
    return {host for row in rows for host in row if host}


# --- the state ---------------------------------------------------------------------------------------


def _remote_members(group_ids: set[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """The fixed IPs of each group's member ports (bound or not, as Neutron), in one query."""
    if not group_ids:
        return {}
    through = Port.security_groups.through
    found: dict[uuid.UUID, set[str]] = {}
    for group_id, address in (through.objects.filter(securitygroup_id__in=group_ids)
                              .values_list("securitygroup_id", "port__fixed_ips__ip_address")):
        found.setdefault(group_id, set())
        if address:
            found[group_id].add(address)
    return {group_id: sorted(addresses, key=ipaddress.ip_address) for group_id, addresses in found.items()}


def _remote_groups(ports: Iterable[Port]) -> set[uuid.UUID]:
    return {rule.remote_group_id for port in ports if port.port_security_enabled
            for group in port.security_groups.all() for rule in group.rules.all()
            if rule.remote_group_id is not None}


def _rule_spec(rule: SecurityGroupRule,
               members: dict[uuid.UUID, list[str]]) -> contract.SecurityRuleSpec:
    prefixes: list[str] | None = None
    if rule.remote_group_id is not None:
        version = 6 if rule.ethertype == "IPv6" else 4
        prefixes = []
        for address in members.get(rule.remote_group_id, []):
            ip = ipaddress.ip_address(address)
            if ip.version == version:
                prefixes.append(f"{ip}/{ip.max_prefixlen}")
    elif rule.remote_ip_prefix:
        prefixes = [rule.remote_ip_prefix]
    return {"direction": rule.direction, "ethertype": rule.ethertype,  # type: ignore[typeddict-item]
            "protocol": rule.protocol, "port_range_min": rule.port_range_min,
            "port_range_max": rule.port_range_max, "remote_ip_prefixes": prefixes}


def _security(port: Port, members: dict[uuid.UUID, list[str]]) -> contract.PortSecuritySpec:
    if not port.port_security_enabled:
        return {"enabled": False, "allowed_addresses": [], "rules": []}
    rules: list[contract.SecurityRuleSpec] = []
    for group in port.security_groups.all():
        for rule in group.rules.all():
            spec = _rule_spec(rule, members)
            if spec not in rules:  # two groups with the same rule: one iptables rule
                rules.append(spec)
    return {"enabled": True,
            "allowed_addresses": [{"mac_address": port.mac_address, "ip_address": f.ip_address}
                                  for f in port.fixed_ips.all()],
            "rules": rules}


def port_security(port: Port) -> contract.PortSecuritySpec:
    """One port's filtering: its MAC with each fixed IP may send, and the rules of all its groups,
    each ``remote_group`` resolved to the addresses of that group's member ports (/32). A port with
    port security off: no filtering at all."""
    return _security(port, _remote_members(_remote_groups([port])))


def _port_spec(port: Port, members: dict[uuid.UUID, list[str]]) -> contract.NetworkSpec:
    network = port.network
    return {
        "port_id": str(port.id), "network_id": str(network.id), "mac_address": port.mac_address,
        "fixed_ips": [{"ip_address": f.ip_address, "subnet_id": str(f.subnet_id), "cidr": f.subnet.cidr,
                       "gateway_ip": f.subnet.gateway_ip} for f in port.fixed_ips.all()],
        "mtu": network.mtu, "provider_type": network.provider_type,  # type: ignore[typeddict-item]
        "segmentation_id": network.segmentation_id,
        "bridge": contract.bridge_name(str(network.id)), "tap": contract.tap_name(str(port.id)),
        "security": _security(port, members),
    }


def port_specs(ports: Iterable[Port]) -> list[contract.NetworkSpec]:
    """Each port as the hosts plug it (a spawn spec's ``networks``, a host state's ``ports``), with its
    filtering, in the order given: a few queries for all of them."""
    ports = list(ports)
    prefetch_related_objects(ports, "network", *_SPEC_RELATED)
    members = _remote_members(_remote_groups(ports))
    return [_port_spec(port, members) for port in ports]


def _peers(host: str, networks: list[Network]) -> dict[uuid.UUID, list[str]]:
    """Per vxlan network, the tunnel IPs of the other hosts with a port on it (bound or migrating
    there, so that the flood entries already point at a live migration's destination when the guest
    moves); hosts without a tunnel IP are left out (they cannot be reached)."""
    vxlan = [n.pk for n in networks if n.provider_type == ProviderType.VXLAN]
    if not vxlan:
        return {}
    others: dict[uuid.UUID, set[str]] = {}
    for network_id, bound, migrating in (Port.objects.filter(network_id__in=vxlan)
                                         .values_list("network_id", "binding_host", "migrating_to")
                                         .distinct()):
        others.setdefault(network_id, set()).update(h for h in (bound, migrating) if h and h != host)
    names = set().union(*others.values()) if others else set()
    host_model = apps.get_model("compute", "Host")
    tunnels = dict(host_model.objects.filter(name__in=names).exclude(tunnel_ip="")
                   .values_list("name", "tunnel_ip"))
    return {network_id: sorted({tunnels[h] for h in hosts if h in tunnels}, key=ipaddress.ip_address)
            for network_id, hosts in others.items()}


def host_state(host: str) -> contract.HostNetworkState:
    """What ``host``'s networking converges to, read now (see the module's docstring).

    ``generation`` is ``time.time_ns()`` taken before the first read: of two states, the one with the
    larger generation began reading later, so it saw at least what the other saw (commits are what
    the callbacks read). No counter row to write per state, no lock between the processes that build
    them (web, scheduler, conductor, beat); it relies on their clocks agreeing, and a state ignored
    by a worker because of skew is repaired by the next resync."""
    generation = time.time_ns()
    here = list(Port.objects.filter(_on_host(host)).select_related("network").order_by("created", "id"))
    networks = list({port.network_id: port.network for port in here}.values())
    networks.sort(key=lambda n: (n.created, str(n.pk)))
    peers = _peers(host, networks)
    guests = [port for port in here if port.device_owner.startswith(COMPUTE_DEVICE_OWNER_PREFIX)]
    return {
        "host": host,
        "generation": generation,
        "networks": [{"network_id": str(n.pk), "bridge": contract.bridge_name(str(n.pk)),
                      "provider_type": n.provider_type,  # type: ignore[typeddict-item]
                      "segmentation_id": n.segmentation_id, "mtu": n.mtu,
                      "peers": peers.get(n.pk, [])} for n in networks],
        "ports": port_specs(guests),
    }


# --- sending -----------------------------------------------------------------------------------------


class _HostSync(rpc.CommitSync):
    """The commit callback of one host's sync (keyed by host, for the dedupe)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.key = ("host_sync", host)

    def send(self) -> None:
        rpc.cast(self.host, contract.COMPUTE_NETWORK_HOST_SYNC, state=host_state(self.host))


def host_sync(hosts: Iterable[str], *, using: str = DEFAULT_DB_ALIAS) -> None:
    """Send each host its state when the current transaction commits (at once outside one), built
    then; once per host and transaction."""
    for host in sorted(set(hosts) - {""}):
        rpc.send_on_commit(_HostSync(host), using=using)


# --- which hosts a change affects ----------------------------------------------------------------------


# (network, provider type, hosts) of a port, by port id.
_Bindings = dict[uuid.UUID, tuple[uuid.UUID, str, frozenset[str]]]


def _bindings(ports: QuerySet[Port]) -> _Bindings:
    return {pk: (network_id, kind, frozenset(h for h in (bound, migrating) if h))
            for pk, network_id, kind, bound, migrating in
            ports.values_list("pk", "network_id", "network__provider_type", "binding_host", "migrating_to")}


@contextmanager
def bindings_change(ports: QuerySet[Port], *, using: str = DEFAULT_DB_ALIAS) -> Iterator[None]:
    """Around a change of where the ports of ``ports`` (a queryset read before and after the change:
    ports it creates or deletes are seen on one side) are bound or migrating to: sync the hosts that
    gain or lose one of them and, for a vxlan network whose set of hosts changes, every host on it
    (their peers change). Three queries; none but one when nothing was or is bound."""
    before = _bindings(ports)
    yield
    after = _bindings(ports.all())
    if before == after:
        return
    empty: frozenset[str] = frozenset()
    hosts: set[str] = set()
    moved: dict[uuid.UUID, tuple[set[str], set[str]]] = {}  # vxlan network -> hosts before, after
    involved = before.keys() | after.keys()
    for pk in involved:
        old, new = before.get(pk), after.get(pk)
        was, now = (old[2] if old else empty), (new[2] if new else empty)
        hosts |= was ^ now
        for side, binding in ((0, old), (1, new)):
            if binding is not None and binding[1] == ProviderType.VXLAN:
                moved.setdefault(binding[0], (set(), set()))[side].update(binding[2])
    if moved and any(a != b for a, b in moved.values()):
        others: dict[uuid.UUID, set[str]] = {}
        for network_id, bound, migrating in (
                Port.objects.filter(network_id__in=list(moved)).exclude(pk__in=list(involved))
                .values_list("network_id", "binding_host", "migrating_to").distinct()):
            others.setdefault(network_id, set()).update(h for h in (bound, migrating) if h)
        for network_id, (was_on, now_on) in moved.items():
            rest = others.get(network_id, set())
            if rest | was_on != rest | now_on:
                hosts |= rest | was_on | now_on
    host_sync(hosts, using=using)


def members_changed(group_ids: Iterable[Any], *, using: str = DEFAULT_DB_ALIAS) -> None:
    """Who is in these groups (or their addresses) changed: the hosts of the ports whose rules name
    one of them as ``remote_group``."""
    ids = list(group_ids)
    if ids:
        host_sync(_hosts(_guest_ports().filter(security_groups__rules__remote_group_id__in=ids)
                         .values_list("binding_host", "migrating_to").distinct()), using=using)


def rules_changed(group_ids: Iterable[Any], *, using: str = DEFAULT_DB_ALIAS) -> None:
    """The rules of these groups changed: the hosts of their member ports."""
    ids = list(group_ids)
    if ids:
        host_sync(_hosts(_guest_ports().filter(security_groups__in=ids)
                         .values_list("binding_host", "migrating_to").distinct()), using=using)


def ports_changed(ports: Iterable[Port], *, using: str = DEFAULT_DB_ALIAS) -> None:
    """These ports' own filtering changed (their groups, port security): their hosts."""
    host_sync(_hosts((port.binding_host, port.migrating_to) for port in ports
                     if port.device_owner.startswith(COMPUTE_DEVICE_OWNER_PREFIX)), using=using)


def network_changed(network: Network, *, using: str = DEFAULT_DB_ALIAS) -> None:
    """What the hosts make of the network changed (its MTU): every host with a port on it."""
    host_sync(_hosts(Port.objects.filter(network_id=network.pk)
                     .values_list("binding_host", "migrating_to").distinct()), using=using)


def tunnel_changed(host: str, *, using: str = DEFAULT_DB_ALIAS) -> None:
    """``host``'s tunnel IP changed: every other host sharing a vxlan network with it (their peers)."""
    shared = (Port.objects.filter(_on_host(host), network__provider_type=ProviderType.VXLAN)
              .values("network_id"))
    host_sync(_hosts(Port.objects.filter(network_id__in=shared)
                     .values_list("binding_host", "migrating_to").distinct()) - {host}, using=using)


def resync() -> list[str]:
    """Send its state to every up host that holds a port (the periodic resync, from beat): what a
    lost or ignored message left behind converges within ``NETWORK_RESYNC_INTERVAL``. Returns the
    hosts."""
    host_model = apps.get_model("compute", "Host")
    since = timezone.now() - timedelta(seconds=settings.SERVICE_DOWN_TIME)
    hosts = list(host_model.objects.filter(last_heartbeat__gt=since)
                 .filter(Q(name__in=Port.objects.values("binding_host"))
                         | Q(name__in=Port.objects.values("migrating_to")))
                 .order_by("name").values_list("name", flat=True))
    host_sync(hosts)
    return hosts
