"""Security groups for real: a "host" network namespace with the network's bridge, and two "guest"
namespaces joined to it by veth pairs whose host ends are named like taps, converged with the real
host network sync (LinuxBridges, Firewall: iptables, ebtables, conntrack in the host namespace). Root
only; skipped with the reason where namespaces, bridges, veth pairs, br_netfilter, physdev or the tools
are missing. Nothing is made in the root namespace but the namespaces, and nothing leaves the machine."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from compute_workers import contract
from compute_workers.network.firewall import Firewall
from compute_workers.network.host import HostNetworking
from compute_workers.network.linuxbridge import CommandRunner, LinuxBridges
from testbed.hosts import fresh_namespaces, missing_netns_features

PREFIX = "cchfw-"  # namespaces: cchfw-<pid>-<random>
SUBNET = "10.253.213"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, iptables)"
    for tool, package in (("ip", "iproute2"), ("iptables-restore", "iptables"),
                          ("ip6tables-restore", "iptables"), ("ebtables-restore", "iptables"),
                          ("conntrack", "conntrack"), ("ping", "iputils-ping")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian package {package})"
    probe = f"{PREFIX}{os.getpid()}-probe"
    run = ["ip", "netns", "exec", probe]
    return missing_netns_features(probe, (
        (["ip", "-n", probe, "link", "add", "br0", "type", "bridge"], "Linux bridges"),
        (["ip", "-n", probe, "link", "add", "ve0", "type", "veth", "peer", "name", "ve1"], "veth pairs"),
        ([*run, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables"], "br_netfilter in a namespace"),
        ([*run, "iptables", "-A", "FORWARD", "-m", "physdev", "--physdev-is-bridged", "-j", "ACCEPT"],
         "iptables physdev match"),
        ([*run, "ebtables", "-t", "nat", "-L"], "ebtables (nft)"),
        ([*run, "conntrack", "-L"], "conntrack"),
    ))


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def sh(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30)
    assert not check or result.returncode == 0, f"{' '.join(argv)} in {ns}: {result.stderr}"
    return result


def pings(ns: str, address: str) -> bool:
    return sh(ns, "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


@dataclass
class Guest:
    ns: str
    port: contract.NetworkSpec
    ip: str


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[tuple[str, HostNetworking, list[Guest]]]:
    """The host namespace, its host network sync, two guests on one flat network (not yet plugged)."""
    with fresh_namespaces(PREFIX, 3) as names:
        host = names[0]
        runner = CommandRunner(host)
        bridges = LinuxBridges(runner)
        networking = HostNetworking(bridges, Firewall(runner), tmp_path / "_network", taps=bridges.taps)
        network_id = str(uuid.uuid4())
        guests = []
        for index, ns in enumerate(names[1:]):
            port_id, ip = str(uuid.uuid4()), f"{SUBNET}.{10 + index}"
            port: contract.NetworkSpec = {
                "port_id": port_id, "network_id": network_id, "mac_address": f"fa:16:3e:00:fe:{index:02x}",
                "fixed_ips": [{"ip_address": ip, "subnet_id": "s", "cidr": f"{SUBNET}.0/24",
                               "gateway_ip": None}],
                "mtu": 1500, "provider_type": "flat", "segmentation_id": None,
                "bridge": contract.bridge_name(network_id), "tap": contract.tap_name(port_id)}
            guests.append(Guest(ns, port, ip))
        yield host, networking, guests


def plug(host: str, guest: Guest) -> None:
    """What libvirt does for a guest's NIC: its tap on the bridge (here a veth whose other end is the
    guest's eth0)."""
    port = guest.port
    sh(host, "ip", "link", "add", port["tap"], "type", "veth", "peer", "name", "eth0", "netns", guest.ns)
    sh(host, "ip", "link", "set", port["tap"], "master", port["bridge"], "up")
    sh(guest.ns, "ip", "link", "set", "eth0", "address", port["mac_address"], "up")
    sh(guest.ns, "ip", "addr", "add", f"{guest.ip}/24", "dev", "eth0")


def icmp_in(prefixes: list[str] | None = None) -> contract.SecurityRuleSpec:
    return {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp", "port_range_min": None,
            "port_range_max": None, "remote_ip_prefixes": prefixes}


EGRESS_ANY: contract.SecurityRuleSpec = {"direction": "egress", "ethertype": "IPv4", "protocol": None,
                                         "port_range_min": None, "port_range_max": None,
                                         "remote_ip_prefixes": None}


def secured(guest: Guest, *ingress: contract.SecurityRuleSpec) -> contract.NetworkSpec:
    return {**guest.port, "security": {
        "enabled": True,
        "allowed_addresses": [{"mac_address": guest.port["mac_address"], "ip_address": guest.ip}],
        "rules": [EGRESS_ANY, *ingress]}}


class States:
    """Host network states of growing generations."""

    def __init__(self, networking: HostNetworking, guests: list[Guest]) -> None:
        self.networking, self.guests, self.generation = networking, guests, 0

    def sync(self, *ports: contract.NetworkSpec) -> list[str]:
        self.generation += 1
        networks: list[contract.HostNetwork] = [
            {"network_id": p["network_id"], "bridge": p["bridge"], "provider_type": "flat",
             "segmentation_id": None, "mtu": 1500, "peers": []} for p in ports[:1]]
        done = self.networking.sync({"host": "h", "generation": self.generation, "networks": networks,
                                     "ports": list(ports)})
        assert self.networking.errors == []
        return done


def continuous_ping(ns: str, address: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-D", "-n", "-i", "0.1", "-W", "1",
                             address], stdout=subprocess.PIPE, text=True)


def reply_times(process: subprocess.Popen[str]) -> list[float]:
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=10)
    return [float(match.group(1)) for match in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]


def test_security_groups_between_two_guests(bed: tuple[str, HostNetworking, list[Guest]]) -> None:
    host, networking, guests = bed
    a, b = guests
    states = States(networking, guests)
    started = time.monotonic()
    states.sync(secured(a), secured(b))
    print(f"\nfirst sync (bridge + 2 ports): {(time.monotonic() - started) * 1000:.0f} ms")
    for guest in guests:
        plug(host, guest)
    assert not pings(a.ns, b.ip)  # B admits nothing from outside yet

    states.sync(secured(a), secured(b, icmp_in()))
    assert pings(a.ns, b.ip)
    saved = sh(host, "iptables-save", "-t", "filter").stdout
    started = time.monotonic()
    assert states.sync(secured(a), secured(b, icmp_in())) == []  # converged: nothing runs but the reads
    print(f"no-op sync: {(time.monotonic() - started) * 1000:.0f} ms")
    unchanged = sh(host, "iptables-save", "-t", "filter").stdout
    assert re.sub(r"#.*\n", "", unchanged) == re.sub(r"#.*\n", "", saved)

    # Without the conntrack flush an allowed, running ping would survive the rule's removal ...
    ping = continuous_ping(a.ns, b.ip)
    time.sleep(0.5)
    Firewall(CommandRunner(host), conntrack=False).apply([secured(b)])
    removed = time.time()
    time.sleep(1.5)
    replies = reply_times(ping)
    assert replies and replies[-1] > removed + 1.0, "the established ping ended without a conntrack flush"
    # ... with it, it stops at once.
    states.sync(secured(a), secured(b, icmp_in()))
    ping = continuous_ping(a.ns, b.ip)
    time.sleep(0.5)
    done = states.sync(secured(a), secured(b))
    removed = time.time()
    assert f"conntrack of {b.port['tap']} flushed" in done
    time.sleep(1.5)
    replies = reply_times(ping)
    assert replies and replies[-1] < removed + 1.0, f"last reply {replies[-1] - removed:.2f} s after"
    print(f"last reply {max(replies[-1] - removed, 0) * 1000:.0f} ms after the rule's removal")
    assert not pings(a.ns, b.ip)

    # Remote groups: the rule admits only the prefixes of its members.
    states.sync(secured(a), secured(b, icmp_in([f"{SUBNET}.99/32"])))
    assert not pings(a.ns, b.ip)
    states.sync(secured(a), secured(b, icmp_in([])))
    assert not pings(a.ns, b.ip)
    states.sync(secured(a), secured(b, icmp_in([f"{a.ip}/32", f"{SUBNET}.99/32"])))
    assert pings(a.ns, b.ip)

    # Spoofing: A takes an address that is not its own. Its ARP request for B (sender .50) is dropped
    # by ebtables, so B never learns .50; with B's MAC given to A, its IP packets are dropped by the
    # anti-spoofing chain. Another MAC: dropped too. Back to its own, it passes again.
    states.sync(secured(a), secured(b, icmp_in()))
    sh(b.ns, "ip", "neigh", "flush", "all")
    sh(a.ns, "ip", "addr", "flush", "dev", "eth0")
    sh(a.ns, "ip", "addr", "add", f"{SUBNET}.50/24", "dev", "eth0")
    assert not pings(a.ns, b.ip)
    assert f"{SUBNET}.50 " not in sh(b.ns, "ip", "neigh", "show").stdout
    sh(a.ns, "ip", "neigh", "replace", b.ip, "lladdr", b.port["mac_address"], "dev", "eth0")
    assert not pings(a.ns, b.ip)
    sh(a.ns, "ip", "addr", "flush", "dev", "eth0")
    sh(a.ns, "ip", "addr", "add", f"{a.ip}/24", "dev", "eth0")
    assert pings(a.ns, b.ip)
    sh(a.ns, "ip", "link", "set", "eth0", "address", "fa:16:3e:00:fe:77")
    assert not pings(a.ns, b.ip)
    sh(a.ns, "ip", "link", "set", "eth0", "address", a.port["mac_address"])
    assert pings(a.ns, b.ip)

    # A port with security off has no chains: its traffic passes unfiltered.
    off = {**secured(a), "security": {**secured(a)["security"], "enabled": False}}
    states.sync(off, secured(b, icmp_in()))  # type: ignore[arg-type]
    assert networking.firewall.applied() == {b.port["tap"]}

    # A port not listed keeps its chains while its tap exists (the state predates it); once its tap is
    # gone the next sync removes them. The last port gone: no chain, no hook, no bridge.
    assert states.sync(secured(a)) == [f"firewall {a.port['tap']}"]
    assert networking.firewall.applied() == {a.port["tap"], b.port["tap"]}
    sh(host, "ip", "link", "del", b.port["tap"])
    assert states.sync(secured(a))[:1] == [f"firewall of {b.port['tap']} removed"]
    assert networking.firewall.applied() == {a.port["tap"]}
    sh(host, "ip", "link", "del", a.port["tap"])
    done = states.sync()
    assert f"bridge {a.port['bridge']} removed" in done
    for save in ("iptables-save", "ip6tables-save", "ebtables-save"):
        assert "cloudctl" not in sh(host, save).stdout, save
    assert sh(host, "ip", "-o", "link", "show").stdout.count("\n") == 1  # lo only


def test_time_to_apply_a_sync_of_many_ports(bed: tuple[str, HostNetworking, list[Guest]]) -> None:
    host, networking, guests = bed
    template = guests[0].port
    ports = []
    for index in range(100):
        port_id = str(uuid.uuid4())
        ip = f"10.254.{index // 200}.{index % 200 + 2}"
        rules = [icmp_in(), icmp_in([f"10.254.0.{n}/32" for n in range(2, 12)]),
                 {**icmp_in(), "protocol": "tcp", "port_range_min": 22, "port_range_max": 22}]
        ports.append({**template, "port_id": port_id, "tap": contract.tap_name(port_id),
                      "mac_address": f"fa:16:3e:01:{index // 256:02x}:{index % 256:02x}",
                      "security": {"enabled": True, "allowed_addresses": [
                          {"mac_address": f"fa:16:3e:01:{index // 256:02x}:{index % 256:02x}",
                           "ip_address": ip}],
                          "rules": [EGRESS_ANY, *rules]}})
    states = States(networking, guests)
    timings = {}
    for label, wanted in (("apply 100 ports", ports), ("no-op", ports), ("change 1 of 100", [
            {**ports[0], "security": {**ports[0]["security"], "rules": [EGRESS_ANY]}}, *ports[1:]]),
            ("remove 100", [])):
        started = time.monotonic()
        states.sync(*wanted)
        timings[label] = time.monotonic() - started
    rules = sh(host, "iptables-save").stdout.count("\n-A ")
    print("\nhost network sync: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    assert rules < 10 and len(networking.firewall.applied()) == 0
    # The timings are printed, not asserted: speed is measured in benchmarks, not in timed tests.
