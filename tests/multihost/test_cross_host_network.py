"""Networking across harness hosts with the whole stack: VXLAN tenant networks spanning hosts, DHCP and a
router on the network node, and a floating IP that keeps answering while its server live-migrates.

Three harness hosts (host-b and host-c share their instances directory, as in the ``cloud`` fixture);
host-a is the network node (``NETWORK_NODE_HOST``, ``NETWORK_DHCP_HOST``). Each host's compute worker makes
its bridges, VXLAN devices and firewall in the host's network namespace (``COMPUTE_NETWORK_NAMESPACE``)
with the host's address as its tunnel endpoint (``COMPUTE_TUNNEL_IP``), see
:meth:`testbed.hosts.NamespaceHost.worker_env`. The network node's flat uplink
(``COMPUTE_FLAT_INTERFACE``) is a veth from an "outside" namespace of this test's own, the world that
pings the floating IP. Every address used lives inside the run's namespaces.

The demo guest cannot be logged into: reachability is proven from the network node's ``qdhcp-``
namespace (inside host-a's mount namespace, where the worker made it: :meth:`NamespaceHost.command`)
and from the outside namespace.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from compute_workers.network.dhcp import namespace_name
from compute_workers.network.linuxbridge import FLOOD_MAC, vxlan_name
from testbed.cloud import Cloud, host_workers
from testbed.hosts import HostWorker, NamespaceHost
from testbed.stack import procfile_processes, run_stack

from .conftest import CLOUD_ENV, running_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

NODE = "host-a"
REDIS_DBS = (15, 14)  # broker, RPC backend: this module's alone (the cloud fixture has 3 and 2)
UPLINK = "ext0"  # the node's end of the outside veth: its COMPUTE_FLAT_INTERFACE
OUTSIDE_END = "up0"
EXTERNAL = ipaddress.IPv4Network("203.0.113.0/24")  # TEST-NET-3, only inside this run's namespaces
UPSTREAM = "203.0.113.1"  # the outside namespace's address: the external subnet's gateway
TENANT = "10.90.1.0/24"
IP_LINE = re.compile(r"cloudctl-guest: ip (\S+)/(\d+) gw (\S+)")
ENDED = ("completed", "confirmed", "failed", "cancelled", "error", "refused")
PING = ("ping",) if shutil.which("ping") else ("busybox", "ping")


@dataclass
class NetCloud:
    cloud: Cloud
    outside: str  # the outside world's network namespace

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.cloud.stack.api(method, f"/api/v1{path}", **kwargs)

    def created(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.api("POST", path, json=body)
        assert answer.status_code in (200, 201, 202), f"POST {path} {body}: {answer.status_code} " \
            f"{answer.text}"
        return dict(answer.json())

    def wait_for(self, what: str, check: Any, timeout: float, interval: float = 0.25) -> Any:
        return self.cloud.stack.wait_for(what, check, timeout, interval)


@pytest.fixture(scope="module")
def net(tiny_image_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCloud]:
    with running_hosts(3, shared=(("host-b", "host-c"),)) as harness:
        node = harness.host(NODE)
        outside = harness.add_namespace("out")
        for argv in (["ip", "link", "add", UPLINK, "netns", node.netns, "type", "veth", "peer", "name",
                      OUTSIDE_END, "netns", outside],
                     ["ip", "-n", outside, "link", "set", "lo", "up"],
                     ["ip", "-n", outside, "addr", "add", f"{UPSTREAM}/{EXTERNAL.prefixlen}", "dev",
                      OUTSIDE_END],
                     ["ip", "-n", outside, "link", "set", OUTSIDE_END, "up"],
                     ["ip", "-n", node.netns, "link", "set", UPLINK, "up"]):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        workers: dict[str, HostWorker] = {}
        env = {**CLOUD_ENV, "NETWORK_NODE_HOST": NODE, "NETWORK_DHCP_HOST": NODE}
        with run_stack(tiny_image_path, tmp_path_factory.mktemp("xhost"),
                       procfile=procfile_processes(without=("compute", "flower")),
                       hosts=[host.name for host in harness.hosts], redis_dbs=REDIS_DBS, extra_env=env,
                       companions=lambda stack: host_workers(
                           harness, stack, workers, host_env={NODE: {"COMPUTE_FLAT_INTERFACE": UPLINK}})
                       ) as stack:
            yield NetCloud(Cloud(harness, stack, workers), outside)


# Helpers -------------------------------------------------------------------------------------------


def on_host(host: NamespaceHost, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``argv`` in ``host``'s mount namespace (its ``qdhcp-`` namespaces) and network namespace."""
    return subprocess.run(host.command("ip", "netns", "exec", host.netns, *argv), capture_output=True,
                          text=True, timeout=timeout)


def in_qdhcp(node: NamespaceHost, network_id: str, *argv: str, timeout: float = 30
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(node.command("ip", "netns", "exec", namespace_name(network_id), *argv),
                          capture_output=True, text=True, timeout=timeout)


def pings(run: Any, address: str, count: int = 1) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = run(*PING, "-c", str(count), "-W", "2", address)
    return result


def ping_until(run: Any, address: str, timeout: float) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout
    while True:
        result = pings(run, address)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def flood_peers(host: NamespaceHost, vni: int) -> set[str] | None:
    """The tunnel IPs of the all-zeros (flood) entries of ``vxlan-<vni>`` on ``host``; None without it."""
    shown = on_host(host, "bridge", "fdb", "show", "dev", vxlan_name(vni))
    if shown.returncode != 0:
        assert "does not exist" in shown.stderr or "Cannot find" in shown.stderr, shown.stderr
        return None
    return {line.split(" dst ")[1].split()[0] for line in shown.stdout.splitlines()
            if line.startswith(FLOOD_MAC) and " dst " in line}


def make_network(net: NetCloud, name: str, cidr: str) -> tuple[dict[str, Any], dict[str, Any]]:
    network = net.created("/networks/", {"name": name, "provider_type": "vxlan"})
    assert network["provider_type"] == "vxlan" and network["segmentation_id"], network
    subnet = net.created("/subnets/", {"network": network["id"], "cidr": cidr})
    return network, subnet


def security_group(net: NetCloud, name: str, rule: dict[str, Any]) -> str:
    group = net.created("/security-groups/", {"name": name})
    net.created("/security-group-rules/", {"security_group": group["id"], "direction": "ingress",
                                           "remote_ip_prefix": "0.0.0.0/0", **rule})
    return str(group["id"])


def boot(net: NetCloud, name: str, host: str, network_id: str, group: str,
         fixed_ip: str | None = None) -> str:
    port_body: dict[str, Any] = {"network": network_id, "security_groups": [group]}
    if fixed_ip:
        port_body["fixed_ips"] = [{"ip_address": fixed_ip}]
    port = net.created("/ports/", port_body)
    server = net.created("/servers/", {"name": name, "flavor": "m1.nano", "image": "tiny", "host": host,
                                       "networks": [{"port": port["id"]}]})
    return str(server["id"])


def active(net: NetCloud, server_id: str, timeout: float = 240) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = net.api("GET", f"/servers/{server_id}/").json()
        assert body["status"] != "ERROR", f"build failed: {body['fault']}"
        return body if body["status"] == "ACTIVE" else None

    return dict(net.wait_for(f"server {server_id} ACTIVE", check, timeout))


def lease(net: NetCloud, server_id: str, timeout: float = 240) -> tuple[str, int, str]:
    def check() -> tuple[str, int, str] | None:
        answer = net.api("GET", f"/servers/{server_id}/console-output/?lines=200")
        assert answer.status_code == 200, answer.text
        match = IP_LINE.search(answer.json()["output"])
        return (match.group(1), int(match.group(2)), match.group(3)) if match else None

    return tuple(net.wait_for(f"a lease line on the console of {server_id}", check, timeout, 0.5))  # type: ignore[return-value]


def fixed_address(server: dict[str, Any], network_name: str) -> dict[str, Any]:
    return next(entry for entry in server["addresses"][network_name] if entry["type"] == "fixed")


# 1. Across hosts over VXLAN --------------------------------------------------------------------------


def test_vxlan_network_spans_hosts_and_stays_isolated(net: NetCloud) -> None:
    cloud = net.cloud
    node, other, spare = cloud.host("host-a"), cloud.host("host-b"), cloud.host("host-c")
    open_group = security_group(net, "open", {})  # any IPv4 ingress: isolation must not rely on filtering
    first, first_subnet = make_network(net, "xh-1", TENANT)
    second, _ = make_network(net, "xh-2", TENANT)  # the same CIDR: only L2 separates the two
    assert first["segmentation_id"] != second["segmentation_id"]

    posted = time.monotonic()
    servers = {host.name: boot(net, f"xh-{host.name}", host.name, first["id"], open_group)
               for host in (node, other)}
    # On the second network, at an address free on the first one, on a host that has both networks.
    stranger_ip = str(ipaddress.IPv4Network(TENANT)[50])
    stranger = boot(net, "xh-stranger", other.name, second["id"], open_group, fixed_ip=stranger_ip)

    leased: dict[str, float] = {}
    for host_name, server_id in servers.items():
        body = active(net, server_id)
        assert body["host"] == host_name, body
        address, prefix, gateway = lease(net, server_id)
        leased[host_name] = time.monotonic() - posted
        entry = fixed_address(body, first["name"])
        assert (address, prefix, gateway) == (entry["addr"], 24, first_subnet["gateway_ip"]), \
            body["addresses"]
    print(f"\nPOST -> lease line on the console: on the network node {leased['host-a']:.1f} s, on "
          f"host-b (DHCP over VXLAN) {leased['host-b']:.1f} s (both booted at once)")

    # The network node's DHCP namespace reaches both guests: host-b's across VXLAN.
    for host_name, server_id in servers.items():
        body = net.api("GET", f"/servers/{server_id}/").json()
        address = fixed_address(body, first["name"])["addr"]
        ping = ping_until(lambda *argv: in_qdhcp(node, first["id"], *argv), address, 30)
        assert ping.returncode == 0, f"{host_name} {address}: {ping.stdout}{ping.stderr}"

    # Flood entries: each host with a port on the network points at exactly the others with one.
    vni = int(first["segmentation_id"])
    expected = {node.name: {other.ip}, other.name: {node.ip}}
    net.wait_for("flood entries of the first network", lambda: {
        host.name: flood_peers(host, vni) for host in (node, other)} == expected, 30)
    assert flood_peers(spare, vni) is None  # no port there: no VXLAN device either

    # Isolation: the stranger answers on its own network, never from the first one's namespace.
    active(net, stranger)
    assert lease(net, stranger)[0] == stranger_ip
    ping = ping_until(lambda *argv: in_qdhcp(node, second["id"], *argv), stranger_ip, 30)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    leak = pings(lambda *argv: in_qdhcp(node, first["id"], *argv), stranger_ip, count=3)
    assert leak.returncode != 0, f"{stranger_ip} of network xh-2 answered on xh-1:\n{leak.stdout}"
    neighbours = in_qdhcp(node, first["id"], "ip", "neigh", "show", stranger_ip).stdout
    assert "lladdr" not in neighbours, neighbours

    for server_id in (*servers.values(), stranger):
        assert net.api("DELETE", f"/servers/{server_id}/").status_code in (202, 204)
    for server_id in (*servers.values(), stranger):
        net.wait_for(f"server {server_id} gone", lambda server_id=server_id: net.api(
            "GET", f"/servers/{server_id}/").status_code == 404, 90)


# 2. Live migration of a server with a floating IP, pinged every 100 ms -------------------------------


def parse_ping(output: str) -> tuple[int, int, int]:
    """(transmitted, received, longest run of unanswered sequence numbers) of ``ping`` output."""
    summary = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", output)
    assert summary, output
    answered = sorted({int(seq) for seq in re.findall(r"bytes from .*?icmp_seq=(\d+)", output)})
    transmitted, received = int(summary.group(1)), int(summary.group(2))
    gaps = [later - earlier - 1 for earlier, later in itertools.pairwise(answered)]
    if answered:
        gaps += [answered[0] - 1, transmitted - answered[-1]]
    return transmitted, received, max(gaps, default=transmitted)


def test_floating_ip_answers_through_a_live_migration(net: NetCloud) -> None:
    cloud = net.cloud
    source, dest = "host-b", "host-c"  # neither is the network node: both reach the router over VXLAN
    network, subnet = make_network(net, "xh-fip", "10.90.3.0/24")
    external = net.created("/networks/", {"name": "xh-public", "external": True, "provider_type": "flat"})
    net.created("/subnets/", {"network": external["id"], "cidr": str(EXTERNAL), "gateway_ip": UPSTREAM,
                              "enable_dhcp": False,
                              "allocation_pools": [{"start": str(EXTERNAL[10]), "end": str(EXTERNAL[99])}]})
    router = net.created("/routers/", {"name": "xh-router", "external_gateway": external["id"]})
    net.created(f"/routers/{router['id']}/add-interface/", {"subnet": subnet["id"]})
    group = security_group(net, "icmp", {"protocol": "icmp"})
    server_id = boot(net, "xh-migrant", source, network["id"], group)
    assert active(net, server_id)["host"] == source
    fixed, _prefix, gateway = lease(net, server_id)
    assert gateway == subnet["gateway_ip"]
    floating = net.created("/floating-ips/", {"network": external["id"], "server": server_id})
    address = floating["floating_ip_address"]
    assert floating["fixed_ip_address"] == fixed, floating

    def outside(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", net.outside, *argv], capture_output=True, text=True,
                              timeout=30)

    reached = ping_until(outside, address, 60)
    assert reached.returncode == 0, f"floating IP {address} unreachable from outside:\n{reached.stdout}"

    pinger = subprocess.Popen(["ip", "netns", "exec", net.outside, *PING, "-i", "0.1", "-W", "1", address],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(2)  # a baseline: every ping answered before the migration starts
        started = time.monotonic()
        answer = net.api("POST", f"/servers/{server_id}/live-migrate/", json={"host": dest})
        assert answer.status_code == 202, answer.text
        migration_id = answer.json()["id"]

        def ended() -> dict[str, Any] | None:
            found = net.api("GET", f"/servers/{server_id}/migrations/{migration_id}/").json()
            server = net.api("GET", f"/servers/{server_id}/").json()
            return found if found["status"] in ENDED and server["task_state"] is None else None

        done = net.wait_for(f"live migration {migration_id}", ended, 240)
        took = time.monotonic() - started
        time.sleep(5)  # the guest has time to answer again after the switch-over
    finally:
        pinger.send_signal(signal.SIGINT)
        output, _ = pinger.communicate(timeout=30)
    assert done["status"] in ("completed", "confirmed"), done
    server = net.api("GET", f"/servers/{server_id}/").json()
    assert server["host"] == dest, server
    transmitted, received, longest = parse_ping(output)
    lost = transmitted - received
    print(f"\nlive migration {source} -> {dest} of a server with a floating IP: {took:.1f} s, downtime "
          f"{done.get('downtime_ms')} ms (libvirt's); ping every 100 ms from outside: {transmitted} sent, "
          f"{received} answered, {lost} lost, longest gap {longest} pings")
    # A request that reached the destination's tap while the guest was paused would be answered late.
    late = [line for line in output.splitlines()
            if float(re.findall(r"time=([\d.]+)", line + " time=0")[0]) > 100]
    print(f"replies later than 100 ms: {len(late)}", *late, sep="\n  ")
    assert lost < 50, f"the guest was unreachable for {lost} pings (100 ms apart):\n{output[-3000:]}"
    # The guest still answers, and it is on the destination's bridge now.
    assert pings(outside, address, count=3).returncode == 0
    vni = int(network["segmentation_id"])
    node, src, dst = cloud.host(NODE), cloud.host(source), cloud.host(dest)
    net.wait_for(f"{source} without vxlan-{vni}", lambda: flood_peers(src, vni) is None, 30)
    assert (flood_peers(node, vni), flood_peers(dst, vni)) == ({dst.ip}, {node.ip})
    # nolearning: no per-MAC entry that could still point at the source (unicast floods to the peers).
    entries = on_host(node, "bridge", "fdb", "show", "dev", vxlan_name(vni)).stdout
    assert src.ip not in entries, entries
