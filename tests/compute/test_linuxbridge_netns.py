"""The host's bridges for real: the real CommandRunner in network namespaces this test makes (root; skipped
with the reason where namespaces, bridges or VXLAN are missing). Nothing is made in the root namespace
and nothing leaves the machine: the VXLAN underlay is a veth pair between two namespaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from compute_workers.network.linuxbridge import CommandRunner, LinuxBridges
from testbed.hosts import fresh_namespaces, missing_netns_features

from .test_linuxbridge import network_spec

PREFIX = "ccplug-"  # namespaces: ccplug-<pid>-<random>
UNDERLAY = ("10.253.201.1", "10.253.201.2")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, VXLAN)"
    if shutil.which("ip") is None or shutil.which("bridge") is None:
        return "needs `ip` and `bridge` (Debian package iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    return missing_netns_features(probe, (
        (["ip", "-n", probe, "link", "add", "br0", "type", "bridge"], "Linux bridges"),
        (["ip", "-n", probe, "link", "add", "vx0", "type", "vxlan", "id", "7", "dstport", "4789"], "VXLAN"),
        (["ip", "-n", probe, "link", "add", "ve0", "type", "veth", "peer", "name", "ve1"], "veth pairs"),
    ))


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def sh(ns: str, *argv: str) -> str:
    result = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{' '.join(argv)} in {ns}: {result.stderr}"
    return result.stdout


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    """Two fresh namespaces joined by a veth pair: UNDERLAY[0] in the first, UNDERLAY[1] in the second."""
    with fresh_namespaces(PREFIX, 2) as names:
        sh(names[0], "ip", "link", "add", "under0", "type", "veth", "peer", "name", "under1", "netns",
           names[1])
        for name, link, address in zip(names, ("under0", "under1"), UNDERLAY, strict=True):
            sh(name, "ip", "addr", "add", f"{address}/24", "dev", link)
            sh(name, "ip", "link", "set", link, "up")
        yield names


def link_details(ns: str, name: str) -> dict[str, object]:
    return json.loads(sh(ns, "ip", "-d", "-j", "link", "show", "dev", name))[0]  # type: ignore[no-any-return]


def test_bridge_and_vxlan_are_made_idempotently_and_removed(namespaces: list[str]) -> None:
    ns = namespaces[0]
    bridges = LinuxBridges(CommandRunner(ns), UNDERLAY[0])
    network = network_spec("vxlan", 1001, 1450)
    bridge = network["bridge"]
    started = time.monotonic()
    made = bridges.ensure_bridge(network)
    plug_seconds = time.monotonic() - started
    assert made == [f"bridge {bridge}", "VXLAN vxlan-1001"]
    print(f"bridge + VXLAN plugged in {plug_seconds * 1000:.0f} ms")

    shown = sh(ns, "ip", "-d", "link", "show", "dev", "vxlan-1001")
    assert "vxlan id 1001" in shown and f"local {UNDERLAY[0]}" in shown and "dstport 4789" in shown
    assert "nolearning" in shown and f"master {bridge}" in shown and "mtu 1450" in shown
    shown = sh(ns, "ip", "-d", "link", "show", "dev", bridge)
    assert "stp_state 0" in shown and "forward_delay 0" in shown and ",UP" in shown
    assert "inet" not in sh(ns, "ip", "addr", "show", "dev", bridge)  # no address, not even link-local

    indexes = {name: link_details(ns, name)["ifindex"] for name in (bridge, "vxlan-1001")}
    started = time.monotonic()
    assert bridges.ensure_bridge(network) == []  # a redelivered plug: nothing made, nothing duplicated
    print(f"existing bridge checked in {(time.monotonic() - started) * 1000:.0f} ms")
    assert {name: link_details(ns, name)["ifindex"] for name in (bridge, "vxlan-1001")} == indexes

    sh(ns, "ip", "tuntap", "add", "dev", network["tap"], "mode", "tap")  # what libvirt makes for a guest
    sh(ns, "ip", "link", "set", network["tap"], "master", bridge)
    assert bridges.remove_bridge_if_unused(bridge) is False
    sh(ns, "ip", "link", "del", network["tap"])
    assert bridges.remove_bridge_if_unused(bridge) is True
    links = [link["ifname"] for link in json.loads(sh(ns, "ip", "-j", "link", "show"))]
    assert bridge not in links and "vxlan-1001" not in links
    assert bridges.remove_bridge_if_unused(bridge) is False


def test_two_hosts_reach_each_other_over_the_vxlan(namespaces: list[str]) -> None:
    """Each namespace is a host: the same network's bridge and VXLAN on both, each the other's flood
    peer, and a veth "guest" in each bridge pings the other guest across the overlay."""
    network = network_spec("vxlan", 1002, 1450)
    guests = ("10.99.0.1", "10.99.0.2")
    hosts = [LinuxBridges(CommandRunner(ns), address)
             for ns, address in zip(namespaces, UNDERLAY, strict=True)]
    for index, (ns, host) in enumerate(zip(namespaces, hosts, strict=True)):
        host.ensure_bridge(network)
        host.add_fdb_peer(1002, UNDERLAY[1 - index])
        host.add_fdb_peer(1002, UNDERLAY[1 - index])  # idempotent
        assert f"dst {UNDERLAY[1 - index]}" in sh(ns, "bridge", "fdb", "show", "dev", "vxlan-1002")
        # The guest: one veth end on the bridge (its "tap"), the other holding the guest's address.
        sh(ns, "ip", "link", "add", network["tap"], "mtu", "1450", "type", "veth", "peer", "name", "guest",
           "mtu", "1450")
        sh(ns, "ip", "link", "set", network["tap"], "master", network["bridge"], "up")
        sh(ns, "ip", "addr", "add", f"{guests[index]}/24", "dev", "guest")
        sh(ns, "ip", "link", "set", "guest", "up")
    ping = ("ping",) if shutil.which("ping") else ("busybox", "ping")
    result = subprocess.run(["ip", "netns", "exec", namespaces[0], *ping, "-c", "3", "-i", "0.2", "-W", "2",
                             guests[1]], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the flood entry the first host cannot find the second guest any longer (no learning).
    hosts[0].remove_fdb_peer(1002, UNDERLAY[1])
    hosts[0].remove_fdb_peer(1002, UNDERLAY[1])  # already gone: success
    sh(namespaces[0], "ip", "neigh", "flush", "all")
    result = subprocess.run(["ip", "netns", "exec", namespaces[0], *ping, "-c", "1", "-W", "1", guests[1]],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    for ns, host in zip(namespaces, hosts, strict=True):
        assert host.remove_bridge_if_unused(network["bridge"]) is False  # the guest's end is on it
        sh(ns, "ip", "link", "del", network["tap"])
        assert host.remove_bridge_if_unused(network["bridge"]) is True


def test_flood_peers_converge_to_exactly_the_given_set(namespaces: list[str]) -> None:
    ns = namespaces[0]
    bridges = LinuxBridges(CommandRunner(ns), UNDERLAY[0])
    network = network_spec("vxlan", 1003, 1450)
    assert bridges.set_fdb_peers(1003, ["10.253.201.9"]) == []  # no VXLAN device yet: nothing to flood from
    bridges.ensure_bridge(network)
    assert bridges.cloudctl_bridges() == {network["bridge"]}
    assert bridges.set_fdb_peers(1003, ["10.253.201.9", "10.253.201.8", UNDERLAY[0]]) == [
        "peer 10.253.201.8 of vxlan-1003", "peer 10.253.201.9 of vxlan-1003"]  # never to itself
    assert bridges.set_fdb_peers(1003, ["10.253.201.8", "10.253.201.9"]) == []
    assert bridges.set_fdb_peers(1003, ["10.253.201.7", "10.253.201.8"]) == [
        "peer 10.253.201.7 of vxlan-1003", "peer 10.253.201.9 of vxlan-1003 removed"]
    assert bridges.fdb_peers(1003) == {"10.253.201.7", "10.253.201.8"}
    assert bridges.set_fdb_peers(1003, []) == ["peer 10.253.201.7 of vxlan-1003 removed",
                                               "peer 10.253.201.8 of vxlan-1003 removed"]
    assert bridges.fdb_peers(1003) == set()
    assert bridges.remove_bridge_if_unused(network["bridge"]) is True
    assert bridges.fdb_peers(1003) is None and bridges.cloudctl_bridges() == set()
