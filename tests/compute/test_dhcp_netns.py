"""The network node's DHCP server for real: the real CommandRunner in a namespace this test makes (the
"host": bridge and veth host end live there), the ``qdhcp-`` namespace beside it, real dnsmasq, and a
"guest" namespace on the bridge that asks for a lease with busybox udhcpc (root; skipped with the reason
where namespaces, bridges, veth pairs or dnsmasq are missing). Nothing is made in the root namespace but
the namespaces themselves, and nothing leaves the machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_workers.network.dhcp import DhcpServers, namespace_name, ns_end_name
from compute_workers.network.linuxbridge import CommandRunner, LinuxBridges
from testbed.hosts import delete_netns, fresh_namespaces, missing_netns_features

from .test_dhcp import dhcp_spec

PREFIX = "ccdhcpw-"  # namespaces: ccdhcpw-<pid>-<random>


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, veth pairs)"
    for tool, package in (("ip", "iproute2"), ("dnsmasq", "dnsmasq-base")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian package {package})"
    probe = f"{PREFIX}{os.getpid()}-probe"
    return missing_netns_features(probe, (
        (["ip", "-n", probe, "link", "add", "br0", "type", "bridge"], "Linux bridges"),
        (["ip", "-n", probe, "link", "add", "ve0", "type", "veth", "peer", "name", "ve1"], "veth pairs"),
    ))


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def sh(ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)


def ok(ns: str, *argv: str) -> str:
    result = sh(ns, *argv)
    assert result.returncode == 0, f"{' '.join(argv)} in {ns}: {result.stderr}"
    return result.stdout


@pytest.fixture
def host_ns() -> Iterator[tuple[str, str]]:
    """The test's "host" namespace and its "guest" namespace."""
    with fresh_namespaces(PREFIX, 2) as names:
        yield names[0], names[1]


def _kill_dnsmasq(directory: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        pid = int((directory / "pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"dnsmasq" in cmdline and str(directory).encode() in cmdline:
            os.kill(pid, signal.SIGKILL)


def test_a_guest_gets_its_lease_and_delete_removes_everything(host_ns: tuple[str, str],
                                                              tmp_path: Path) -> None:
    host, guest = host_ns
    runner = CommandRunner(netns=host)
    servers = DhcpServers(runner, LinuxBridges(runner), tmp_path / "_dhcp", namespaces=CommandRunner())
    network_id = str(uuid.uuid4())
    spec = dhcp_spec(network_id=network_id, provider="flat", vni=None, cidr="10.253.202.0/24",
                     dhcp_ip="10.253.202.2", hosts=[("fa:16:3e:12:34:56", "10.253.202.10", "vm1")])
    qdhcp, directory = namespace_name(network_id), tmp_path / "_dhcp" / network_id
    try:
        done = servers.sync(spec)
        assert "dnsmasq started" in done
        assert servers.sync(spec) == []  # converged: nothing to do
        inside = json.loads(ok(qdhcp, "ip", "-j", "addr", "show", "dev", ns_end_name(network_id)))[0]
        assert inside["address"] == spec["dhcp_mac"]
        assert {(a["local"], a["prefixlen"]) for a in inside["addr_info"] if a["family"] == "inet"} == \
            {("10.253.202.2", 24)}
        assert (directory / "hosts").read_text() == "fa:16:3e:12:34:56,10.253.202.10,vm1\n"
        pid = int((directory / "pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert f"--interface={ns_end_name(network_id)}" in cmdline
        assert "--dhcp-range=set:subnet0,10.253.202.0,static,255.255.255.0,600s" in cmdline
        identify = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
        assert identify.stdout.split() == [qdhcp]

        # The guest: a veth on the host's bridge with the MAC of a host entry.
        ok(host, "ip", "link", "add", "gst0", "type", "veth", "peer", "name", "eth0", "netns", guest)
        ok(host, "ip", "link", "set", "gst0", "master", spec["bridge"], "up")
        ok(guest, "ip", "link", "set", "eth0", "address", "fa:16:3e:12:34:56", "up")
        if shutil.which("busybox"):
            lease = sh(guest, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "5", "-T", "2", "-s",
                       "/bin/true", timeout=60)
            said = lease.stdout + lease.stderr
            assert lease.returncode == 0 and "lease of 10.253.202.10 obtained" in said, \
                f"{said}\n{_log(directory)}"

        # A hosts-only change: SIGHUP, same process. A dead dnsmasq: started again.
        spec["hosts"].append({"mac_address": "fa:16:3e:00:00:99", "ip_address": "10.253.202.11",
                              "hostname": "vm2"})
        assert servers.sync(spec) == ["hosts file", "dnsmasq reloaded"]
        assert int((directory / "pid").read_text()) == pid
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        assert servers.sync(spec) == ["dnsmasq started"]
        assert int((directory / "pid").read_text()) != pid

        ok(host, "ip", "link", "del", "gst0")
        deleted = {**spec, "deleted": True}
        assert servers.sync(deleted)[-1] == f"bridge {spec['bridge']}"
        assert qdhcp not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not directory.exists()
        assert json.loads(ok(host, "ip", "-j", "link", "show")) == [
            link for link in json.loads(ok(host, "ip", "-j", "link", "show")) if link["ifname"] == "lo"]
        assert servers.sync(deleted) == []
    finally:
        _kill_dnsmasq(directory)
        delete_netns(qdhcp)


def _log(directory: Path) -> str:
    with contextlib.suppress(OSError):
        return (directory / "dnsmasq.log").read_text()
    return ""

