"""End to end through a router: security groups and a floating IP, seen from the outside world.

An admin makes an external flat network (its uplink the stack's ``outside_world``: a namespace of the
test's own holding the gateway, 203.0.113.1) and a project network (vxlan, DHCP), a router joining them,
and boots a server on the project network. A floating IP associated to it shows in its ``addresses``;
from the outside namespace: no ping reply while the project's ``default`` group allows no ingress from
outside, replies once an ICMP rule is added, none again within about a second of its deletion (the
connection's conntrack entry is flushed); a tcp/80 rule lets the guest's busybox httpd page through;
disassociated, the address answers nothing; re-associated, it answers again. Deleting everything leaves
nothing on the host: no tap, bridge, vxlan device, ``qrouter-``/``qdhcp-`` namespace or iptables chain of
theirs.

Anti-spoofing is not tested here: it needs a guest that sends from another address, and the demo image
has no login (the worker's namespace tests of compute_workers.network.firewall cover it).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.network.dhcp import namespace_name
from compute_workers.network.linuxbridge import vxlan_name
from compute_workers.network.router import NAMESPACE_PREFIX
from testbed.outside import OutsideWorld
from testbed.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

LOG = logging.getLogger(__name__)
PROJECT_CIDR = ipaddress.IPv4Network("10.253.220.0/24")
IP_LINE = re.compile(r"cloudctl-guest: ip (\S+)/(\d+) gw (\S+)")
REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ")
PAGE = "cloudctl-guest\n"  # tools/build-tiny-image.sh: /var/www/index.html, served by `httpd -p 80`
QUIET = 3.0  # seconds without a reply that count as "no reply" (the pinger sends 10 a second)


@pytest.fixture(scope="module")
def outside(outside_world: OutsideWorld | None) -> OutsideWorld:
    if outside_world is None:
        pytest.skip("no outside world: this machine cannot make namespaces, bridges and veths")
    return outside_world


class Pinger:
    """``ping -D -i 0.1`` from the outside namespace for the whole test: the times (``time.time()``,
    ping's own ``-D`` stamps) of every reply."""

    def __init__(self, netns: str, address: str) -> None:
        self.replies: list[float] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", netns, "ping", "-D", "-n", "-i", "0.1", "-W", "1", address],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = REPLY.match(line)
            if match:
                with self._lock:
                    self.replies.append(float(match.group(1)))

    def since(self, moment: float) -> list[float]:
        with self._lock:
            return [t for t in self.replies if t >= moment]

    def first_after(self, moment: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = self.since(moment)
            if after:
                return after[0] - moment
            time.sleep(0.05)
        raise AssertionError(f"no ping reply within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)


def _ok(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, f"{answer.request.method} {answer.request.url}: {answer.text}"
    return answer.json() if answer.content else {}


def _quiet(pinger: Pinger, what: str, seconds: float = QUIET) -> None:
    start = time.time()
    time.sleep(seconds)
    replies = pinger.since(start)
    assert not replies, f"{what}: {len(replies)} ping replies in {seconds} s"


def _curl(netns: str, address: str, timeout: float = 3) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "--max-time", str(timeout),
                           f"http://{address}/"], capture_output=True, text=True, timeout=timeout + 10)


def _links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout


def _namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def _leftovers(links: list[str], namespaces: list[str], prefixes: list[str]) -> list[str]:
    text = _links()
    left = [f"link {name}" for name in links if re.search(rf":\s{re.escape(name)}[@:]", text)]
    left += [f"namespace {name}" for name in namespaces if name in _namespaces()]
    saved = "\n".join(subprocess.run([tool], capture_output=True, text=True).stdout
                      for tool in ("iptables-save", "ip6tables-save", "ebtables-save") if shutil.which(tool))
    left += [f"rule {line}" for line in saved.splitlines() if any(p in line for p in prefixes)]
    return left


def _neighbour_known(netns: str, address: str) -> bool:
    """Whether the outside namespace resolved ``address`` (the router's ``qg-`` answers ARP for it)."""
    subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "1", address],
                   capture_output=True)
    shown = subprocess.run(["ip", "-n", netns, "neigh", "show", address], capture_output=True,
                           text=True).stdout
    return "lladdr" in shown


def _report(what: str, seconds: float) -> str:
    line = f"{what}: {seconds:.2f} s"
    LOG.info("e2e floating IP timing: %s", line)
    return line


class Cleanup:
    """What the test made, deleted in reverse order whatever happens (a failure must leave nothing)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.steps: list[tuple[str, Callable[[], object]]] = []

    def add(self, what: str, step: Callable[[], object]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        for what, step in reversed(self.steps):
            try:
                step()
            except Exception:  # best effort: report and go on
                LOG.exception("cleanup: %s", what)
        self.steps.clear()


@pytest.fixture
def cleanup(stack: Stack) -> Iterator[Cleanup]:
    done = Cleanup(stack)
    try:
        yield done
    finally:
        done.run()


def _wait_gone(stack: Stack, path: str, timeout: float) -> None:
    stack.wait_for(f"{path} gone", lambda: stack.api("GET", path).status_code == 404, timeout)


def test_security_groups_and_a_floating_ip_from_the_outside(stack: Stack, outside: OutsideWorld,
                                                              cleanup: Cleanup) -> None:
    name = f"e2e-fip-{secrets.token_hex(3)}"
    gateway = outside.gateway
    external_cidr = gateway.network

    # --- the admin's external network, the project's network, a router between them --------------
    external = _ok(stack.api("POST", "/api/v1/networks/", json={
        "name": f"{name}-ext", "provider_type": "flat", "external": True}), 201)
    cleanup.add("external network", lambda: stack.api("DELETE", f"/api/v1/networks/{external['id']}/"))
    _ok(stack.api("POST", "/api/v1/subnets/", json={
        "network": external["id"], "cidr": str(external_cidr), "gateway_ip": str(gateway.ip),
        "enable_dhcp": False,
        "allocation_pools": [{"start": str(external_cidr[10]), "end": str(external_cidr[250])}]}), 201)
    private = _ok(stack.api("POST", "/api/v1/networks/", json={
        "name": f"{name}-net", "provider_type": "vxlan"}), 201)
    cleanup.add("project network", lambda: stack.api("DELETE", f"/api/v1/networks/{private['id']}/"))
    subnet = _ok(stack.api("POST", "/api/v1/subnets/", json={
        "network": private["id"], "cidr": str(PROJECT_CIDR)}), 201)
    router = _ok(stack.api("POST", "/api/v1/routers/", json={
        "name": f"{name}-router", "external_gateway": external["id"]}), 201)
    cleanup.add("router", lambda: stack.api("DELETE", f"/api/v1/routers/{router['id']}/"))
    router = _ok(stack.api("POST", f"/api/v1/routers/{router['id']}/add-interface/",
                           json={"subnet": subnet["id"]}), 200)
    cleanup.add("router interface", lambda: stack.api(
        "POST", f"/api/v1/routers/{router['id']}/remove-interface/", json={"subnet": subnet["id"]}))
    [router_gateway] = router["external_gateway"]["external_fixed_ips"]
    router_ports = {p["id"] for p in stack.api("GET", f"/api/v1/ports/?device_id={router['id']}").json()}
    router_ports.add(router["interfaces"][0]["port"])

    # The router's namespace answers from its gateway address: the outside world reaches it.
    stack.wait_for("the router's gateway answering the outside", lambda: _neighbour_known(
        outside.netns, router_gateway["ip_address"]), 60, interval=0.5)

    # --- a server on the project network ---------------------------------------------------------
    server = _ok(stack.api("POST", "/api/v1/servers/", json={
        "name": f"{name}-vm", "flavor": "m1.nano", "image": "tiny", "host": stack.host,
        "networks": [{"network": private["id"]}]}), 202)
    server_path = f"/api/v1/servers/{server['id']}/"

    def delete_server() -> None:
        stack.api("DELETE", server_path)
        _wait_gone(stack, server_path, 90)

    cleanup.add("server", delete_server)

    def active() -> bool:
        body = stack.api("GET", server_path).json()
        assert body["status"] != "ERROR", f"build failed: {body['fault']}"
        return body["status"] == "ACTIVE"

    stack.wait_for("server ACTIVE", active, 240)

    def leased() -> str:
        output = _ok(stack.api("GET", f"{server_path}console-output/?lines=200"), 200)["output"]
        match = IP_LINE.search(output)
        return match.group(1) if match else ""

    fixed_ip = stack.wait_for("a lease line on the console", leased, 180, interval=0.5)
    [port] = stack.api("GET", f"/api/v1/ports/?device_id={server['id']}").json()
    assert [f["ip_address"] for f in port["fixed_ips"]] == [fixed_ip]
    groups = stack.api("GET", "/api/v1/security-groups/?name=default").json()
    [default] = [g for g in groups if g["name"] == "default" and g["project"] == server["project"]]
    assert port["security_groups"] == [default["id"]]

    # --- a floating IP, allocated, pinged from outside from then on, then associated ---------------
    floating = _ok(stack.api("POST", "/api/v1/floating-ips/", json={"network": external["id"]}), 201)
    fip_path = f"/api/v1/floating-ips/{floating['id']}/"
    cleanup.add("floating IP", lambda: stack.api("DELETE", fip_path))
    address = floating["floating_ip_address"]
    assert ipaddress.IPv4Address(address) in external_cidr
    assert (floating["port"], floating["status"]) == (None, "DOWN"), floating
    # Pinged while it gets associated, as a user watching it would: the router must never answer for it
    # itself (a reply before its DNAT would pin the ping's connection to the router namespace).
    pinger = Pinger(outside.netns, address)
    cleanup.add("pinger", pinger.stop)
    time.sleep(0.5)
    associated_at = time.time()
    floating = _ok(stack.api("POST", f"{fip_path}associate/", json={"server": server["id"]}), 200)
    assert (floating["fixed_ip_address"], floating["router"], floating["status"]) == (
        fixed_ip, router["id"], "ACTIVE"), floating
    addresses = stack.api("GET", server_path).json()["addresses"][private["name"]]
    assert [(a["addr"], a["type"]) for a in addresses] == [(fixed_ip, "fixed"), (address, "floating")]

    # The router holds the address (answers ARP for it; the outside retries ARP each second) ...
    stack.wait_for(f"the router answering ARP for {address}", lambda: _neighbour_known(
        outside.netns, address), 60, interval=0.5)
    arp_seconds = time.time() - associated_at
    # ... and the default group lets no ICMP in from outside.
    _quiet(pinger, "the default group, no rule for the outside")

    # --- an ICMP rule: replies; deleted: none within about a second --------------------------------
    rule_posted = time.time()
    icmp = _ok(stack.api("POST", "/api/v1/security-group-rules/", json={
        "security_group": default["id"], "direction": "ingress", "protocol": "icmp",
        "remote_ip_prefix": "0.0.0.0/0"}), 201)
    rule_seconds = pinger.first_after(rule_posted, 30)
    time.sleep(1)
    assert len(pinger.since(rule_posted + rule_seconds)) >= 5, "replies do not go on"

    rule_deleted = time.time()
    _ok(stack.api("DELETE", f"/api/v1/security-group-rules/{icmp['id']}/"), 204)
    # About a second to reach the host and flush the connection; then nothing more.
    time.sleep(2)
    stopped_by = pinger.since(rule_deleted)
    _quiet(pinger, "the ICMP rule deleted (the ping's conntrack entry should be gone)")
    last_reply = (stopped_by[-1] - rule_deleted) if stopped_by else 0.0

    # --- tcp/80: the guest's httpd page from outside -----------------------------------------------
    _ok(stack.api("POST", "/api/v1/security-group-rules/", json={
        "security_group": default["id"], "direction": "ingress", "protocol": "tcp",
        "port_range_min": 80, "port_range_max": 80, "remote_ip_prefix": "0.0.0.0/0"}), 201)
    page = stack.wait_for("the guest's page over http", lambda: (lambda c: c.returncode == 0 and c)(
        _curl(outside.netns, address)), 30, interval=0.5)
    assert page.stdout == PAGE, page.stdout
    _quiet(pinger, "a tcp/80 rule only", 1.0)

    # --- disassociated: nothing answers; re-associated: it answers again --------------------------
    _ok(stack.api("POST", "/api/v1/security-group-rules/", json={
        "security_group": default["id"], "direction": "ingress", "protocol": "icmp",
        "remote_ip_prefix": str(external_cidr)}), 201)
    pinger.first_after(time.time(), 30)
    disassociated = _ok(stack.api("POST", f"{fip_path}disassociate/"), 200)
    assert (disassociated["port"], disassociated["status"]) == (None, "DOWN"), disassociated
    addresses = stack.api("GET", server_path).json()["addresses"][private["name"]]
    assert [(a["addr"], a["type"]) for a in addresses] == [(fixed_ip, "fixed")]
    time.sleep(2)
    _quiet(pinger, "the floating IP disassociated")
    refused = _curl(outside.netns, address, timeout=2)
    assert refused.returncode != 0, refused.stdout

    reassociated_at = time.time()
    _ok(stack.api("POST", f"{fip_path}associate/", json={"server": server["id"]}), 200)
    association_seconds = pinger.first_after(reassociated_at, 30)
    page = _curl(outside.netns, address)
    assert (page.returncode, page.stdout) == (0, PAGE), page.stderr

    print()
    print(_report("FIP associate -> router answers ARP for it", arp_seconds))
    print(_report("ICMP rule POST -> first reply", rule_seconds))
    print(_report("ICMP rule DELETE -> last reply", last_reply))
    print(_report("FIP associate (rules in place) -> first reply", association_seconds))

    # --- everything deleted: nothing left on the host ---------------------------------------------
    pinger.stop()
    taps = [contract.tap_name(p) for p in [port["id"], *router_ports]]
    links = [*taps, contract.bridge_name(private["id"]), contract.bridge_name(external["id"]),
             vxlan_name(private["segmentation_id"])]
    namespaces = [f"{NAMESPACE_PREFIX}{router['id']}", namespace_name(private["id"])]
    prefixes = [port["id"][:contract.DEVICE_NAME_ID_CHARS]]
    assert any(_leftovers(links, namespaces, prefixes)), "the test's devices were never seen"
    cleanup.run()
    for path in (server_path, fip_path, f"/api/v1/routers/{router['id']}/",
                 f"/api/v1/networks/{private['id']}/", f"/api/v1/networks/{external['id']}/"):
        assert stack.api("GET", path).status_code == 404, path
    left: list[str] = []

    def nothing_left() -> bool:
        left[:] = _leftovers(links, namespaces, prefixes)
        return not left

    stack.wait_for("nothing of the test left on the host", nothing_left, 30)
    assert outside.interface in _links(), "the outside world's veth went with the external network"
    assert Path(f"/sys/class/net/{outside.interface}").exists()
