"""End to end, every compute and network task delivered twice (``COMPUTE_TEST_DUPLICATE_DELIVERY=1``, set
for the whole stack in tests/e2e/conftest.py, so every other e2e test runs with it too): a server on a
vxlan network with DHCP, booted, rebooted, paused and unpaused, stopped, snapshotted and deleted, on a
real guest (two boots: the fewest that show a reboot done twice). The worker's log proves each task ran
twice; the second runs changed nothing: one domain, one allocation, each action's events once, the
guest booted once per boot asked for, the second reports dropped by the conductor as stale, and the
host's network (dnsmasq, bridge ports, firewall rules) as one delivery leaves it."""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from collections import Counter
from typing import Any

import libvirt
import pytest

from compute_workers import contract
from compute_workers.network.dhcp import namespace_name
from testbed.dhcpnet import missing_capabilities
from testbed.stack import Stack

from .test_lifecycle import act, boot_count, settle, wait_booted
from .test_networking import _dnsmasq_of, _scrub
from .test_snapshots import wait_image_active

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

CIDR = "10.253.211.0/24"


class LogSince:
    """The stack's process log (honcho's: every process of the Procfile) written after it was made."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.offset = stack.log_path.stat().st_size

    def text(self) -> str:
        with open(self.stack.log_path, "rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))


def our_domains(conn: libvirt.virConnect, stack: Stack) -> list[str]:
    """Names of the domains (running or not) whose files live in this stack's INSTANCES_PATH."""
    return sorted(domain.name() for domain in conn.listAllDomains()
                  if str(stack.instances_path) in domain.XMLDesc())


def iptables_lines(*words: str) -> list[str]:
    """The rules of iptables and ip6tables that name all of ``words``."""
    lines = []
    for tool in ("iptables-save", "ip6tables-save"):
        dump = subprocess.run([tool, "-t", "filter"], capture_output=True, text=True, check=True).stdout
        lines += [f"{tool}: {line}" for line in dump.splitlines() if all(word in line for word in words)]
    return lines


def bridge_ports(bridge: str) -> list[str]:
    listing = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True,
                             check=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in listing.splitlines() if line.strip()]


def network_state(network_id: str, tap: str) -> dict[str, Any]:
    """What the host's networking holds for the network and the server's tap, to compare."""
    return {"dnsmasq": len(_dnsmasq_of(network_id)),
            "bridge_ports": sorted(bridge_ports(contract.bridge_name(network_id))),
            "tap_rules": Counter(iptables_lines(tap))}


def test_every_task_delivered_twice_changes_nothing_the_second_time(stack: Stack,
                                                                    conn: libvirt.virConnect) -> None:
    assert stack.env.get("COMPUTE_TEST_DUPLICATE_DELIVERY") == "1"
    log = LogSince(stack)
    with_network = not missing_capabilities()
    network_id, vni, server_id = None, None, None
    try:
        body: dict[str, Any] = {"name": f"dup-{secrets.token_hex(3)}", "flavor": "m1.nano", "image": "tiny",
                                "host": stack.host}
        if with_network:
            network = stack.api("POST", "/api/v1/networks/", json={"name": body["name"],
                                                                    "provider_type": "vxlan"}).json()
            network_id, vni = network["id"], network["segmentation_id"]
            subnet = stack.api("POST", "/api/v1/subnets/", json={"network": network_id, "cidr": CIDR})
            assert subnet.status_code == 201, subnet.text
            body["networks"] = [{"network": network_id}]
        created = stack.api("POST", "/api/v1/servers/", json=body)
        assert created.status_code == 202, created.text
        server_id = created.json()["id"]
        settle(stack, server_id, "ACTIVE", timeout=180)
        wait_booted(stack, server_id, 1)
        assert our_domains(conn, stack).count(contract.domain_name(server_id)) == 1

        before: dict[str, Any] = {}
        tap = ""
        if network_id:
            [port] = stack.api("GET", f"/api/v1/ports/?device_id={server_id}").json()
            tap = contract.tap_name(port["id"])
            before = network_state(network_id, tap)
            assert before["dnsmasq"] == 1 and tap in before["bridge_ports"], before
            assert before["tap_rules"] and max(before["tap_rules"].values()) == 1, before

        act(stack, server_id, "reboot", type="HARD")
        settle(stack, server_id, "ACTIVE")
        wait_booted(stack, server_id, 2)
        act(stack, server_id, "pause")
        settle(stack, server_id, "PAUSED")
        act(stack, server_id, "unpause")
        settle(stack, server_id, "ACTIVE")
        time.sleep(2)  # time for a second reboot to show, had one run
        if network_id:  # the guest running (its tap on the bridge), after every sync ran twice
            assert network_state(network_id, tap) == before
            assert namespace_name(network_id) in subprocess.run(
                ["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        act(stack, server_id, "stop")
        settle(stack, server_id, "SHUTOFF")
        # Booted twice, as asked: the second spawn and the second reboot did nothing.
        assert boot_count(stack, server_id) == 2
        snapshot = act(stack, server_id, "snapshot", name=f"{body['name']}-snap")
        settle(stack, server_id, "SHUTOFF", timeout=180)
        wait_image_active(stack, snapshot["image_id"])

        # One allocation; one domain.
        [host] = [h for h in stack.api("GET", "/api/v1/hosts/").json() if h["name"] == stack.host]
        assert (host["vcpus_used"], host["memory_mb_used"], host["instance_count"]) == (1, 128, 1), host
        assert our_domains(conn, stack) == [contract.domain_name(server_id)]

        # Each action's events once.
        actions = stack.api("GET", f"/api/v1/servers/{server_id}/actions/").json()
        assert [a["action"] for a in reversed(actions)] == [
            "create", "reboot", "pause", "unpause", "stop", "snapshot"], actions
        for record in actions:
            events = Counter(event["event"] for event in record["events"])
            assert record["result"] == "Success", record
            assert all(count == 1 for count in events.values()), (record["action"], events)


        deleted = stack.api("DELETE", f"/api/v1/servers/{server_id}/")
        assert deleted.status_code == 202, deleted.text
        stack.wait_for("server gone", lambda: stack.api(
            "GET", f"/api/v1/servers/{server_id}/").status_code == 404, 90)
        gone_id, server_id = server_id, None
        assert our_domains(conn, stack) == []

        # The proof that every task ran twice, and what the second runs did.
        text = log.text()
        delivered = Counter(re.findall(r"duplicate delivery: running (compute\.[a-z_]+)\[", text))
        for task in (contract.COMPUTE_SPAWN, contract.COMPUTE_REBOOT, contract.COMPUTE_POWER_OFF,
                     contract.COMPUTE_PAUSE, contract.COMPUTE_UNPAUSE,
                     contract.COMPUTE_SNAPSHOT, contract.COMPUTE_TERMINATE,
                     contract.COMPUTE_CONSOLE_OUTPUT,
                     *((contract.COMPUTE_NETWORK_HOST_SYNC, contract.COMPUTE_NETWORK_DHCP_SYNC)
                       if with_network else ())):
            assert delivered[task] >= 1, (task, delivered)
        assert "duplicate delivery: the second run of" not in text
        # The lifecycle actions and the snapshot found their action journaled: nothing done again.
        assert log.count(rf"redelivered task ignored \([a-z_]+ of {gone_id}\)") == 5
        # The second spawn found the domain and reported it again: dropped by the conductor as stale,
        # as was the second terminate's report.
        assert log.count(rf"dropped stale report from {stack.host} for {gone_id}") >= 1
        assert log.count(rf"instance_destroyed for {gone_id} from {stack.host}: not deleting there") == 1
    finally:
        if server_id:
            stack.api("DELETE", f"/api/v1/servers/{server_id}/")
            stack.wait_for("server gone", lambda: stack.api(
                "GET", f"/api/v1/servers/{server_id}/").status_code == 404, 90)
        if network_id:
            stack.api("DELETE", f"/api/v1/networks/{network_id}/")
            assert vni is not None
            _scrub(network_id, vni)
