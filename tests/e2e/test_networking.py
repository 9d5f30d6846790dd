"""End to end on a network: through the REST API a network and a DHCP subnet, two servers on it; the
network node (the stack's one compute host, ``NETWORK_DHCP_HOST``) serves their leases from dnsmasq in
``qdhcp-<network>``, each guest prints the address it got on its console, and the namespace reaches
both. Deleting the servers and the network leaves nothing on the host: no tap, bridge, namespace or
dnsmasq of theirs.

The network is ``vxlan``, a tenant network as `make run` makes them: its bridge joins this host's guests,
the DHCP namespace and a ``vxlan-<VNI>`` device (local 127.0.0.1, the stack's ``COMPUTE_TUNNEL_IP``) that
floods to no peer, as no other host has a port on it, so nothing a guest sends leaves the machine. The
VNI comes from the run's own ``NETWORK_VNI_RANGE`` (tests/e2e/conftest.py): the device lives in the root
namespace, so two stacks on this machine must not share one. (A ``flat`` network would now get the
stack's uplink, ``COMPUTE_FLAT_INTERFACE``: that is the external network of test_floating_ips.py.)
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt
import pytest

from compute_workers import contract
from compute_workers.network.dhcp import STATE_DIRECTORY, host_end_name, namespace_name
from compute_workers.network.linuxbridge import vxlan_name
from testbed.dhcpnet import missing_capabilities
from testbed.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

LOG = logging.getLogger(__name__)
CIDR = ipaddress.IPv4Network("10.253.210.0/24")
IP_LINE = re.compile(r"cloudctl-guest: ip (\S+)/(\d+) gw (\S+)")
SERVERS = 2


@pytest.fixture(scope="module", autouse=True)
def _namespaces_and_dnsmasq() -> None:
    """The network node needs namespaces, veths, bridges and dnsmasq: skipped, saying why, without."""
    reason = missing_capabilities()
    if reason:
        pytest.skip(reason)


def _links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout


def _namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def _dnsmasq_of(network_id: str) -> list[int]:
    """Pids of dnsmasq processes serving ``network_id`` (their state directory names it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"dnsmasq") and \
                any(f"/{STATE_DIRECTORY}/{network_id}/".encode() in arg for arg in argv):
            found.append(int(proc.name))
    return found


def _leftovers(network_id: str, vni: int, taps: list[str]) -> list[str]:
    """What of the network (and its servers' taps) is still on this host."""
    links = _links()
    names = [*taps, contract.bridge_name(network_id), host_end_name(network_id), vxlan_name(vni)]
    left = [f"link {name}" for name in names if re.search(rf":\s{re.escape(name)}[@:]", links)]
    if namespace_name(network_id) in _namespaces():
        left.append(f"namespace {namespace_name(network_id)}")
    left += [f"dnsmasq pid {pid}" for pid in _dnsmasq_of(network_id)]
    return left


def _scrub(network_id: str, vni: int) -> None:
    """A failed test must not leave the network's devices in the root namespace (the stack's own
    tear-down removes domains and files, not these)."""
    for pid in _dnsmasq_of(network_id):
        subprocess.run(["kill", "-9", str(pid)], capture_output=True)
    subprocess.run(["ip", "netns", "del", namespace_name(network_id)], capture_output=True)
    for name in (host_end_name(network_id), contract.bridge_name(network_id), vxlan_name(vni)):
        subprocess.run(["ip", "link", "del", "dev", name], capture_output=True)


def _ping(netns: str, address: str, timeout: float) -> subprocess.CompletedProcess[str]:
    tool = ["ping"] if shutil.which("ping") else ["busybox", "ping"]
    deadline = time.monotonic() + timeout
    while True:
        ping = subprocess.run(["ip", "netns", "exec", netns, *tool, "-c", "1", "-W", "2", address],
                              capture_output=True, text=True, timeout=30)
        if ping.returncode == 0 or time.monotonic() > deadline:
            return ping
        time.sleep(0.5)


def _report(what: str, seconds: list[float]) -> str:
    line = f"{what}: " + ", ".join(f"{s:.2f} s" for s in seconds)
    LOG.info("e2e networking timing: %s", line)
    return line


def test_two_servers_get_their_leases_and_leave_nothing_behind(stack: Stack) -> None:
    name = f"e2e-net-{secrets.token_hex(3)}"
    created = stack.api("POST", "/api/v1/networks/", json={"name": name, "provider_type": "vxlan"})
    assert created.status_code == 201, created.text
    network = created.json()
    network_id, vni = network["id"], network["segmentation_id"]
    server_ids: list[str] = []
    rule_ids: list[str] = []
    try:
        subnet_answer = stack.api("POST", "/api/v1/subnets/",
                                  json={"network": network_id, "cidr": str(CIDR)})
        assert subnet_answer.status_code == 201, subnet_answer.text
        subnet = subnet_answer.json()
        assert subnet["enable_dhcp"] is True and subnet["gateway_ip"] == str(CIDR[1])
        [dhcp_port] = stack.api("GET", f"/api/v1/ports/?network={network_id}").json()
        assert (dhcp_port["device_owner"], dhcp_port["binding_host"]) == ("network:dhcp", stack.host)

        posted: dict[str, float] = {}
        for index in range(SERVERS):
            # Pinned to the network node, which serves the leases: another test's extra host may still be
            # up, with the same tunnel address (127.0.0.1), so the VXLAN would not join them.
            answer = stack.api("POST", "/api/v1/servers/", json={
                "name": f"{name}-{index}", "flavor": "m1.nano", "image": "tiny", "host": stack.host,
                "networks": [{"network": network_id}]})
            assert answer.status_code == 202, answer.text
            server_ids.append(answer.json()["id"])
            posted[server_ids[-1]] = time.monotonic()

        servers: dict[str, dict[str, Any]] = {}
        activated: dict[str, float] = {}

        def all_active() -> bool:
            for server_id in server_ids:
                if server_id in activated:
                    continue
                body = stack.api("GET", f"/api/v1/servers/{server_id}/").json()
                assert body["status"] != "ERROR", f"build failed: {body['fault']}"
                if body["status"] == "ACTIVE":
                    activated[server_id], servers[server_id] = time.monotonic(), body
            return len(activated) == SERVERS

        stack.wait_for("both servers ACTIVE", all_active, 240)

        leases: dict[str, tuple[str, int, str]] = {}
        leased: dict[str, float] = {}

        def all_leased() -> bool:
            for server_id in server_ids:
                if server_id in leased:
                    continue
                answer = stack.api("GET", f"/api/v1/servers/{server_id}/console-output/?lines=200")
                assert answer.status_code == 200, answer.text
                match = IP_LINE.search(answer.json()["output"])
                if match:
                    leased[server_id] = time.monotonic()
                    leases[server_id] = (match.group(1), int(match.group(2)), match.group(3))
            return len(leased) == SERVERS

        stack.wait_for("a lease line on each console", all_leased, 180, interval=0.5)

        conn = libvirt.open("qemu:///system")
        try:
            domain_xml = {i: conn.lookupByName(contract.domain_name(i)).XMLDesc() for i in server_ids}
        finally:
            conn.close()
        taps: list[str] = []
        for server_id in server_ids:
            [entry] = servers[server_id]["addresses"][name]
            assert (entry["type"], entry["version"]) == ("fixed", 4), entry
            address, prefix, gateway = leases[server_id]
            assert address == entry["addr"], (leases[server_id], entry)
            assert ipaddress.IPv4Address(address) in CIDR
            assert (prefix, gateway) == (CIDR.prefixlen, subnet["gateway_ip"])
            [port] = stack.api("GET", f"/api/v1/ports/?device_id={server_id}").json()
            assert port["mac_address"] == entry["mac"]
            assert (port["binding_host"], port["status"]) == (stack.host, "ACTIVE"), port
            assert f"<mac address='{entry['mac']}'/>" in domain_xml[server_id]
            taps.append(contract.tap_name(port["id"]))
        assert len({lease[0] for lease in leases.values()}) == SERVERS

        # The project's default group admits ingress only from its own members, and the DHCP port is
        # none (Neutron's): an ICMP rule for the subnet lets the DHCP namespace ping the guests.
        project = servers[server_ids[0]]["project"]
        [default] = [g for g in stack.api("GET", "/api/v1/security-groups/?name=default").json()
                     if g["project"] == project]
        rule = stack.api("POST", "/api/v1/security-group-rules/", json={
            "security_group": default["id"], "direction": "ingress", "protocol": "icmp",
            "remote_ip_prefix": str(CIDR)})
        assert rule.status_code == 201, rule.text
        rule_ids.append(rule.json()["id"])
        netns = namespace_name(network_id)
        for server_id in server_ids:
            ping = _ping(netns, leases[server_id][0], timeout=30)
            assert ping.returncode == 0, ping.stdout + ping.stderr

        print()
        print(_report("POST -> ACTIVE", [activated[i] - posted[i] for i in server_ids]))
        print(_report("ACTIVE -> lease line on the console", [leased[i] - activated[i] for i in server_ids]))
        print(_report("POST -> lease line on the console", [leased[i] - posted[i] for i in server_ids]))
        print(_report("image ready -> port plugged (conductor's event times)",
                      [_plug_seconds(stack, i) for i in server_ids]))

        for server_id in server_ids:
            deleted = stack.api("DELETE", f"/api/v1/servers/{server_id}/")
            assert deleted.status_code == 202, deleted.text
        for server_id in server_ids:
            stack.wait_for(f"server {server_id} gone", lambda s=server_id: stack.api(
                "GET", f"/api/v1/servers/{s}/").status_code == 404, 90)
        server_ids.clear()
        gone = stack.api("DELETE", f"/api/v1/networks/{network_id}/")
        assert gone.status_code == 204, gone.text
        assert stack.api("GET", f"/api/v1/networks/{network_id}/").status_code == 404
        left: list[str] = []

        def nothing_left() -> bool:
            left[:] = _leftovers(network_id, vni, taps)
            return not left

        stack.wait_for(f"nothing of network {network_id} left on the host", nothing_left, 30)
        assert not (stack.instances_path / STATE_DIRECTORY / network_id).exists()
    finally:
        for rule_id in rule_ids:
            stack.api("DELETE", f"/api/v1/security-group-rules/{rule_id}/")
        for server_id in server_ids:
            stack.api("DELETE", f"/api/v1/servers/{server_id}/")
        if server_ids:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(
                    stack.api("GET", f"/api/v1/servers/{s}/").status_code != 404 for s in server_ids):
                time.sleep(1)
        stack.api("DELETE", f"/api/v1/networks/{network_id}/")
        _scrub(network_id, vni)


def _plug_seconds(stack: Stack, server_id: str) -> float:
    """The port plug as the conductor recorded the host's reports: from the image prepared
    (``compute_prep_image`` finished) to the bridges ready (``compute_plug_vifs``); the worker reports
    the plug right after it, before the domain is defined. Includes a report's trip, not the plug's
    own start (nothing reports that)."""
    actions = stack.api("GET", f"/api/v1/servers/{server_id}/actions/").json()
    [create] = [a for a in actions if a["action"] == "create"]
    events = {e["event"]: e for e in create["events"]}
    start = events.get("compute_plug_vifs", {}).get("start_time")
    finish = events.get("compute_prep_image", {}).get("finish_time")
    if not start or not finish:  # a figure, not a check: an event without its time is not measured
        return float("nan")
    return _seconds(start) - _seconds(finish)


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()

