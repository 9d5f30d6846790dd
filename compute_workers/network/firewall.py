"""Security groups and anti-spoofing of the guests' taps: Neutron's iptables firewall for Linux bridges
(``IptablesFirewallDriver`` with ``enable_ipset = False``), done by the compute worker.

With ``br_netfilter`` (``net.bridge.bridge-nf-call-iptables``/``-ip6tables`` = 1 in the host's network
namespace: per namespace since Linux 5.3, made so here when it is not, else :class:`FirewallError`),
frames a bridge forwards traverse the host's iptables FORWARD chain, where ``-m physdev`` tells which
tap they came from or go to. For a port whose tap is ``tap<k>`` (``k``: the first 11 characters of the
port's id, as :func:`contract.tap_name`), in the filter table of iptables and of ip6tables::

    FORWARD  -j cloudctl-FORWARD     (inserted first, once)
    INPUT    -j cloudctl-INPUT
    cloudctl-FORWARD   --physdev-out tap<k> --physdev-is-bridged -j cloudctl-SG   (and --physdev-in)
    cloudctl-SG  --physdev-out tap<k> ... -j cloudctl-i<k>;  --physdev-in tap<k> ... -j cloudctl-o<k>;
                       ... -j ACCEPT  (what both ends' chains RETURNed)
    cloudctl-INPUT     --physdev-in tap<k> --physdev-is-bridged -j cloudctl-o<k>
    cloudctl-i<k>      to the guest: established, DHCP replies, one RETURN per ingress rule, DROP
    cloudctl-o<k>      from the guest: DHCP discover from 0.0.0.0, cloudctl-s<k>, no DHCP server, established,
                       one RETURN per egress rule, DROP
    cloudctl-s<k>      anti-spoofing: source IP + MAC one of ``allowed_addresses``, else DROP

A packet between two guests of the bridge passes the sender's egress and the receiver's ingress chain
(both RETURN) before the ACCEPT. Chain names are at most 21 characters (iptables allows 28). ARP is
filtered with ebtables (the nft backend of Debian's ``iptables`` package), table nat::

    PREROUTING -j cloudctl-PRE;  cloudctl-PRE -i tap<k> -j cloudctl-a<k>
    cloudctl-a<k>  ARP only from its MAC for its own IPv4 addresses; other frames only from its MACs; DROP

Applying: the current rules are read (``iptables-save``), the chains that differ are rewritten in one
``iptables-restore --noflush`` transaction per table (declaring a chain flushes it; a port's chains
are replaced whole, chains of removed ports flushed and deleted in the same transaction), and nothing
runs when nothing differs: applying twice changes nothing. What is applied is read back from the
kernel, so a restarted worker knows it (:meth:`Firewall.applied`). When a port loses a rule (or an
address, or the port goes), the conntrack entries of its addresses are deleted (``conntrack -D``):
a connection the removed rule let in would otherwise live on as ESTABLISHED.

Not done (Neutron does): conntrack zones per network (overlapping tenant addresses on one host share
conntrack entries), ipsets for remote groups (the control plane resolves them into prefixes: one rule
each), ARP probes with sender 0.0.0.0 (dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from compute_workers import contract
from compute_workers.exception import ComputeError
from compute_workers.network.linuxbridge import CommandError

LOG = logging.getLogger(__name__)

PREFIX = "cloudctl-"
# Upper case: a port's chains are lower-case kind letters + its id's start, these never look like one.
TOP_FORWARD, TOP_INPUT, SG_CHAIN = f"{PREFIX}FORWARD", f"{PREFIX}INPUT", f"{PREFIX}SG"
ARP_TOP = f"{PREFIX}PRE"
INGRESS, EGRESS, SPOOF, ARP = "i", "o", "s", "a"
IPTABLES_CHAIN_MAX = 28
TAP_PREFIX = contract.tap_name("")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_PROTOCOL = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,11}$")
_PORT_CHAIN = re.compile(rf"^{re.escape(PREFIX)}([{INGRESS}{EGRESS}{SPOOF}{ARP}])([A-Za-z0-9_.-]{{1,11}})$")
_SPOOF_SOURCE = re.compile(r"^-s (\S+?)/(?:32|128) ")
PORT_RANGE_PROTOCOLS = ("tcp", "udp")
# The kinds of packets the firewall always lets through or stops, whatever the rules.
DHCP_V4_REPLY = "-p udp -m udp --sport 67 --dport 68"
DHCP_V4_REQUEST = "-p udp -m udp --sport 68 --dport 67"
DHCP_V6_REPLY = "-p udp -m udp --sport 547 --dport 546"
DHCP_V6_REQUEST = "-p udp -m udp --sport 546 --dport 547"
ESTABLISHED = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
INVALID = "-m conntrack --ctstate INVALID -j DROP"
# ICMPv6 IPv6 cannot work without: MLD (130-132, 143), router solicitation/advertisement (133/134),
# neighbour solicitation/advertisement (135/136). A guest may not advertise itself as a router.
ICMPV6_INGRESS = (130, 131, 132, 134, 135, 136)
ICMPV6_EGRESS = (130, 131, 132, 133, 135, 136, 143)
ICMPV6_DAD = (131, 135, 143)  # sent from :: before an address is usable
ICMPV6_ROUTER_ADVERTISEMENT = 134


class FirewallError(ComputeError):
    """A port's filtering could not be applied (or its spec is malformed); the message says which."""


class InputRunner(Protocol):
    """A :class:`~compute_workers.network.linuxbridge.CommandRunner`: runs a command (with ``stdin``)."""

    def run(self, *argv: str, stdin: str | None = None) -> str:
        ...


# --- the rules of a port -------------------------------------------------------------------------------

def port_key(tap: str) -> str:
    """The suffix of a tap's chains: the tap's name without ``tap`` (the port id's first 11 characters)."""
    if not tap.startswith(TAP_PREFIX) or not _KEY.match(tap[len(TAP_PREFIX):]):
        raise FirewallError(f"{tap!r} is not a tap of a port ({TAP_PREFIX} + up to 11 of its id)")
    return tap[len(TAP_PREFIX):]


def chain_name(kind: str, tap: str) -> str:
    """``cloudctl-<kind><k>``: ``i`` (to the guest), ``o`` (from it), ``s`` (its sources), ``a`` (ARP)."""
    name = f"{PREFIX}{kind}{port_key(tap)}"
    assert len(name) <= IPTABLES_CHAIN_MAX, name
    return name


@functools.cache
def _protocol_names() -> dict[int, str]:
    """/etc/protocols' names by number: iptables-save prints a protocol by that name (``-p 47`` is
    saved as ``-p gre``), and the rules made here must read back as they were written."""
    names: dict[int, str] = {}
    try:
        text = Path("/etc/protocols").read_text()
    except OSError:
        return names
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[1].isdigit():
            names.setdefault(int(fields[1]), fields[0])
    return names


def _protocol(protocol: str | None, version: int) -> str | None:
    """The ``-p`` of a rule's protocol in iptables-save's spelling; None: any protocol."""
    if protocol is None:
        return None
    name = protocol.lower()
    if name.isdigit():
        number = int(name)
        if not 0 <= number <= 255:
            raise FirewallError(f"IP protocol number {protocol!r} is not in 0..255")
        if number == 0:
            return None
        name = _protocol_names().get(number, name)
    if name in ("icmp", "icmpv6", "ipv6-icmp"):
        if version == 6:
            return "ipv6-icmp"
        if name != "icmp":
            raise FirewallError(f"protocol {protocol!r} in an IPv4 rule")
    if not _PROTOCOL.match(name) and not name.isdigit():
        raise FirewallError(f"invalid protocol {protocol!r}")
    return name


def _mac(value: Any) -> str:
    mac = str(value).lower()
    if not _MAC.match(mac):
        raise FirewallError(f"invalid MAC address {value!r}")
    return mac


def _link_local(mac: str) -> str:
    """The guest's EUI-64 IPv6 link-local address (it sends neighbour discovery and DHCPv6 from it)."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    eui = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + bytes(eui)))


def _prefix(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except (TypeError, ValueError) as exc:
        raise FirewallError(f"invalid remote IP prefix {value!r}") from exc


def _port_match(rule: contract.SecurityRuleSpec, protocol: str | None, version: int) -> str | None:
    """The match of the rule's port range or ICMP type/code; "" for none; None when the rule cannot be
    expressed (a port range on a protocol without ports): it is left out, so it admits nothing."""
    low, high = rule["port_range_min"], rule["port_range_max"]
    if protocol in ("icmp", "ipv6-icmp"):
        if low is None:
            return ""
        if not 0 <= low <= 255 or (high is not None and not 0 <= high <= 255):
            raise FirewallError(f"ICMP type/code {low}/{high} not in 0..255")
        kind = f"{low}/{high}" if high is not None else str(low)
        return f"-m icmp --icmp-type {kind}" if version == 4 else f"-m icmp6 --icmpv6-type {kind}"
    if low is None and high is None:
        return ""
    if protocol not in PORT_RANGE_PROTOCOLS:
        LOG.warning("security rule %s: a port range applies to tcp and udp only; rule left out", rule)
        return None
    low = high if low is None else low
    high = low if high is None else high
    assert low is not None and high is not None
    if not 1 <= low <= high <= 65535:
        raise FirewallError(f"invalid port range {rule['port_range_min']}:{rule['port_range_max']}")
    return f"-m {protocol} --dport {low}" if low == high else f"-m {protocol} --dport {low}:{high}"


def rule_lines(rule: contract.SecurityRuleSpec, version: int) -> list[str]:
    """The RETURN lines (without ``-A <chain>``) of one security rule for IP ``version`` (4 or 6), in
    iptables-save's order of options; [] when the rule is of the other ethertype or admits no peer."""
    if rule["ethertype"] != f"IPv{version}":
        return []
    protocol = _protocol(rule["protocol"], version)
    ports = _port_match(rule, protocol, version)
    if ports is None:
        return []
    tail = " ".join(filter(None, (f"-p {protocol}" if protocol else "", ports, "-j RETURN")))
    option = "-s" if rule["direction"] == "ingress" else "-d"
    if rule["remote_ip_prefixes"] is None:
        return [tail]
    lines = []
    for value in rule["remote_ip_prefixes"]:
        prefix = _prefix(value)
        if prefix.version != version:
            continue
        lines.append(tail if prefix.prefixlen == 0 else f"{option} {prefix} {tail}")
    return lines


def checked_security(security: Any, where: str) -> contract.PortSecuritySpec:
    """``security`` if it is a well-formed :class:`PortSecuritySpec`; raises :class:`FirewallError`
    naming what is wrong. Everything that reaches a rule is checked (by building the rules)."""
    if not isinstance(security, dict) or not isinstance(security.get("enabled"), bool):
        raise FirewallError(f"{where}.security must be an object with a boolean 'enabled'")
    addresses, rules = security.get("allowed_addresses"), security.get("rules")
    if not isinstance(addresses, list) or not isinstance(rules, list):
        raise FirewallError(f"{where}.security: allowed_addresses and rules must be lists")
    for i, address in enumerate(addresses):
        if not isinstance(address, dict):
            raise FirewallError(f"{where}.security.allowed_addresses[{i}] must be an object")
        _mac(address.get("mac_address"))
        try:
            ipaddress.ip_address(address.get("ip_address"))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise FirewallError(f"{where}.security.allowed_addresses[{i}]: invalid IP address "
                                f"{address.get('ip_address')!r}") from exc
    for i, rule in enumerate(rules):
        what = f"{where}.security.rules[{i}]"
        if not isinstance(rule, dict):
            raise FirewallError(f"{what} must be an object")
        if rule.get("direction") not in ("ingress", "egress") or \
                rule.get("ethertype") not in ("IPv4", "IPv6"):
            raise FirewallError(f"{what}: direction must be ingress/egress, ethertype IPv4/IPv6")
        if not isinstance(rule.get("protocol"), str | None):
            raise FirewallError(f"{what}.protocol must be a string or null")
        for key in ("port_range_min", "port_range_max"):
            value = rule.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise FirewallError(f"{what}.{key} must be an integer or null")
        prefixes = rule.get("remote_ip_prefixes")
        if prefixes is not None and (not isinstance(prefixes, list)
                                     or not all(isinstance(p, str) for p in prefixes)):
            raise FirewallError(f"{what}.remote_ip_prefixes must be a list of strings or null")
        try:
            for version in (4, 6):
                rule_lines(rule, version)  # type: ignore[arg-type]
        except FirewallError as exc:
            raise FirewallError(f"{what}: {exc}") from None
    return security  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class PortRules:
    """A filtered port's chains: ``chains[table][chain]`` = its rules (without ``-A <chain>``), tables
    ``ipv4``, ``ipv6`` (filter) and ``eb`` (ebtables nat); ``addresses`` its IPs (conntrack)."""

    tap: str
    chains: dict[str, dict[str, list[str]]]
    addresses: frozenset[str]


def _unique(lines: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def port_rules(port: contract.NetworkSpec) -> PortRules | None:
    """The chains of ``port``; None when it is not filtered (no ``security``, or ``enabled`` False)."""
    security = port.get("security")
    if security is None:
        return None
    security = checked_security(security, f"port {port['port_id']}")
    if not security["enabled"]:
        return None
    tap = port["tap"]
    ingress, egress, spoof, arp = (chain_name(kind, tap) for kind in (INGRESS, EGRESS, SPOOF, ARP))
    allowed = [(_mac(a["mac_address"]), ipaddress.ip_address(a["ip_address"]))
               for a in security["allowed_addresses"]]
    macs = _unique(mac for mac, _ in allowed) or [_mac(port["mac_address"])]
    rules = security["rules"]
    chains: dict[str, dict[str, list[str]]] = {}
    for version in (4, 6):
        ingress_rules = _unique(line for rule in rules if rule["direction"] == "ingress"
                                for line in rule_lines(rule, version))
        egress_rules = _unique(line for rule in rules if rule["direction"] == "egress"
                               for line in rule_lines(rule, version))
        sources = [(mac, str(ip)) for mac, ip in allowed if ip.version == version]
        if version == 4:
            chains["ipv4"] = {
                ingress: [ESTABLISHED, INVALID, f"{DHCP_V4_REPLY} -j RETURN", *ingress_rules, "-j DROP"],
                egress: [*(f"-s 0.0.0.0/32 -d 255.255.255.255/32 -p udp -m mac --mac-source {mac} "
                           "-m udp --sport 68 --dport 67 -j RETURN" for mac in macs),
                         f"-j {spoof}", f"{DHCP_V4_REQUEST} -j RETURN", f"{DHCP_V4_REPLY} -j DROP",
                         ESTABLISHED, INVALID, *egress_rules, "-j DROP"],
                spoof: [*_unique(f"-s {ip}/32 -m mac --mac-source {mac} -j RETURN" for mac, ip in sources),
                        "-j DROP"],
            }
        else:
            sources += [(mac, _link_local(mac)) for mac in macs]
            chains["ipv6"] = {
                ingress: [*(f"-p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j RETURN"
                            for kind in ICMPV6_INGRESS),
                          ESTABLISHED, INVALID, f"{DHCP_V6_REPLY} -j RETURN", *ingress_rules, "-j DROP"],
                egress: [*(f"-s ::/128 -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j RETURN"
                           for kind in ICMPV6_DAD),
                         f"-j {spoof}",
                         f"-p ipv6-icmp -m icmp6 --icmpv6-type {ICMPV6_ROUTER_ADVERTISEMENT} -j DROP",
                         f"{DHCP_V6_REPLY} -j DROP",
                         *(f"-p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j RETURN" for kind in ICMPV6_EGRESS),
                         f"{DHCP_V6_REQUEST} -j RETURN", ESTABLISHED, INVALID, *egress_rules, "-j DROP"],
                spoof: [*_unique(f"-s {ip}/128 -m mac --mac-source {mac} -j RETURN" for mac, ip in sources),
                        "-j DROP"],
            }
    chains["eb"] = {arp: [
        *_unique(f"-p ARP -s {mac} --arp-ip-src {ip} --arp-mac-src {mac} -j RETURN"
                 for mac, ip in allowed if ip.version == 4),
        "-p ARP -j DROP", *(f"-s {mac} -j RETURN" for mac in macs), "-j DROP"]}
    return PortRules(tap, chains, frozenset(str(ip) for _, ip in allowed))


def top_chains(table: str, taps: Sequence[str]) -> dict[str, list[str]]:
    """The chains that send each filtered tap's packets to its chains (sorted taps: a stable text)."""
    if not taps:
        return {}
    if table == "eb":
        return {ARP_TOP: [f"-i {tap} -j {chain_name(ARP, tap)}" for tap in taps]}
    forward, sg_chain, incoming = [], [], []
    for tap in taps:
        out_of, into = (f"-m physdev --physdev-{way} {tap} --physdev-is-bridged" for way in ("out", "in"))
        forward += [f"{out_of} -j {SG_CHAIN}", f"{into} -j {SG_CHAIN}"]
        sg_chain += [f"{out_of} -j {chain_name(INGRESS, tap)}", f"{into} -j {chain_name(EGRESS, tap)}"]
        incoming.append(f"{into} -j {chain_name(EGRESS, tap)}")
    return {TOP_FORWARD: forward, SG_CHAIN: [*sg_chain, "-j ACCEPT"], TOP_INPUT: incoming}


# (table, the command pair, the netfilter table, the hooks: built-in chain -> our top chain)
TABLES: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "ipv4": ("iptables-save", "iptables-restore", "filter", {"FORWARD": TOP_FORWARD, "INPUT": TOP_INPUT}),
    "ipv6": ("ip6tables-save", "ip6tables-restore", "filter", {"FORWARD": TOP_FORWARD, "INPUT": TOP_INPUT}),
    "eb": ("ebtables-save", "ebtables-restore", "nat", {"PREROUTING": ARP_TOP}),
}


def parse_save(text: str, table: str) -> dict[str, list[str]]:
    """``chain -> its rules`` of ``table`` in an ``*-save`` output (every chain, built-in ones too)."""
    chains: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
        elif current != table or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            name, _, rule = line[3:].partition(" ")
            chains.setdefault(name, []).append(rule.strip())
    return chains


def restore_text(table: str, current: dict[str, list[str]], wanted: dict[str, list[str]]) -> str | None:
    """The ``*-restore --noflush`` input that turns our chains in ``current`` (a table's chains) into
    ``wanted`` (all our chains, top ones included; none: no hooks either); None when they agree."""
    netfilter_table, hooks = TABLES[table][2], TABLES[table][3]
    ours = {name: rules for name, rules in current.items() if name.startswith(PREFIX)}
    declare = "RETURN" if table == "eb" else "- [0:0]"
    changed = [name for name in sorted(wanted) if ours.get(name) != wanted[name] or name not in ours]
    obsolete = sorted(set(ours) - set(wanted))
    lines = [f":{name} {declare}" for name in changed]  # declaring an existing chain flushes it
    lines += [f"-A {name} {rule}" for name in changed for rule in wanted[name]]
    for builtin, top in hooks.items():
        hooked = f"-j {top}" in current.get(builtin, [])
        if top in wanted and not hooked:
            lines.append(f"-I {builtin} 1 -j {top}")
        elif top not in wanted and hooked:
            lines.append(f"-D {builtin} -j {top}")
    lines += [f"-F {name}" for name in obsolete] + [f"-X {name}" for name in obsolete]
    if not lines:
        return None
    return "\n".join([f"*{netfilter_table}", *lines, "COMMIT", ""])


def _port_chains(chains: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """Our per-port chains of a table, by tap."""
    taps: dict[str, dict[str, list[str]]] = {}
    for name, rules in chains.items():
        if match := _PORT_CHAIN.match(name):
            taps.setdefault(f"{TAP_PREFIX}{match.group(2)}", {})[name] = rules
    return taps


class Firewall:
    """The filtering of this host's taps (or of one network namespace's: the runner's). Thread-safe:
    one change at a time, each read from and written to the kernel whole."""

    def __init__(self, runner: InputRunner, *, conntrack: bool = True) -> None:
        self.runner, self.conntrack = runner, conntrack
        self._lock = threading.Lock()
        self._netfilter_checked = False

    # Reads ------------------------------------------------------------------------------------------

    def _read(self) -> dict[str, dict[str, list[str]]]:
        tables = {}
        for table, (save, _, netfilter_table, _) in TABLES.items():
            try:
                text = self.runner.run(save, "-t", netfilter_table)
            except CommandError as exc:
                raise FirewallError(f"cannot read the {table} rules ({save}): {exc.stderr}") from exc
            tables[table] = parse_save(text, netfilter_table)
        return tables

    def applied(self) -> set[str]:
        """The taps that have chains here (read from the kernel)."""
        with self._lock:
            return {tap for chains in self._read().values() for tap in _port_chains(chains)}

    def chains(self) -> dict[str, dict[str, list[str]]]:
        """Our chains, by table (``ipv4``, ``ipv6``, ``eb``): what the kernel has."""
        with self._lock:
            return {table: {name: rules for name, rules in chains.items() if name.startswith(PREFIX)}
                    for table, chains in self._read().items()}

    # Changes ----------------------------------------------------------------------------------------

    def apply(self, ports: Iterable[contract.NetworkSpec]) -> list[str]:
        """Give each port that has ``security`` its chains (``enabled``) or none (not enabled); ports
        without ``security`` (specs older than security groups) and the other taps' chains are left as
        they are. What was done. Raises :class:`FirewallError`."""
        wanted = {port["tap"]: port_rules(port) for port in ports if "security" in port}
        return self._converge(wanted, keep=None) if wanted else []

    def sync(self, ports: Iterable[contract.NetworkSpec], keep: Iterable[str] = ()) -> list[str]:
        """Exactly ``ports``' chains: the filtered ones get theirs, every other tap's chains go, except
        those of ``keep`` (taps not listed whose chains stay as they are)."""
        return self._converge({port["tap"]: port_rules(port) for port in ports}, keep=set(keep))

    def remove(self, taps: Iterable[str]) -> list[str]:
        """Remove the chains of ``taps`` (a tap without chains: nothing) and end their connections."""
        wanted: dict[str, PortRules | None] = {}
        for tap in taps:
            port_key(tap)  # a name of a tap, nothing else
            wanted[tap] = None
        return self._converge(wanted, keep=None) if wanted else []

    def _converge(self, wanted: dict[str, PortRules | None], *, keep: set[str] | None) -> list[str]:
        """Make the taps of ``wanted`` have its chains (None: none) and no other tap any but those of
        ``keep`` (None: every other tap keeps its chains); one restore per table that changes, then
        conntrack of the taps that lost a rule."""
        with self._lock:
            tables = self._read()
            current = {table: _port_chains(chains) for table, chains in tables.items()}
            present = {tap for by_tap in current.values() for tap in by_tap}
            filtered = {tap for tap, rules in wanted.items() if rules is not None}
            kept = {tap for tap in present if tap not in wanted and (keep is None or tap in keep)}
            final = sorted(filtered | kept)
            if filtered:
                self._ensure_bridge_netfilter()
            for table, (_, restore, _, _) in TABLES.items():
                desired = top_chains(table, final)
                for tap in final:
                    rules = wanted.get(tap)
                    desired.update(rules.chains[table] if rules is not None else current[table].get(tap, {}))
                text = restore_text(table, tables[table], desired)
                if text is None:
                    continue
                try:
                    self.runner.run(restore, "--noflush", stdin=text)
                except CommandError as exc:
                    raise FirewallError(f"cannot apply the {table} rules of "
                                        f"{', '.join(sorted(wanted)) or 'this host'} ({restore}): "
                                        f"{exc.stderr}") from exc
            done, flushed, addresses = [], [], set()
            for tap in sorted((present | filtered) - kept):
                rules = wanted.get(tap)
                before, after = _lines(current, tap), _lines(rules.chains if rules else {})
                if before == after:
                    continue
                done.append(f"firewall {tap}" if rules is not None else f"firewall of {tap} removed")
                if before - after:  # a rule (or address, or the port) went: end what it allowed
                    addresses |= _addresses(current, tap) | (rules.addresses if rules else frozenset())
                    flushed.append(tap)
            if flushed and self._forget_connections(addresses):
                done += [f"conntrack of {tap} flushed" for tap in flushed]
            if done:
                LOG.info("firewall: %s", ", ".join(done))
            return done

    def _forget_connections(self, addresses: Iterable[str]) -> bool:
        """Delete every connection from or to ``addresses``; False without conntrack. The table is listed
        once per family and ``conntrack -D`` runs only for addresses it shows (two commands an address
        would make removing 100 ports take seconds)."""
        if not self.conntrack:
            return False
        by_family: dict[str, set[str]] = {}
        for address in addresses:
            family = "ipv6" if ipaddress.ip_address(address).version == 6 else "ipv4"
            by_family.setdefault(family, set()).add(str(ipaddress.ip_address(address)))
        for family, wanted in sorted(by_family.items()):
            try:
                listed = self.runner.run("conntrack", "-L", "-f", family)
            except CommandError as exc:
                LOG.warning("cannot list the conntrack table (%s): deleting blindly", exc.stderr)
                listed = None
            seen = wanted if listed is None else wanted & _conntrack_addresses(listed)
            for address in sorted(seen):
                for option in ("-s", "-d"):
                    try:
                        self.runner.run("conntrack", "-D", "-f", family, option, address)
                    except CommandError as exc:
                        if "0 flow entries" not in exc.stderr:
                            LOG.warning("cannot delete the conntrack entries %s %s: %s", option, address,
                                        exc.stderr)
        return True

    def _ensure_bridge_netfilter(self) -> None:
        """Bridged frames must traverse iptables (br_netfilter): load it and switch it on if needed."""
        if self._netfilter_checked:
            return
        for family in ("iptables", "ip6tables"):
            key = f"net.bridge.bridge-nf-call-{family}"
            value = self._sysctl(key)
            if value is None:
                self._try("modprobe", "br_netfilter")
                value = self._sysctl(key)
            if value != "1":
                self._try("sysctl", "-w", f"{key}=1")
                value = self._sysctl(key)
            if value != "1":
                raise FirewallError(f"bridged traffic cannot be filtered on this host: {key} is "
                                    f"{value or 'missing (no br_netfilter module)'} and cannot be set to 1")
        self._netfilter_checked = True

    def _sysctl(self, key: str) -> str | None:
        try:
            return self.runner.run("sysctl", "-n", key).strip()
        except CommandError:
            return None

    def _try(self, *argv: str) -> None:
        try:
            self.runner.run(*argv)
        except CommandError as exc:
            LOG.warning("%s", exc)


_CONNTRACK_ADDRESS = re.compile(r"\b(?:src|dst)=([0-9A-Fa-f.:]+)")


def _conntrack_addresses(listing: str) -> set[str]:
    """The addresses ``conntrack -L`` shows (either direction of each flow)."""
    found = set()
    for match in _CONNTRACK_ADDRESS.finditer(listing):
        try:
            found.add(str(ipaddress.ip_address(match.group(1))))
        except ValueError:
            continue
    return found


def _lines(chains: dict[str, Any], tap: str | None = None) -> set[tuple[str, str, str]]:
    """(table, chain, rule) of a port's chains: ``chains[table][chain]``, or ``chains[table][tap][chain]``
    (what the kernel has, by tap) when ``tap`` is given."""
    found: set[tuple[str, str, str]] = set()
    for table, by_name in chains.items():
        for name, rules in (by_name.get(tap, {}) if tap is not None else by_name).items():
            found.update((table, name, rule) for rule in rules)
    return found


def _addresses(current: dict[str, dict[str, dict[str, list[str]]]], tap: str) -> set[str]:
    """The addresses a tap's anti-spoofing chains admit now (read back from the kernel)."""
    found: set[str] = set()
    for table in ("ipv4", "ipv6"):
        for rule in current[table].get(tap, {}).get(chain_name(SPOOF, tap), []):
            if (match := _SPOOF_SOURCE.match(rule)) and not match.group(1).startswith("fe80:"):
                found.add(match.group(1))
    return found


class RecordedFirewall:
    """The filtering of a host whose driver makes no taps: what would be applied is recorded in
    :attr:`ports` (tap -> its :class:`PortRules`), nothing runs."""

    def __init__(self) -> None:
        self.ports: dict[str, PortRules] = {}
        self.removed: list[str] = []
        self._lock = threading.Lock()

    def applied(self) -> set[str]:
        with self._lock:
            return set(self.ports)

    def apply(self, ports: Iterable[contract.NetworkSpec]) -> list[str]:
        return self._record({port["tap"]: port_rules(port) for port in ports if "security" in port}, None)

    def sync(self, ports: Iterable[contract.NetworkSpec], keep: Iterable[str] = ()) -> list[str]:
        return self._record({port["tap"]: port_rules(port) for port in ports}, set(keep))

    def remove(self, taps: Iterable[str]) -> list[str]:
        return self._record({tap: None for tap in taps}, None)

    def _record(self, wanted: dict[str, PortRules | None], keep: set[str] | None) -> list[str]:
        done = []
        with self._lock:
            if keep is not None:
                for tap in [tap for tap in self.ports if tap not in wanted and tap not in keep]:
                    wanted[tap] = None
            for tap, rules in wanted.items():
                if rules is None:
                    if self.ports.pop(tap, None) is not None:
                        self.removed.append(tap)
                        done.append(f"firewall of {tap} removed")
                elif self.ports.get(tap) != rules:
                    self.ports[tap] = rules
                    done.append(f"firewall {tap}")
        return done


class HostFirewall(Protocol):
    """What the operation families use: :class:`Firewall` or :class:`RecordedFirewall`."""

    def applied(self) -> set[str]:
        ...

    def apply(self, ports: Iterable[contract.NetworkSpec]) -> list[str]:
        ...

    def sync(self, ports: Iterable[contract.NetworkSpec], keep: Iterable[str] = ()) -> list[str]:
        ...

    def remove(self, taps: Iterable[str]) -> list[str]:
        ...
