"""A network node's DHCP servers: one dnsmasq per network, in a namespace of its own (the job of
Neutron's DHCP agent), converged by ``compute.network_dhcp_sync`` to a :class:`DhcpNetworkSpec`.

For network ``N`` (its first 11 characters ``n11``):

- the network's bridge ``brq<n11>`` (:meth:`LinuxBridges.ensure_bridge`, as for a guest's port);
- namespace ``qdhcp-<n11>`` with ``lo`` up;
- a veth pair: ``dhc<n11>`` on the host, enslaved to the bridge and up; ``ns-<n11>`` in the namespace
  with MAC ``dhcp_mac``, the DHCP port's address (prefix from its subnet's CIDR), the network's MTU, up.
  Both names are at most 15 characters (IFNAMSIZ); ``dhc`` is not ``tap`` so that a guest's tap
  (``tap<port id>``) can never collide with it;
- dnsmasq in the namespace (``--no-resolv --port=0``: it serves DHCP only, no DNS), one ``static``
  ``--dhcp-range`` per IPv4 subnet (tagged, with that subnet's router and DNS servers), answering only
  the MACs of its hosts file ``<mac>,<ip>,<hostname>``. Its state lives in
  ``INSTANCES_PATH/_dhcp/<network id>/``: ``hosts``, ``leases``, ``pid``, ``args`` (the command line
  it runs with), ``dnsmasq.log``. It runs as root (``--user=root``, as the test bed's): it rereads the
  hosts file of that root-only directory on SIGHUP.

Converging: what exists is read and only what differs is done. Only the hosts changed: the hosts file is
rewritten and dnsmasq gets SIGHUP (it rereads it). A lease whose MAC and address are no longer a host
(a deleted port's) is dropped from the leases file, dnsmasq stopped first and started after: else it
keeps the address for the old MAC and refuses it to the next port given it. Its command line changed
(subnets, port, lease time): it is restarted. Not running (a stale pid file, a crash, a reboot of the
node): it is started. ``deleted`` (or nothing to serve: no DHCP port or no IPv4 subnet): dnsmasq is
killed, the namespace deleted (the veth goes with it), the state directory removed and the bridge
removed if nothing else is on it. IPv6 subnets are skipped (logged): only IPv4 DHCP is served.

A driver without host devices (fake, libvirt's test driver: ``plugs_host_bridges`` false) gets
:class:`RecordedDhcp`, which records the desired state and makes nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from compute_workers import contract
from compute_workers.exception import ComputeError
from compute_workers.locks import KeyedLock
from compute_workers.network.linuxbridge import CommandError, HostBridges, Runner
from compute_workers.network.netns import Namespaces, Veth

LOG = logging.getLogger(__name__)

NAMESPACE_PREFIX = "qdhcp-"
HOST_END_PREFIX = "dhc"
NS_END_PREFIX = "ns-"
STATE_DIRECTORY = "_dhcp"
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")
STOP_TIMEOUT = 5.0
START_TIMEOUT = 10.0


class DhcpError(ComputeError):
    """The DHCP server of a network could not be converged; the message says what failed."""


def namespace_name(network_id: str) -> str:
    return f"{NAMESPACE_PREFIX}{network_id[:contract.DEVICE_NAME_ID_CHARS]}"


def host_end_name(network_id: str) -> str:
    return f"{HOST_END_PREFIX}{network_id[:contract.DEVICE_NAME_ID_CHARS]}"


def ns_end_name(network_id: str) -> str:
    return f"{NS_END_PREFIX}{network_id[:contract.DEVICE_NAME_ID_CHARS]}"


def checked_spec(network: Any) -> contract.DhcpNetworkSpec:
    """``network`` if it is a well-formed :class:`DhcpNetworkSpec` (what this module relies on); raises
    :class:`DhcpError` naming what is wrong. Everything that reaches a command line or a file is checked."""
    try:
        contract.check_bridge(network, "network")  # all a deletion needs
        if not isinstance(network.get("deleted"), bool):
            raise contract.SpecError("network.deleted must be a boolean")
        if network["deleted"]:
            return network  # type: ignore[no-any-return]
        contract.check_bridge_network(network, "network")
        contract.check_mac(network["dhcp_mac"], "network.dhcp_mac")
        lease = network["lease_seconds"]
        if not isinstance(lease, int) or isinstance(lease, bool) or lease < 120:
            raise contract.SpecError(f"network.lease_seconds must be an integer of at least 120, "
                                     f"not {lease!r}")
        port = network["dhcp_port"]
        if port is not None:
            ipaddress.ip_interface(f"{port['ip_address']}/{ipaddress.ip_network(port['cidr']).prefixlen}")
        for subnet in network["subnets"]:
            ipaddress.ip_network(subnet["cidr"])
            if subnet["gateway_ip"] is not None:
                ipaddress.ip_address(subnet["gateway_ip"])
            for server in subnet["dns_nameservers"]:
                ipaddress.ip_address(server)
        for i, host in enumerate(network["hosts"]):
            contract.check_mac(host["mac_address"], f"network.hosts[{i}].mac_address")
            ipaddress.ip_address(host["ip_address"])
            if not isinstance(host["hostname"], str):
                raise contract.SpecError(f"network.hosts[{i}].hostname must be a string, not "
                                         f"{host['hostname']!r}")
    except contract.SpecError as exc:
        raise DhcpError(str(exc)) from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise DhcpError(f"network {network['network_id']}: malformed DHCP network spec: "
                        f"{type(exc).__name__}: {exc}") from exc
    return network  # type: ignore[no-any-return]


def bridge_network(network: contract.DhcpNetworkSpec) -> contract.NetworkSpec:
    """The :class:`NetworkSpec` whose bridge :class:`HostBridges` makes for the DHCP port."""
    return {"port_id": network["network_id"], "network_id": network["network_id"],
            "mac_address": network["dhcp_mac"],
            "fixed_ips": [network["dhcp_port"]] if network["dhcp_port"] else [], "mtu": network["mtu"],
            "provider_type": network["provider_type"], "segmentation_id": network["segmentation_id"],
            "bridge": network["bridge"], "tap": host_end_name(network["network_id"])}


def served_subnets(network: contract.DhcpNetworkSpec) -> list[contract.DhcpSubnet]:
    subnets = []
    for subnet in network["subnets"]:
        if ipaddress.ip_network(subnet["cidr"]).version != 4:
            LOG.warning("network %s: IPv6 subnet %s not served (IPv4 DHCP only)", network["network_id"],
                        subnet["cidr"])
            continue
        subnets.append(subnet)
    return subnets


def hosts_file(network: contract.DhcpNetworkSpec) -> str:
    """The dnsmasq hosts file: ``<mac>,<ip>[,<hostname>]`` a line, sorted (stable across syncs). Only
    IPv4 addresses are served; a host name that is not a valid DNS name is left out (logged): the host
    still gets its address."""
    lines = []
    for host in network["hosts"]:
        if ipaddress.ip_address(host["ip_address"]).version != 4:
            continue
        hostname = host["hostname"]
        if hostname and not _HOSTNAME.match(hostname):
            LOG.warning("network %s: host name %r of %s is no valid DNS name; left out",
                        network["network_id"], hostname, host["mac_address"])
            hostname = ""
        lines.append(",".join(filter(None, (host["mac_address"].lower(), host["ip_address"], hostname))))
    return "".join(f"{line}\n" for line in sorted(lines))


def stale_leases(leases: str, hosts: str) -> list[str]:
    """The lines of a dnsmasq leases file (``<expiry> <mac> <ip> <hostname> <client id>``) whose MAC and
    address are no pair of ``hosts`` (a hosts file): the lease of a deleted port. Kept, it holds the
    address for the old MAC until it expires (``NETWORK_DHCP_LEASE_SECONDS``), and the next port given
    that address gets "no address available" (Neutron releases such leases with ``dhcp_release``)."""
    pairs = {tuple(line.split(",")[:2]) for line in hosts.splitlines()}
    stale = []
    for line in leases.splitlines():
        fields = line.split()
        if len(fields) >= 3 and contract.MAC_ADDRESS.match(fields[1]) and \
                (fields[1].lower(), fields[2]) not in pairs:
            stale.append(line)
    return stale


def dnsmasq_argv(network: contract.DhcpNetworkSpec, directory: Path) -> list[str]:
    """The command line of the network's dnsmasq (run inside its namespace)."""
    argv = ["dnsmasq", "--conf-file=/dev/null", "--user=root", "--no-resolv", "--no-hosts", "--port=0",
            "--bind-interfaces", f"--interface={ns_end_name(network['network_id'])}",
            "--except-interface=lo", f"--pid-file={directory / 'pid'}",
            f"--dhcp-hostsfile={directory / 'hosts'}", f"--dhcp-leasefile={directory / 'leases'}",
            f"--log-facility={directory / 'dnsmasq.log'}"]
    for index, subnet in enumerate(served_subnets(network)):
        net = ipaddress.ip_network(subnet["cidr"])
        tag = f"subnet{index}"
        argv.append(f"--dhcp-range=set:{tag},{net.network_address},static,{net.netmask},"
                    f"{network['lease_seconds']}s")
        # An option without a value sends no router at all (a subnet without a gateway).
        argv.append(f"--dhcp-option=tag:{tag},option:router"
                    + (f",{subnet['gateway_ip']}" if subnet["gateway_ip"] else ""))
        if subnet["dns_nameservers"]:
            argv.append(f"--dhcp-option=tag:{tag},option:dns-server,{','.join(subnet['dns_nameservers'])}")
    return argv


class Processes(Protocol):
    """The host's processes, as this module needs them (a fake in the unit tests)."""

    def alive(self, pid: int, pid_file: Path) -> bool:
        """Whether ``pid`` is a dnsmasq started with ``--pid-file=<pid_file>``."""
        ...

    def signal(self, pid: int, signum: int) -> None:
        ...


class SystemProcesses:
    def alive(self, pid: int, pid_file: Path) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return bool(cmdline) and cmdline[0].endswith(b"dnsmasq") and \
            f"--pid-file={pid_file}".encode() in cmdline

    def signal(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


class DhcpServers:
    """The dnsmasq servers of this network node, one per network. ``state_root`` is
    ``INSTANCES_PATH/_dhcp``.

    Commands on the host's devices (the veth's host end) go through ``runner`` (the host's namespace,
    or a test's); those that name ``qdhcp-`` namespaces (``ip netns add/del/list/exec``, ``ip -n``)
    through ``namespaces`` (default: ``runner``). They differ only in a test whose "host" is itself a
    namespace: a namespace added from inside ``ip netns exec`` is mounted in that command's private mount
    namespace only, so the ``qdhcp-`` namespaces are made from the root one, as siblings of the test's."""

    def __init__(self, runner: Runner, bridges: HostBridges, state_root: Path,
                 processes: Processes | None = None, sleep: Callable[[float], None] = time.sleep,
                 namespaces: Runner | None = None) -> None:
        self.runner, self.bridges, self.state_root = runner, bridges, state_root
        self.ns_runner = namespaces or runner
        self.namespaces = Namespaces(runner, self.ns_runner)
        self.processes = processes or SystemProcesses()
        self.sleep = sleep
        self._locks = KeyedLock()

    def directory(self, network_id: str) -> Path:
        return self.state_root / network_id

    def sync(self, network: Any) -> list[str]:
        """Converge the network's DHCP server to ``network``; what was done (``[]``: nothing)."""
        spec = checked_spec(network)
        with self._locks.hold(spec["network_id"]):
            try:
                if spec["deleted"] or spec["dhcp_port"] is None or not served_subnets(spec):
                    return self._remove(spec)
                return self._ensure(spec)
            except CommandError as exc:
                raise DhcpError(f"DHCP server of network {spec['network_id']}: {exc}") from exc

    # Ensure ---------------------------------------------------------------------------------------

    def _ensure(self, network: contract.DhcpNetworkSpec) -> list[str]:
        network_id = network["network_id"]
        done: list[str] = []
        with self.bridges.plugged([bridge_network(network)]) as made:
            done += made
            done += self._ensure_namespace(network)
        directory = self.directory(network_id)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        hosts_path = directory / "hosts"
        hosts = hosts_file(network)
        hosts_changed = not hosts_path.exists() or hosts_path.read_text() != hosts
        if hosts_changed:
            _write(hosts_path, hosts)
            done.append("hosts file")
        argv = dnsmasq_argv(network, directory)
        args_path = directory / "args"
        pid = self._running(directory)
        recorded = args_path.read_text() if args_path.exists() else None
        leases_path = directory / "leases"
        stale = stale_leases(leases_path.read_text() if leases_path.exists() else "", hosts)
        if pid is not None and recorded == json.dumps(argv) and not stale:
            if hosts_changed:
                self.processes.signal(pid, signal.SIGHUP)
                done.append("dnsmasq reloaded")
        else:
            if pid is not None:
                self._stop(pid, directory)
            if stale:  # dnsmasq writes the file while it runs, and reads it only when it starts
                kept = [line for line in leases_path.read_text().splitlines() if line not in stale]
                _write(leases_path, "".join(f"{line}\n" for line in kept))
                done.append(f"{len(stale)} stale lease(s) dropped")
            _write(args_path, json.dumps(argv))
            self._start(network_id, argv, directory)
            done.append("dnsmasq restarted" if pid is not None else "dnsmasq started")
        if done:
            LOG.info("DHCP of network %s: %s", network_id, ", ".join(done))
        return done

    def _ensure_namespace(self, network: contract.DhcpNetworkSpec) -> list[str]:
        network_id = network["network_id"]
        netns, ns_end = namespace_name(network_id), ns_end_name(network_id)
        done = self.namespaces.ensure(netns)
        veth = Veth(netns, host_end_name(network_id), ns_end, network["bridge"], network["mtu"],
                    network["dhcp_mac"].lower())
        made, have = self.namespaces.plug_veth(veth)
        done += made
        port = network["dhcp_port"]
        assert port is not None
        wanted = f"{port['ip_address']}/{ipaddress.ip_network(port['cidr']).prefixlen}"
        added, _ = self.namespaces.set_addresses(netns, ns_end, have, {wanted})
        return done + [f"address {address}" for address in added]

    # dnsmasq --------------------------------------------------------------------------------------

    def _running(self, directory: Path) -> int | None:
        """The pid of the network's dnsmasq; None when it does not run (no or a stale pid file)."""
        pid_file = directory / "pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self.processes.alive(pid, pid_file) else None

    def _start(self, network_id: str, argv: list[str], directory: Path) -> None:
        pid_file = directory / "pid"
        pid_file.unlink(missing_ok=True)
        # dnsmasq daemonizes: the command returns once it listens and has written its pid file.
        self.ns_runner.run("ip", "netns", "exec", namespace_name(network_id), *argv)
        deadline = time.monotonic() + START_TIMEOUT
        while self._running(directory) is None:
            if time.monotonic() > deadline:
                raise DhcpError(f"dnsmasq of network {network_id} did not start within {START_TIMEOUT:g} s")
            self.sleep(0.05)

    def _stop(self, pid: int, directory: Path) -> None:
        self.processes.signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.processes.alive(pid, directory / "pid"):
            if time.monotonic() > deadline:
                self.processes.signal(pid, signal.SIGKILL)
                break
            self.sleep(0.05)

    # Remove ---------------------------------------------------------------------------------------

    def _remove(self, network: contract.DhcpNetworkSpec) -> list[str]:
        network_id = network["network_id"]
        netns, host_end = namespace_name(network_id), host_end_name(network_id)
        directory = self.directory(network_id)
        done = []
        pid = self._running(directory)
        if pid is not None:
            self._stop(pid, directory)
            done.append("dnsmasq stopped")
        if self.namespaces.delete(netns):  # the veth goes with its namespace end
            done.append(f"namespace {netns}")
        if self.namespaces.delete_link(host_end):
            done.append(f"veth {host_end}")
        if directory.exists():
            shutil.rmtree(directory)
            done.append("state directory")
        if self.bridges.remove_bridge_if_unused(network["bridge"]):
            done.append(f"bridge {network['bridge']}")
        if done:
            LOG.info("DHCP of network %s removed: %s", network_id, ", ".join(done))
        return done


class RecordedDhcp:
    """The DHCP servers of a host whose driver makes no host devices: the desired state is recorded in
    :attr:`networks` (network id -> spec), the bridge in the :class:`RecordedBridges`; nothing runs."""

    def __init__(self, bridges: HostBridges) -> None:
        self.bridges = bridges
        self.networks: dict[str, contract.DhcpNetworkSpec] = {}

    def sync(self, network: Any) -> list[str]:
        spec = checked_spec(network)
        if spec["deleted"]:
            removed = self.networks.pop(spec["network_id"], None) is not None
            self.bridges.remove_bridge_if_unused(spec["bridge"])
            return ["recorded deletion"] if removed else []
        if self.networks.get(spec["network_id"]) == spec:
            return []
        self.bridges.ensure_bridge(bridge_network(spec))
        self.networks[spec["network_id"]] = spec
        return ["recorded"]


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically (dnsmasq may reread it at any time)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)
