"""A network node's router for real: the real CommandRunner in a "node" namespace this test makes (the
legs' bridges, the VXLAN device, the flat uplink and the veths' host ends live there), the ``qrouter-``
namespace beside it, real iptables and conntrack; an "outside" namespace (the external network's far
end: a bridge holding its gateway address) joined to the node's flat uplink by a veth, and two "guest"
namespaces on the tenant bridge. Root; skipped with the reason where namespaces, bridges, veth pairs,
VXLAN or iptables NAT in a namespace are missing. Nothing is made in the root namespace but the
namespaces themselves, and nothing leaves the machine.

What it shows: the outside reaches a guest at its floating IP (DNAT), guests reach the outside as their
floating IP or, without one, as the router's gateway address (SNAT); removing the floating IP stops the
replies at once, even those of a ping that was already running (its conntrack entry is deleted); deleting
the router leaves no namespace, veth or bridge hold behind. Measured (printed with ``-s``): from the
start of the sync that associates a floating IP to the first ping reply the outside gets from it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_workers import contract
from compute_workers.network.linuxbridge import CommandRunner, LinuxBridges
from compute_workers.network.router import Routers, hold_owner, namespace_name
from testbed.hosts import delete_netns, fresh_namespaces, missing_netns_features

PREFIX = "ccl3-"  # namespaces: ccl3-<pid>-<random>
EXTERNAL = "203.0.113"  # TEST-NET-3: .1 the outside, .10 the router's gateway, .20 the floating IP
TENANT = "10.253.213"  # .1 the router's interface, .10 and .11 the guests
UPLINK = "uplink0"  # the node's flat interface (COMPUTE_FLAT_INTERFACE)
PORT = 8080


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, veth pairs, iptables)"
    for tool, package in (("ip", "iproute2"), ("iptables-restore", "iptables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian package {package}; tools/install-system.sh installs it)"
    if shutil.which("ping") is None and shutil.which("busybox") is None:
        return "needs `ping` (iputils-ping) or busybox"
    probe = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    return missing_netns_features(probe, (
        (["ip", "-n", probe, "link", "add", "br0", "type", "bridge"], "Linux bridges"),
        (["ip", "-n", probe, "link", "add", "vx0", "type", "vxlan", "id", "7", "dstport", "4789"], "VXLAN"),
        (["ip", "-n", probe, "link", "add", "ve0", "type", "veth", "peer", "name", "ve1"], "veth pairs"),
        (["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "ve0", "-j",
          "SNAT", "--to-source", "192.0.2.1"], "iptables NAT in a namespace"),
    ))


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def sh(ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)


def ok(ns: str, *argv: str) -> str:
    result = sh(ns, *argv)
    assert result.returncode == 0, f"{' '.join(argv)} in {ns}: {result.stderr}"
    return result.stdout


def ping_argv(address: str, *options: str) -> list[str]:
    return [*(["ping"] if shutil.which("ping") else ["busybox", "ping"]), *options, address]


def pings(ns: str, address: str, count: int = 1, wait: int = 1) -> bool:
    """Whether ``address`` answers a ping from ``ns``."""
    result = sh(ns, *ping_argv(address, "-c", str(count), "-W", str(wait)), timeout=count * wait + 10)
    return result.returncode == 0


# Seen from the outside: the source address of a TCP connection it accepts, sent back to the caller.
_ECHO_PEER = f"""
import socket
server = socket.create_server(("0.0.0.0", {PORT}))
while True:
    conn, (peer, _) = server.accept()
    with conn:
        conn.sendall(peer.encode())
"""
_CONNECT = f"""
import socket, sys
with socket.create_connection((sys.argv[1], {PORT}), 5) as conn:
    print(conn.recv(64).decode())
"""


def source_seen_by_outside(guest: str) -> str:
    return ok(guest, sys.executable, "-c", _CONNECT, f"{EXTERNAL}.1").strip()


def leg(network_id: str, port_id: str, ip: str, cidr: str, gateway_ip: str | None, provider: str,
        vni: int | None, mtu: int, mac: str) -> contract.RouterPortSpec:
    return {"port_id": port_id, "network_id": network_id, "bridge": contract.bridge_name(network_id),
            "provider_type": provider, "segmentation_id": vni, "mtu": mtu,  # type: ignore[typeddict-item]
            "mac_address": mac, "ip_address": ip, "cidr": cidr, "gateway_ip": gateway_ip}


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """Fresh namespaces: outside, node, guest1, guest2."""
    roles = ("outside", "node", "guest1", "guest2")
    with fresh_namespaces(PREFIX, len(roles)) as names:
        yield dict(zip(roles, names, strict=True))


def test_floating_ip_dnat_snat_removal_and_deletion(namespaces: dict[str, str]) -> None:
    outside, node = namespaces["outside"], namespaces["node"]
    guests = (namespaces["guest1"], namespaces["guest2"])
    # The outside world: a bridge with the external network's gateway address, and a veth to the node.
    ok(outside, "ip", "link", "add", "brout", "type", "bridge")
    ok(outside, "ip", "addr", "add", f"{EXTERNAL}.1/24", "dev", "brout")
    ok(outside, "ip", "link", "set", "brout", "up")
    ok(outside, "ip", "link", "add", "pub0", "type", "veth", "peer", "name", UPLINK, "netns", node)
    ok(outside, "ip", "link", "set", "pub0", "master", "brout", "up")

    runner = CommandRunner(node)
    bridges = LinuxBridges(runner, tunnel_ip="127.0.0.1", flat_interface=UPLINK)
    routers = Routers(runner, bridges, namespaces=CommandRunner())
    router_id, external_net, tenant_net = (str(uuid.uuid4()) for _ in range(3))
    gateway = leg(external_net, str(uuid.uuid4()), f"{EXTERNAL}.10", f"{EXTERNAL}.0/24", f"{EXTERNAL}.1",
                  "flat", None, 1500, "fa:16:3e:0d:00:0a")
    interface = leg(tenant_net, str(uuid.uuid4()), f"{TENANT}.1", f"{TENANT}.0/24", None, "vxlan", 4242, 1450,
                    "fa:16:3e:0d:00:0b")
    spec: contract.RouterSpec = {"router_id": router_id, "deleted": False, "enable_snat": True,
                                 "gateway": gateway, "interfaces": [interface], "floating_ips": []}
    qrouter = namespace_name(router_id)
    try:
        done = routers.sync(spec)
        assert "NAT rules" in done and f"default route via {EXTERNAL}.1" in done, done
        assert routers.sync(spec) == []  # converged: nothing to do

        # The guests: a veth each on the tenant bridge, a fixed IP, the router's interface as gateway.
        for index, guest in enumerate(guests):
            host_end = f"g{index}h"
            ok(node, "ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", guest)
            ok(node, "ip", "link", "set", host_end, "master", interface["bridge"], "up")
            ok(guest, "ip", "link", "set", "eth0", "mtu", "1450", "up")
            ok(guest, "ip", "addr", "add", f"{TENANT}.{10 + index}/24", "dev", "eth0")
            ok(guest, "ip", "route", "add", "default", "via", f"{TENANT}.1")
        subprocess.Popen(["ip", "netns", "exec", outside, sys.executable, "-c", _ECHO_PEER],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # killed with the namespace
        deadline = time.monotonic() + 10
        while sh(guests[0], sys.executable, "-c", _CONNECT, f"{EXTERNAL}.1").returncode != 0:
            assert time.monotonic() < deadline, "the outside's echo server did not answer"
            time.sleep(0.05)

        # Without a floating IP both guests reach the outside as the gateway address (SNAT).
        assert [source_seen_by_outside(guest) for guest in guests] == [f"{EXTERNAL}.10"] * 2
        assert not pings(outside, f"{EXTERNAL}.20")

        # Associate 203.0.113.20 with guest 1: time from the sync to the outside's first reply.
        associated: contract.RouterSpec = {**spec, "floating_ips": [
            {"floating_ip_id": str(uuid.uuid4()), "floating_ip_address": f"{EXTERNAL}.20",
             "fixed_ip_address": f"{TENANT}.10"}]}
        started = time.monotonic()
        done = routers.sync(associated)
        synced = time.monotonic()
        while not pings(outside, f"{EXTERNAL}.20", wait=1):
            assert time.monotonic() - started < 10, "no reply from the floating IP within 10 s"
        replied = time.monotonic()
        print(f"\nfloating IP association: sync {1000 * (synced - started):.0f} ms, first reply "
              f"{1000 * (replied - started):.0f} ms after the sync began")
        assert f"address {EXTERNAL}.20/32 on qg-{gateway['port_id'][:11]}" in done and "NAT rules" in done
        assert routers.sync(associated) == []
        # Guest 1 is seen as its floating IP, guest 2 still as the gateway address.
        assert [source_seen_by_outside(guest) for guest in guests] == [f"{EXTERNAL}.20", f"{EXTERNAL}.10"]

        # A ping running while the floating IP goes gets no reply after it: its conntrack entry is
        # deleted (the outside still has the router's MAC for .20 in its ARP cache).
        running = subprocess.Popen(["ip", "netns", "exec", outside,
                                    *ping_argv(f"{EXTERNAL}.20", "-i", "0.1", "-w", "3")],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        replies: list[float] = []

        def read() -> None:
            assert running.stdout is not None
            for line in running.stdout:
                if "bytes from" in line:
                    replies.append(time.monotonic())

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 5
        while len(replies) < 3:
            assert time.monotonic() < deadline, "the running ping got no replies"
            time.sleep(0.02)
        done = routers.sync(spec)
        removed = time.monotonic()
        running.wait(10)
        reader.join(10)
        late = [round(t - removed, 2) for t in replies if t > removed + 0.05]
        assert not late, f"replies after the floating IP was removed (s after): {late}"
        assert f"connections of {EXTERNAL}.20 deleted" in done, done
        assert not pings(outside, f"{EXTERNAL}.20")
        assert source_seen_by_outside(guests[0]) == f"{EXTERNAL}.10"

        # Deletion: no namespace, veth or hold left; the tenant bridge stays while the guests are on it.
        done = routers.sync({"router_id": router_id, "deleted": True})
        assert f"namespace {qrouter}" in done
        assert qrouter not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = {line.split(":")[1].strip().split("@")[0]
                 for line in ok(node, "ip", "-o", "link", "show").splitlines()}
        assert not {contract.tap_name(gateway["port_id"]), contract.tap_name(interface["port_id"])} & links
        assert gateway["bridge"] not in links  # nothing but the flat uplink was on it
        assert interface["bridge"] in links  # the guests are
        assert bridges.release(hold_owner(router_id)) == []
        for index in range(len(guests)):
            ok(node, "ip", "link", "del", f"g{index}h")
        assert bridges.remove_bridge_if_unused(interface["bridge"]) is True  # no hold keeps it
        assert routers.sync({"router_id": router_id, "deleted": True}) == []
    finally:
        delete_netns(qrouter)


def test_public_net_script_is_idempotent_and_removes_what_it_made() -> None:
    """``tools/public-net.sh`` (make run's outside world), with names of this test's own. Its veth end
    is in the root namespace by design (the worker's flat interface), with no address; it goes at the end."""
    token = secrets.token_hex(2)
    ns, interface = f"{PREFIX}{os.getpid()}-pub{token}", f"ccl3p{token}"
    env = {**os.environ, "CLOUDCTL_PUBLIC_NETNS": ns, "CLOUDCTL_PUBLIC_INTERFACE": interface,
           "CLOUDCTL_PUBLIC_GATEWAY": "172.24.4.1/24", "NETWORK_PHYSICAL_MTU": "1500"}
    script = str(Path(__file__).resolve().parents[2] / "tools" / "public-net.sh")

    def run(action: str) -> None:
        result = subprocess.run([script, action], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr

    try:
        run("up")
        run("up")
        assert ok(ns, "ip", "-4", "-o", "addr", "show", "dev", "br-public").split()[3] == "172.24.4.1/24"
        inside = json.loads(ok(ns, "ip", "-j", "link", "show", "dev", "public0"))[0]
        assert inside["master"] == "br-public" and "UP" in inside["flags"]
        shown = subprocess.run(["ip", "-j", "addr", "show", "dev", interface], capture_output=True, text=True,
                               check=True)
        outside = json.loads(shown.stdout)[0]
        assert "UP" in outside["flags"] and outside["addr_info"] == [] and outside["mtu"] == 1500
        subprocess.run(["ip", "link", "del", "dev", interface], check=True)  # repaired by the next `up`
        run("up")
        assert json.loads(ok(ns, "ip", "-j", "link", "show", "dev", "public0"))[0]["master"] == "br-public"
        run("down")
        run("down")
        assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert subprocess.run(["ip", "link", "show", "dev", interface], capture_output=True).returncode != 0
    finally:
        subprocess.run(["ip", "link", "del", "dev", interface], capture_output=True)
        delete_netns(ns)
