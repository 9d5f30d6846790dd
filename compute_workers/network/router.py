"""A network node's routers: one namespace per router, joined by veths to its networks' bridges, doing IP
forwarding and NAT (the job of Neutron's L3 agent), converged by ``compute.network_router_sync`` to a
:class:`~compute_workers.contract.RouterSpec`.

For router ``R`` and each of its legs (the gateway port ``G`` on the external network, an interface port
``P`` on each tenant subnet):

- the leg's bridge (:meth:`LinuxBridges.ensure_bridge`, with its VXLAN device or flat uplink), held for
  the router (``hold("router-<R>", …)``) so that no guest's removal takes it away;
- namespace ``qrouter-<R>`` with ``lo`` up and ``net.ipv4.ip_forward=1``;
- a veth pair per leg: host end :func:`contract.tap_name` of the port on the bridge, namespace end
  ``qg-<G[:11]>`` / ``qr-<P[:11]>`` with the port's MAC, ``ip_address/prefix`` of its ``cidr`` and the
  network's MTU;
- on each leg, stale neighbour (ARP) entries probed after 1 s by broadcast (``NEIGHBOUR_PROBING``): a
  fixed IP given to a new port is answered at its new MAC within a second or two;
- the default route via the gateway leg's ``gateway_ip``;
- NAT in the namespace's ``nat`` table, in chains of cloudctl's own (``cloudctl-PREROUTING``,
  ``cloudctl-OUTPUT``, ``cloudctl-POSTROUTING``, jumped to first from the built-in chains), rewritten as
  one ``iptables-restore --noflush`` (atomic: a packet sees the old rules or the new ones): for each
  floating IP ``F`` → fixed ``X``: ``F/32`` on ``qg-``, DNAT ``F``→``X`` (PREROUTING and OUTPUT) and SNAT
  ``X``→``F`` out of ``qg-``; then, with ``enable_snat``, SNAT of each interface subnet out of ``qg-`` to
  the gateway address. A new floating IP's ``F/32`` goes on ``qg-`` after its DNAT is in, a removed one's
  comes off before its DNAT goes (the router never answers a floating IP itself). A newly added address
  on ``qg-`` is announced with gratuitous ARPs (``arping -U``,
  in the background: the sync does not wait for them); the connections of a floating IP added, removed
  or moved to another fixed IP are deleted from conntrack, so they do not go on through the old rules
  (or, begun before it was mapped, untranslated).

No state is kept on disk: what a router has is read from its namespace (its ``qr-``/``qg-`` devices, their
addresses, the route, ``iptables-save``), so a sync after a restart of the worker converges as any other.
Legs no longer listed are deleted (the veth goes with its namespace end) and their bridges removed when
nothing else uses them. ``deleted``: the legs and then the namespace go (with its NAT rules and conntrack
entries), the hold is released and the bridges nothing else uses are removed.

A driver without host devices (fake, libvirt's test driver) gets :class:`RecordedRouters`, which records
the desired state and holds the bridges in the :class:`RecordedBridges`.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any

from compute_workers import contract
from compute_workers.exception import ComputeError
from compute_workers.locks import KeyedLock
from compute_workers.network.linuxbridge import CommandError, HostBridges, Runner
from compute_workers.network.netns import Namespaces, Veth

LOG = logging.getLogger(__name__)

NAMESPACE_PREFIX = "qrouter-"
INTERFACE_PREFIX = "qr-"
GATEWAY_PREFIX = "qg-"
CHAIN_PREFIX = "cloudctl-"
BUILTIN_CHAINS = ("PREROUTING", "OUTPUT", "POSTROUTING")
PREROUTING, OUTPUT, POSTROUTING = (f"{CHAIN_PREFIX}{chain}" for chain in BUILTIN_CHAINS)
GARP_COUNT = 3
# Neighbour probing on each leg: a stale ARP entry is checked after 1 s (not 5) by broadcast requests
# (not unicast ones to the cached MAC). A fixed IP freed and given to a new port (the lowest free address
# is reused at once) has a new MAC: with the kernel's defaults the router kept sending to the old one for
# 5 s + 3 unanswered unicast probes before it asked the whole network (found driving make run: 4 s without
# a reply from a new guest at its floating IP).
NEIGHBOUR_PROBING = {"delay_first_probe_time": "1", "ucast_solicit": "0", "mcast_resolicit": "3"}
_DNAT = re.compile(rf"^-A {PREROUTING} -d (?P<floating>[0-9.]+)/32 -j DNAT "
                   r"--to-destination (?P<fixed>[0-9.]+)$")


class RouterError(ComputeError):
    """A router could not be converged on this node; the message says what failed."""


def namespace_name(router_id: str) -> str:
    return f"{NAMESPACE_PREFIX}{router_id}"


def interface_name(port_id: str) -> str:
    """The namespace end of an interface leg: ``qr-`` + the first 11 characters of the port id."""
    return f"{INTERFACE_PREFIX}{port_id[:contract.DEVICE_NAME_ID_CHARS]}"


def gateway_name(port_id: str) -> str:
    """The namespace end of the gateway leg: ``qg-`` + the first 11 characters of the port id."""
    return f"{GATEWAY_PREFIX}{port_id[:contract.DEVICE_NAME_ID_CHARS]}"


def host_end_of(ns_end: str) -> str:
    """The host end of the veth whose namespace end is ``ns_end`` (``qr-abc`` -> ``tapabc``)."""
    return contract.tap_name(ns_end[len(INTERFACE_PREFIX):])


def hold_owner(router_id: str) -> str:
    """The owner of a router's bridge hold (:meth:`LinuxBridges.hold`)."""
    return f"router-{router_id}"


# The spec ------------------------------------------------------------------------------------------

def _checked_leg(leg: Any, where: str) -> None:
    contract.check_bridge_network(leg, where)
    contract.check_id(leg.get("port_id"), f"{where}.port_id")
    contract.check_mac(leg.get("mac_address"), f"{where}.mac_address")
    network = ipaddress.IPv4Network(leg["cidr"], strict=False)
    if ipaddress.IPv4Address(leg["ip_address"]) not in network:
        raise contract.SpecError(f"{where}.ip_address {leg['ip_address']} is not in {leg['cidr']}")
    if leg["gateway_ip"] is not None:
        ipaddress.IPv4Address(leg["gateway_ip"])


def checked_spec(router: Any) -> contract.RouterSpec:
    """``router`` if it is a well-formed :class:`RouterSpec` this node can apply (IPv4 only); raises
    :class:`contract.SpecError` naming what is wrong. Everything that reaches a command line is checked.
    A deletion needs its id only: what to remove is read from the node."""
    if not isinstance(router, dict):
        raise contract.SpecError(f"router spec is not an object: {router!r}")
    router_id = contract.check_id(router.get("router_id"), "router.router_id")
    if not isinstance(router.get("deleted"), bool):
        raise contract.SpecError(f"router {router_id}: 'deleted' must be a boolean")
    if router["deleted"]:
        return router  # type: ignore[return-value]
    try:
        if not isinstance(router["enable_snat"], bool):
            raise contract.SpecError(f"router {router_id}: 'enable_snat' must be a boolean")
        if router["gateway"] is not None:
            _checked_leg(router["gateway"], f"router {router_id}: gateway")
        if not isinstance(router["interfaces"], list):
            raise contract.SpecError(f"router {router_id}: 'interfaces' must be a list")
        for index, leg in enumerate(router["interfaces"]):
            _checked_leg(leg, f"router {router_id}: interfaces[{index}]")
        names = [name for name, _ in legs(router)]  # type: ignore[arg-type]
        if len(set(names)) != len(names):
            raise contract.SpecError(f"router {router_id}: two legs have the same device name "
                                     f"(ports whose ids share their first {contract.DEVICE_NAME_ID_CHARS} "
                                     f"characters): {sorted(names)}")
        floating = [ipaddress.IPv4Address(fip["floating_ip_address"]) for fip in router["floating_ips"]]
        for fip in router["floating_ips"]:
            ipaddress.IPv4Address(fip["fixed_ip_address"])
        if len(set(floating)) != len(floating):
            raise contract.SpecError(f"router {router_id}: a floating IP is listed twice")
    except contract.SpecError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise contract.SpecError(f"router {router_id}: malformed router spec: "
                                 f"{type(exc).__name__}: {exc}") from exc
    return router  # type: ignore[return-value]


def legs(router: contract.RouterSpec) -> list[tuple[str, contract.RouterPortSpec]]:
    """The router's legs as (namespace end, port): the gateway first."""
    gateway = router["gateway"]
    return ([(gateway_name(gateway["port_id"]), gateway)] if gateway else []) + \
        [(interface_name(leg["port_id"]), leg) for leg in router["interfaces"]]


def leg_network(leg: contract.RouterPortSpec) -> contract.NetworkSpec:
    """The :class:`NetworkSpec` whose bridge :class:`HostBridges` makes for a leg."""
    return {"port_id": leg["port_id"], "network_id": leg["network_id"], "mac_address": leg["mac_address"],
            "fixed_ips": [{"ip_address": leg["ip_address"], "subnet_id": "", "cidr": leg["cidr"],
                           "gateway_ip": leg["gateway_ip"]}],
            "mtu": leg["mtu"], "provider_type": leg["provider_type"],
            "segmentation_id": leg["segmentation_id"], "bridge": leg["bridge"],
            "tap": contract.tap_name(leg["port_id"])}


def leg_address(leg: contract.RouterPortSpec) -> str:
    return f"{leg['ip_address']}/{ipaddress.IPv4Network(leg['cidr'], strict=False).prefixlen}"


def floating_ips(router: contract.RouterSpec) -> dict[str, str]:
    """Floating IP -> fixed IP of the router; none without a gateway (nowhere to put them)."""
    if router["gateway"] is None:
        return {}
    return {fip["floating_ip_address"]: fip["fixed_ip_address"] for fip in router["floating_ips"]}


# NAT ------------------------------------------------------------------------------------------------

def nat_rules(router: contract.RouterSpec) -> dict[str, list[str]]:
    """The rules of cloudctl's chains (chain -> rules in order), written as ``iptables-save`` prints
    them, so that what is there compares equal to what is wanted. The floating IPs' SNAT comes before
    the subnets' (the first SNAT that matches wins)."""
    rules: dict[str, list[str]] = {PREROUTING: [], OUTPUT: [], POSTROUTING: []}
    gateway = router["gateway"]
    if gateway is None:
        return rules
    qg = gateway_name(gateway["port_id"])
    for floating, fixed in sorted(floating_ips(router).items(), key=lambda f: ipaddress.IPv4Address(f[0])):
        rules[PREROUTING].append(f"-A {PREROUTING} -d {floating}/32 -j DNAT --to-destination {fixed}")
        rules[OUTPUT].append(f"-A {OUTPUT} -d {floating}/32 -j DNAT --to-destination {fixed}")
        rules[POSTROUTING].append(f"-A {POSTROUTING} -s {fixed}/32 -o {qg} -j SNAT --to-source {floating}")
    if router["enable_snat"]:
        subnets = dict.fromkeys(str(ipaddress.IPv4Network(leg["cidr"], strict=False))
                                for leg in router["interfaces"])
        for subnet in subnets:
            rules[POSTROUTING].append(f"-A {POSTROUTING} -s {subnet} -o {qg} -j SNAT --to-source "
                                      f"{gateway['ip_address']}")
    return rules


def parsed_nat(saved: str) -> tuple[dict[str, list[str]], set[str]]:
    """From ``iptables-save -t nat``: the rules of cloudctl's chains (chain -> rules; a chain that
    exists but is empty maps to []) and the built-in chains that jump to theirs."""
    rules: dict[str, list[str]] = {}
    jumps = set()
    for line in saved.splitlines():
        if line.startswith(f":{CHAIN_PREFIX}"):
            rules.setdefault(line[1:].split()[0], [])
        elif line.startswith(f"-A {CHAIN_PREFIX}"):
            rules.setdefault(line.split()[1], []).append(line)
        elif line.startswith("-A ") and line.split()[1] in BUILTIN_CHAINS and \
                line == f"-A {line.split()[1]} -j {CHAIN_PREFIX}{line.split()[1]}":
            jumps.add(line.split()[1])
    return rules, jumps


def restore_input(rules: dict[str, list[str]], jumps: Iterable[str]) -> str:
    """The ``iptables-restore --noflush`` input that replaces cloudctl's chains with ``rules`` (declaring
    a chain flushes it) and adds the missing ``jumps`` from built-in chains first in them."""
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in rules)]
    for chain_rules in rules.values():
        lines += chain_rules
    lines += [f"-I {chain} 1 -j {CHAIN_PREFIX}{chain}" for chain in jumps]
    return "\n".join([*lines, "COMMIT", ""])


def mapping_of(rules: dict[str, list[str]]) -> dict[str, str]:
    """Floating IP -> fixed IP, read from the DNAT rules that are there."""
    found = {}
    for rule in rules.get(PREROUTING, []):
        if match := _DNAT.match(rule):
            found[match["floating"]] = match["fixed"]
    return found


# The routers ----------------------------------------------------------------------------------------

def _in_thread(job: Callable[[], None]) -> None:
    threading.Thread(target=job, name="garp", daemon=True).start()


class Routers:
    """The routers of this network node. Commands on the host's devices go through ``runner``; those
    that name ``qrouter-`` namespaces through ``namespaces`` (see :class:`Namespaces`). ``background``
    runs the gratuitous ARPs (default: a daemon thread; the unit tests run them at once)."""

    def __init__(self, runner: Runner, bridges: HostBridges, namespaces: Runner | None = None,
                 background: Callable[[Callable[[], None]], None] = _in_thread) -> None:
        self.runner, self.bridges = runner, bridges
        self.namespaces = Namespaces(runner, namespaces)
        self.background = background
        self._locks = KeyedLock()

    def sync(self, router: Any) -> list[str]:
        """Converge one router to ``router``; what was done (``[]``: nothing). Raises
        :class:`contract.SpecError` for a malformed spec, :class:`RouterError` when a command fails or
        :class:`~compute_workers.network.linuxbridge.PlugError` when a bridge cannot be made."""
        spec = checked_spec(router)
        with self._locks.hold(spec["router_id"]):
            try:
                if spec["deleted"]:
                    return self._remove(spec["router_id"])
                return self._ensure(spec)
            except CommandError as exc:
                raise RouterError(f"router {spec['router_id']}: {exc}") from exc

    # Ensure ---------------------------------------------------------------------------------------

    def _ensure(self, router: contract.RouterSpec) -> list[str]:
        router_id = router["router_id"]
        netns, owner = namespace_name(router_id), hold_owner(router_id)
        wanted = legs(router)
        if router["gateway"] is None and router["floating_ips"]:
            LOG.warning("router %s has floating IPs but no gateway: they are not set up", router_id)
        # Bridges the router may have left: those it held before and those its stale legs were on.
        unused = set(self.bridges.release(owner))
        done = self.bridges.hold(owner, [leg_network(leg) for _, leg in wanted])
        done += self.namespaces.ensure(netns)
        done += self._ensure_forwarding(netns)
        done += self._remove_stale_legs(netns, {name for name, _ in wanted}, unused)
        announce: list[tuple[str, str]] = []
        later: list[tuple[str, set[str], set[str]]] = []  # (qg-, its addresses now, all it must have)
        for name, leg in wanted:
            veth = Veth(netns, contract.tap_name(leg["port_id"]), name, leg["bridge"], leg["mtu"],
                        leg["mac_address"].lower())
            made, have = self.namespaces.plug_veth(veth)
            done += made
            done += self._ensure_neighbour_probing(netns, name)
            addresses = {leg_address(leg)}
            if name.startswith(GATEWAY_PREFIX):
                # A floating IP that goes loses its address now, before its DNAT; a new one gets it after
                # its DNAT is in: on qg- without it, the router itself would answer (ttl 64, whatever the
                # guest's security groups say).
                floating = {f"{address}/32" for address in floating_ips(router)}
                later.append((name, addresses | (floating & have), addresses | floating))
                addresses |= floating & have
            added, removed = self.namespaces.set_addresses(netns, name, have, addresses)
            done += [f"address {address} on {name}" for address in added]
            done += [f"address {address} off {name}" for address in removed]
            if name.startswith(GATEWAY_PREFIX):
                announce += [(name, address.split("/")[0]) for address in added]
        done += self._ensure_default_route(netns, router["gateway"])
        done += self._ensure_nat(netns, router)
        for name, have, addresses in later:
            added, _ = self.namespaces.set_addresses(netns, name, have, addresses)
            done += [f"address {address} on {name}" for address in added]
            announce += [(name, address.split("/")[0]) for address in added]
        for device, address in announce:
            self.background(functools.partial(self._announce, netns, device, address))
        for bridge in sorted(unused - {leg["bridge"] for _, leg in wanted}):
            if self.bridges.remove_bridge_if_unused(bridge):
                done.append(f"bridge {bridge} removed")
        if done:
            LOG.info("router %s: %s", router_id, ", ".join(done))
        return done

    def _ensure_forwarding(self, netns: str) -> list[str]:
        if self.namespaces.exec(netns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1":
            return []
        self.namespaces.exec(netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        return ["forwarding"]

    def _ensure_neighbour_probing(self, netns: str, device: str) -> list[str]:
        wanted = {f"net.ipv4.neigh.{device}.{name}": value for name, value in NEIGHBOUR_PROBING.items()}
        if self.namespaces.exec(netns, "sysctl", "-n", *wanted).split() == list(wanted.values()):
            return []
        self.namespaces.exec(netns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in wanted.items()))
        return [f"neighbour probing on {device}"]

    def _remove_stale_legs(self, netns: str, wanted: set[str], unused: set[str]) -> list[str]:
        """Delete the ``qr-``/``qg-`` devices of ``netns`` not in ``wanted``; their bridges are added to
        ``unused`` (removed at the end when nothing else is on them)."""
        done = []
        for link in self.namespaces.links(netns):
            name = str(link.get("ifname", ""))
            if not name.startswith((INTERFACE_PREFIX, GATEWAY_PREFIX)) or name in wanted:
                continue
            outside = self.namespaces.link(host_end_of(name))
            if outside and outside.get("master"):
                unused.add(str(outside["master"]))
            if self.namespaces.delete_link(name, netns):
                done.append(f"leg {name} removed")
        return done

    def _ensure_default_route(self, netns: str, gateway: contract.RouterPortSpec | None) -> list[str]:
        routes = json.loads(self.namespaces.ip(netns, "-4", "-j", "route", "show", "default") or "[]")
        if gateway is None or gateway["gateway_ip"] is None:
            if not routes:
                return []
            self.namespaces.ip(netns, "-4", "route", "del", "default")
            return ["default route removed"]
        via, dev = gateway["gateway_ip"], gateway_name(gateway["port_id"])
        if [(route.get("gateway"), route.get("dev")) for route in routes] == [(via, dev)]:
            return []
        self.namespaces.ip(netns, "-4", "route", "replace", "default", "via", via, "dev", dev)
        return [f"default route via {via}"]

    def _ensure_nat(self, netns: str, router: contract.RouterSpec) -> list[str]:
        saved = self.namespaces.exec(netns, "iptables-save", "-t", "nat")
        have, jumps = parsed_nat(saved)
        wanted = nat_rules(router)
        missing_jumps = [chain for chain in BUILTIN_CHAINS if chain not in jumps]
        if {chain: have.get(chain) for chain in wanted} == wanted and not missing_jumps:
            return []
        self._restore(netns, restore_input(wanted, missing_jumps))
        done = ["NAT rules"]
        # A connection of a floating IP that is gone or now maps to another fixed IP must not go on
        # through the old translation (conntrack keeps it, whatever the rules say now); nor may one that
        # began before the floating IP was mapped (a ping already running): the nat table sees only a
        # connection's first packet, so it would never be DNATed, and the router itself would answer it
        # once the address is on qg- (a false "the guest is reachable").
        before, after = mapping_of(have), floating_ips(router)
        for floating in sorted(before.keys() | after.keys()):
            if after.get(floating) != before.get(floating):
                done += self._forget_connections(netns, floating)
        return done

    def _restore(self, netns: str, text: str) -> None:
        # The runner passes no standard input: iptables-restore reads the rules from a file instead
        # (mode 0600, removed at once).
        with tempfile.NamedTemporaryFile("w", prefix="cloudctl-nat-", suffix=".rules") as rules:
            rules.write(text)
            rules.flush()
            self.namespaces.exec(netns, "iptables-restore", "--noflush", rules.name)

    def _forget_connections(self, netns: str, floating: str) -> list[str]:
        """Delete the conntrack entries of ``floating``: those sent to it (DNAT) and those answered to it
        (SNAT). conntrack exits 1 when there was none."""
        deleted = False
        for option in ("--orig-dst", "--reply-dst"):
            try:
                self.namespaces.exec(netns, "conntrack", "-D", option, floating)
                deleted = True
            except CommandError as exc:
                if exc.returncode == -1:
                    LOG.warning("cannot delete the connections of floating IP %s (%s): they go on until "
                                "they time out (install the conntrack package)", floating, exc.stderr)
                    return []
                if "0 flow entries" not in exc.stderr:
                    raise
        return [f"connections of {floating} deleted"] if deleted else []

    def _announce(self, netns: str, device: str, address: str) -> None:
        """Gratuitous ARPs for ``address`` from ``device``: neighbours that knew it at another MAC (a
        floating IP moved between routers) learn the new one at once. A failure is logged."""
        try:
            self.namespaces.exec(netns, "arping", "-U", "-c", str(GARP_COUNT), "-I", device, address)
        except CommandError as exc:
            LOG.warning("router namespace %s: gratuitous ARP for %s on %s failed: %s", netns, address,
                        device, exc)

    # Remove ---------------------------------------------------------------------------------------

    def _remove(self, router_id: str) -> list[str]:
        netns = namespace_name(router_id)
        done = []
        unused = set(self.bridges.release(hold_owner(router_id)))
        if netns in self.namespaces.names():
            # The legs are deleted first, not left to go with the namespace: a process still in it (a
            # gratuitous ARP being sent) would keep the namespace, and so its veths, after `ip netns del`.
            done += self._remove_stale_legs(netns, set(), unused)
            self.namespaces.delete(netns)  # its NAT rules and conntrack entries go with it
            done.append(f"namespace {netns}")
        for bridge in sorted(unused):
            if self.bridges.remove_bridge_if_unused(bridge):
                done.append(f"bridge {bridge} removed")
        if done:
            LOG.info("router %s removed: %s", router_id, ", ".join(done))
        return done


class RecordedRouters:
    """The routers of a host whose driver makes no host devices: the desired state is recorded in
    :attr:`routers` (router id -> spec), the legs' bridges held in the :class:`RecordedBridges`."""

    def __init__(self, bridges: HostBridges) -> None:
        self.bridges = bridges
        self.routers: dict[str, contract.RouterSpec] = {}

    def sync(self, router: Any) -> list[str]:
        spec = checked_spec(router)
        router_id, owner = spec["router_id"], hold_owner(spec["router_id"])
        if spec["deleted"]:
            removed = self.routers.pop(router_id, None) is not None
            for bridge in self.bridges.release(owner):
                self.bridges.remove_bridge_if_unused(bridge)
            return ["recorded deletion"] if removed else []
        if self.routers.get(router_id) == spec:
            return []
        previous = set(self.bridges.release(owner))
        self.bridges.hold(owner, [leg_network(leg) for _, leg in legs(spec)])
        for bridge in sorted(previous - {leg["bridge"] for _, leg in legs(spec)}):
            self.bridges.remove_bridge_if_unused(bridge)
        self.routers[router_id] = spec
        return ["recorded"]
