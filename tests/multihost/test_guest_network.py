"""A real guest on a real bridge: the build family with the real LibvirtDriver on a harness host plugs a
flat network's bridge in the host's network namespace, libvirt puts the guest's tap on it, dnsmasq on the
same bridge leases the port's address, and the demo guest prints it on its console.

The compute manager runs in the host's mount and PID namespaces (its libvirtd, its instances directory),
as a worker on that host would, driven by a small script; its bridges are made in the host's network
namespace, where its libvirtd and QEMU are (``CommandRunner(netns)``). Nothing leaves the machine: the
bridge has no uplink (no ``COMPUTE_FLAT_INTERFACE``) and dnsmasq forwards no DNS.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.network.linuxbridge import CommandRunner, LinuxBridges
from testbed.hosts import NamespaceHost, NamespaceHosts
from tests.compute_support import TOKEN, image_api_url, new_spec, serve_images

from .conftest import running_hosts
from .guests import read, wait_for

pytestmark = pytest.mark.libvirt

SUBNET = ipaddress.IPv4Network("10.253.202.0/24")
GATEWAY, GUEST_IP = "10.253.202.1", "10.253.202.10"
MAC = "fa:16:3e:20:20:10"
IP_LINE = re.compile(r"cloudctl-guest: ip (\S+) gw (\S+)")

# The host's compute manager: the real LibvirtDriver and build family, bridges in the host's netns.
# Reads commands from stdin ("spawn <spec json>", "terminate <uuid>"), answers each with the reports.
DRIVER_SCRIPT = """
import json, logging, sys
from compute_workers.config import ComputeConfig
from compute_workers.manager import ComputeManager
from compute_workers.network.linuxbridge import CommandRunner, LinuxBridges
from compute_workers.operations import Build
from compute_workers.reporter import ListReporter
from compute_workers.virt.libvirt.driver import LibvirtDriver

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
netns, instances, token, api_url = sys.argv[1:5]
config = ComputeConfig.from_env({"COMPUTE_HOST": "host-a", "INSTANCES_PATH": instances,
                                 "CLOUDCTL_SERVICE_TOKEN": token, "CLOUDCTL_API_URL": api_url,
                                 "COMPUTE_VIRT_TYPE": "qemu"}, environ={})
reporter = ListReporter()
manager = ComputeManager(config, LibvirtDriver("qemu:///system", config.instances_path, "qemu"), reporter,
                         bridges=LinuxBridges(CommandRunner(netns)))
manager.init_host()
build = manager.family(Build)
for line in sys.stdin:
    verb, _, argument = line.strip().partition(" ")
    reporter.reports.clear()
    if verb == "spawn":
        build.spawn(json.loads(argument))
    elif verb == "terminate":
        build.terminate(argument)
    print(json.dumps(reporter.reports, default=str), flush=True)
"""


@pytest.fixture(scope="module")
def one_host() -> Iterator[NamespaceHosts]:
    with running_hosts(1) as hosts:
        yield hosts


class HostManager:
    def __init__(self, host: NamespaceHost) -> None:
        self.process = subprocess.Popen(
            host.command(sys.executable, "-c", DRIVER_SCRIPT,
                         host.netns, str(host.instances_path), TOKEN, image_api_url()),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def call(self, verb: str, argument: str) -> list[tuple[str, dict[str, Any]]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{verb} {argument}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            assert self.process.stderr is not None
            raise AssertionError(f"the host's manager died:\n{self.process.stderr.read()[-4000:]}")
        return [(name, kwargs) for name, kwargs in json.loads(line)]

    def close(self) -> str:
        assert self.process.stdin is not None and self.process.stderr is not None
        self.process.stdin.close()
        self.process.wait(30)
        return self.process.stderr.read()


def in_netns(netns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True,
                          timeout=timeout)


def test_guest_gets_its_lease_on_a_plugged_bridge(one_host: NamespaceHosts, tiny_image_path: Path,
                                                  tmp_path: Path) -> None:
    host = one_host.hosts[0]
    network_id, port_id = str(uuid.uuid4()), str(uuid.uuid4())
    network: contract.NetworkSpec = {
        "port_id": port_id, "network_id": network_id, "mac_address": MAC,
        "fixed_ips": [{"ip_address": GUEST_IP, "subnet_id": str(uuid.uuid4()), "cidr": str(SUBNET),
                       "gateway_ip": GATEWAY}],
        "mtu": 1500, "provider_type": "flat", "segmentation_id": None,
        "bridge": contract.bridge_name(network_id), "tap": contract.tap_name(port_id)}
    bridge = network["bridge"]
    # The DHCP server's side (the network node's job, later): the same bridge, made the same way (the
    # spawn then finds it), holding the server's address, dnsmasq answering only the port's MAC.
    LinuxBridges(CommandRunner(host.netns)).ensure_bridge(network)
    dnsmasq = None
    manager = None
    try:
        assert in_netns(host.netns, "ip", "addr", "add", f"{GATEWAY}/{SUBNET.prefixlen}", "dev",
                        bridge).returncode == 0
        hosts_file = tmp_path / "dhcp-hosts"
        hosts_file.write_text(f"{MAC},{GUEST_IP}\n")
        log = tmp_path / "dnsmasq.log"
        dnsmasq = subprocess.Popen(["ip", "netns", "exec", host.netns, "dnsmasq", "--keep-in-foreground",
                                    "--conf-file=/dev/null", "--user=root", "--no-resolv", "--no-hosts",
                                    f"--interface={bridge}", "--bind-interfaces", "--except-interface=lo",
                                    f"--dhcp-range={SUBNET.network_address},static,{SUBNET.netmask},1h",
                                    f"--dhcp-hostsfile={hosts_file}",
                                    f"--dhcp-leasefile={tmp_path / 'leases'}", "--log-dhcp",
                                    f"--log-facility={log}", f"--dhcp-option=option:router,{GATEWAY}"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        manager = HostManager(host)
        with serve_images(TOKEN) as images:
            spec = new_spec(host="host-a", name="guest with a NIC", networks=[network],
                            image=images.add("tiny", tiny_image_path.read_bytes()))
            instance_uuid = spec["instance_uuid"]
            started = time.monotonic()
            reports = manager.call("spawn", json.dumps(spec))
            spawned = time.monotonic() - started
        updates = [kwargs for name, kwargs in reports if name == contract.CONDUCTOR_INSTANCE_UPDATE]
        assert updates and updates[-1]["values"].get("vm_state") == "active", reports
        plug = next(u["event"] for u in updates if u["event"] and u["event"]["name"] == "compute_plug_vifs")
        assert plug["message"].endswith("they existed"), plug
        shown = in_netns(host.netns, "ip", "-d", "link", "show", "dev", network["tap"]).stdout
        assert f"master {bridge}" in shown, shown
        console = host.local_instances / instance_uuid / "console.log"
        wait_for(lambda: IP_LINE.search(read(console)) is not None, 120,
                 lambda: read(console)[-2000:] + (log.read_text() if log.exists() else ""))
        boot_to_lease = time.monotonic() - started
        match = IP_LINE.search(read(console))
        assert match is not None
        assert match.group(1) == f"{GUEST_IP}/{SUBNET.prefixlen}" and match.group(2) == GATEWAY
        print(f"\nspawn with a NIC: ACTIVE in {spawned:.2f} s (image download, plug, define, start); "
              f"spawn -> lease on the console {boot_to_lease:.1f} s")
        ping_tool = ("ping",) if shutil.which("ping") else ("busybox", "ping")
        ping = in_netns(host.netns, *ping_tool, "-c", "1", "-W", "2", GUEST_IP)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        dnsmasq.kill()
        dnsmasq.wait(10)
        dnsmasq = None
        reports = manager.call("terminate", instance_uuid)
        assert [name for name, _ in reports] == [contract.CONDUCTOR_INSTANCE_DESTROYED], reports
        links = in_netns(host.netns, "ip", "-o", "link", "show").stdout
        assert bridge not in links and network["tap"] not in links  # nothing left on the host
    finally:
        if dnsmasq is not None:
            dnsmasq.kill()
            dnsmasq.wait(10)
        if manager is not None:
            print(manager.close()[-3000:])
        in_netns(host.netns, "ip", "link", "del", "dev", bridge)
