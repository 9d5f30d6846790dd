"""The network node's DHCP servers (compute_workers.network.dhcp) with a fake runner and a fake process
table: the commands and files of a first sync, idempotency, a hosts-only change (SIGHUP), a subnet change
(restart), a dead dnsmasq (started again), deletion; the Dhcp family and its recorded mode."""

from __future__ import annotations

import copy
import json
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.network.dhcp import (
    DhcpError,
    DhcpServers,
    RecordedDhcp,
    checked_spec,
    host_end_name,
    namespace_name,
    ns_end_name,
    stale_leases,
)
from compute_workers.network.linuxbridge import CommandError, LinuxBridges, RecordedBridges
from compute_workers.operations import Dhcp
from compute_workers.virt.fake import FakeDriver

from .conftest import make_manager

MAC = "fa:16:3e:aa:bb:cc"


def dhcp_spec(network_id: str | None = None, provider: str = "flat", vni: int | None = None,
              cidr: str = "10.0.0.0/24", dhcp_ip: str = "10.0.0.2", gateway: str | None = "10.0.0.1",
              hosts: list[tuple[str, str, str]] | None = None) -> contract.DhcpNetworkSpec:
    network_id = network_id or str(uuid.uuid4())
    return {"network_id": network_id, "deleted": False, "bridge": contract.bridge_name(network_id),
            "provider_type": provider, "segmentation_id": vni, "mtu": 1450,  # type: ignore[typeddict-item]
            "dhcp_port": {"ip_address": dhcp_ip, "subnet_id": "s1", "cidr": cidr, "gateway_ip": gateway},
            "dhcp_mac": MAC,
            "subnets": [{"subnet_id": "s1", "cidr": cidr, "gateway_ip": gateway,
                         "dns_nameservers": ["192.0.2.53"]}],
            "hosts": [{"mac_address": m, "ip_address": a, "hostname": h}
                      for m, a, h in (hosts if hosts is not None else [("fa:16:3e:00:00:01", "10.0.0.5",
                                                                           "vm1")])],
            "lease_seconds": 600}


class FakeProcesses:
    def __init__(self) -> None:
        self.alive_pids: dict[int, Path] = {}
        self.signals: list[tuple[int, int]] = []
        self.next_pid = 1000

    def start(self, pid_file: Path) -> None:
        self.next_pid += 1
        self.alive_pids[self.next_pid] = pid_file
        pid_file.write_text(f"{self.next_pid}\n")

    def alive(self, pid: int, pid_file: Path) -> bool:
        return self.alive_pids.get(pid) == pid_file

    def signal(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))
        if signum in (signal.SIGTERM, signal.SIGKILL):
            self.alive_pids.pop(pid, None)


class FakeHost:
    """``ip`` against in-memory namespaces and links (key: (namespace or "", name)); dnsmasq "starts"
    in :class:`FakeProcesses`. Every command is recorded."""

    def __init__(self, processes: FakeProcesses) -> None:
        self.processes = processes
        self.netns: set[str] = set()
        self.links: dict[tuple[str, str], dict[str, Any]] = {}
        self.commands: list[str] = []
        self.dnsmasq_argv: list[str] = []

    def writes(self) -> list[str]:
        return [c for c in self.commands if " show " not in c and c != "ip netns list"]

    def _get(self, ns: str, name: str, argv: tuple[str, ...]) -> dict[str, Any]:
        if (ns, name) not in self.links:
            raise CommandError(argv, 1, f'Device "{name}" does not exist.')
        return self.links[(ns, name)]

    def run(self, *argv: str) -> str:
        self.commands.append(" ".join(argv))
        args = list(argv)
        ns = ""
        if args[:2] == ["ip", "-n"]:
            ns, args = args[2], ["ip", *args[3:]]
            assert ns in self.netns, ns
        if args[:3] == ["ip", "netns", "list"]:
            return "".join(f"{name} (id: 1)\n" for name in sorted(self.netns))
        if args[:3] == ["ip", "netns", "add"]:
            self.netns.add(args[3])
            self.links[(args[3], "lo")] = {"flags": ["LOOPBACK"], "mtu": 65536}
            return ""
        if args[:3] == ["ip", "netns", "del"]:
            self.netns.discard(args[3])
            for key in [k for k in self.links if k[0] == args[3]]:
                peer = self.links.pop(key).get("peer")
                if peer is not None:
                    self.links.pop(peer, None)
            return ""
        if args[:3] == ["ip", "netns", "exec"]:
            assert args[3] in self.netns and args[4] == "dnsmasq"
            self.dnsmasq_argv = args[4:]
            pid_file = next(a for a in args if a.startswith("--pid-file=")).split("=", 1)[1]
            self.processes.start(Path(pid_file))
            return ""
        if args[:4] in (["ip", "-j", "addr", "show"], ["ip", "-d", "-j", "link"]):
            name = args[-1]
            return json.dumps([{"ifname": name, **self._get(ns, name, argv)}])
        if args[:5] == ["ip", "-j", "link", "show", "master"]:
            self._get(ns, args[5], argv)
            return json.dumps([{"ifname": n} for (s, n), link in self.links.items()
                               if s == ns and link.get("master") == args[5]])
        if args[:3] == ["ip", "link", "add"]:
            if "veth" in args:
                host_end, peer = args[3], args[args.index("peer") + 2]
                peer_ns = args[args.index("netns") + 1]
                self.links[(ns, host_end)] = {"flags": [], "mtu": 1500, "peer": (peer_ns, peer)}
                self.links[(peer_ns, peer)] = {"flags": [], "mtu": 1500, "address": "02:00:00:00:00:01",
                                               "peer": (ns, host_end)}
            else:
                self.links[(ns, args[4])] = {"flags": [], "mtu": 1500}
            return ""
        if args[:4] == ["ip", "link", "set", "dev"]:
            link = self._get(ns, args[4], argv)
            for field in ("master", "address"):
                if field in args:
                    link[field] = args[args.index(field) + 1]
            if "mtu" in args:
                link["mtu"] = int(args[args.index("mtu") + 1])
            if "up" in args:
                link["flags"] = [*link["flags"], "UP"]
            return ""
        if args[:4] == ["ip", "link", "del", "dev"]:
            link = self._get(ns, args[4], argv)
            del self.links[(ns, args[4])]
            if link.get("peer"):
                self.links.pop(link["peer"], None)
            return ""
        if args[:3] == ["ip", "addr", "del"]:
            local, prefix = args[3].split("/")
            link = self._get(ns, args[5], argv)
            link["addr_info"] = [a for a in link.get("addr_info", [])
                                 if (a["local"], a["prefixlen"]) != (local, int(prefix))]
            return ""
        if args[:3] == ["ip", "addr", "add"]:
            local, prefix = args[3].split("/")
            link = self._get(ns, args[5], argv)
            link["addr_info"] = [*link.get("addr_info", []),
                                 {"family": "inet", "local": local, "prefixlen": int(prefix)}]
            return ""
        raise AssertionError(f"unexpected command {' '.join(argv)}")


@pytest.fixture
def processes() -> FakeProcesses:
    return FakeProcesses()


@pytest.fixture
def host(processes: FakeProcesses) -> FakeHost:
    return FakeHost(processes)


@pytest.fixture
def servers(host: FakeHost, processes: FakeProcesses, tmp_path: Path) -> DhcpServers:
    return DhcpServers(host, LinuxBridges(host), tmp_path / "_dhcp", processes, sleep=lambda _: None)


def test_first_sync_commands_and_files(servers: DhcpServers, host: FakeHost, tmp_path: Path) -> None:
    spec = dhcp_spec()
    net = spec["network_id"]
    ns, outside, inside, bridge = namespace_name(net), host_end_name(net), ns_end_name(net), spec["bridge"]
    assert all(len(name) <= 15 for name in (outside, inside, bridge))
    done = servers.sync(spec)
    assert done == [f"bridge {bridge}", f"namespace {ns}", f"veth {outside}/{inside}", "address 10.0.0.2/24",
                    "hosts file", "dnsmasq started"]
    directory = tmp_path / "_dhcp" / net
    assert host.writes() == [
        f"ip link add name {bridge} type bridge stp_state 0 forward_delay 0",
        f"ip link set dev {bridge} addrgenmode none",
        f"ip link set dev {bridge} mtu 1450 up",
        f"ip netns add {ns}",
        f"ip -n {ns} link set dev lo up",
        f"ip link add {outside} mtu 1450 type veth peer name {inside} mtu 1450 netns {ns}",
        f"ip link set dev {outside} mtu 1450 master {bridge} up",
        f"ip -n {ns} link set dev {inside} address {MAC} mtu 1450 up",
        f"ip -n {ns} addr add 10.0.0.2/24 dev {inside}",
        f"ip netns exec {ns} " + " ".join(host.dnsmasq_argv),
    ]
    assert host.dnsmasq_argv == [
        "dnsmasq", "--conf-file=/dev/null", "--user=root", "--no-resolv", "--no-hosts", "--port=0",
        "--bind-interfaces", f"--interface={inside}", "--except-interface=lo",
        f"--pid-file={directory / 'pid'}", f"--dhcp-hostsfile={directory / 'hosts'}",
        f"--dhcp-leasefile={directory / 'leases'}", f"--log-facility={directory / 'dnsmasq.log'}",
        "--dhcp-range=set:subnet0,10.0.0.0,static,255.255.255.0,600s",
        "--dhcp-option=tag:subnet0,option:router,10.0.0.1",
        "--dhcp-option=tag:subnet0,option:dns-server,192.0.2.53"]
    assert (directory / "hosts").read_text() == "fa:16:3e:00:00:01,10.0.0.5,vm1\n"
    assert host.links[(ns, inside)]["address"] == MAC
    assert host.links[("", outside)]["master"] == bridge

    host.commands.clear()
    assert servers.sync(spec) == []  # converged: reads only, no signal
    assert host.writes() == []


def test_hosts_only_change_reloads_without_restart(servers: DhcpServers, host: FakeHost,
                                                   processes: FakeProcesses, tmp_path: Path) -> None:
    spec = dhcp_spec()
    servers.sync(spec)
    pid = processes.next_pid
    spec["hosts"].append({"mac_address": "FA:16:3E:00:00:02", "ip_address": "10.0.0.6", "hostname": ""})
    host.commands.clear()
    assert servers.sync(spec) == ["hosts file", "dnsmasq reloaded"]
    assert processes.signals == [(pid, signal.SIGHUP)]
    assert host.writes() == []
    assert (tmp_path / "_dhcp" / spec["network_id"] / "hosts").read_text() == \
        "fa:16:3e:00:00:01,10.0.0.5,vm1\nfa:16:3e:00:00:02,10.0.0.6\n"


def test_a_deleted_ports_lease_is_dropped_so_its_address_can_go_to_the_next_port(
        servers: DhcpServers, processes: FakeProcesses, tmp_path: Path) -> None:
    # Found driving make run: a server deleted, the next one got its address (the lowest free) and a
    # new MAC; dnsmasq, still holding the old MAC's lease, answered "no address available".
    spec = dhcp_spec()
    servers.sync(spec)
    pid = processes.next_pid
    leases = tmp_path / "_dhcp" / spec["network_id"] / "leases"
    other = "1796757999 fa:16:3e:00:00:09 10.0.0.9 gone *\n"  # a host no more: dropped too
    leases.write_text("1796757904 fa:16:3e:00:00:01 10.0.0.5 vm1 01:fa:16:3e:00:00:01\n" + other)
    spec["hosts"] = [{"mac_address": "fa:16:3e:00:00:02", "ip_address": "10.0.0.5", "hostname": "vm2"}]
    assert servers.sync(spec) == ["hosts file", "2 stale lease(s) dropped", "dnsmasq restarted"]
    assert processes.signals == [(pid, signal.SIGTERM)]  # stopped before the file was rewritten
    assert leases.read_text() == ""
    assert servers.sync(spec) == []  # nothing stale any more

    # A lease of a host that is still one stays, and dnsmasq is not restarted for it.
    leases.write_text("1796757904 fa:16:3e:00:00:02 10.0.0.5 vm2 *\n")
    assert servers.sync(spec) == []
    assert stale_leases("1 FA:16:3E:00:00:02 10.0.0.5 vm2 *\nduid 00:01\n",
                        "fa:16:3e:00:00:02,10.0.0.5\n") == []


def test_subnet_change_restarts(servers: DhcpServers, host: FakeHost, processes: FakeProcesses) -> None:
    spec = dhcp_spec()
    servers.sync(spec)
    pid = processes.next_pid
    spec["subnets"][0]["gateway_ip"] = None
    spec["lease_seconds"] = 3600
    assert servers.sync(spec) == ["dnsmasq restarted"]
    assert processes.signals == [(pid, signal.SIGTERM)]
    assert list(processes.alive_pids) == [pid + 1]
    assert "--dhcp-option=tag:subnet0,option:router" in host.dnsmasq_argv
    assert "--dhcp-range=set:subnet0,10.0.0.0,static,255.255.255.0,3600s" in host.dnsmasq_argv


def test_port_address_change_readdresses_and_restarts(servers: DhcpServers, host: FakeHost) -> None:
    spec = dhcp_spec()
    servers.sync(spec)
    changed = dhcp_spec(network_id=spec["network_id"], cidr="10.1.0.0/16", dhcp_ip="10.1.0.2",
                        gateway="10.1.0.1")
    host.commands.clear()
    assert servers.sync(changed) == ["address 10.1.0.2/16", "dnsmasq restarted"]
    inside = ns_end_name(spec["network_id"])
    ns = namespace_name(spec["network_id"])
    assert f"ip -n {ns} addr del 10.0.0.2/24 dev {inside}" in host.writes()


def test_a_dead_dnsmasq_is_started_again(servers: DhcpServers, processes: FakeProcesses) -> None:
    spec = dhcp_spec()
    servers.sync(spec)
    processes.alive_pids.clear()  # crashed: the pid file is stale
    assert servers.sync(spec) == ["dnsmasq started"]
    assert processes.signals == []


def test_a_lost_namespace_is_made_again(servers: DhcpServers, host: FakeHost) -> None:
    spec = dhcp_spec()
    servers.sync(spec)
    host.run("ip", "netns", "del", namespace_name(spec["network_id"]))  # the veth goes with it
    done = servers.sync(spec)
    assert done[:2] == [f"namespace {namespace_name(spec['network_id'])}",
                        f"veth {host_end_name(spec['network_id'])}/{ns_end_name(spec['network_id'])}"]


def test_delete_removes_everything(servers: DhcpServers, host: FakeHost, processes: FakeProcesses,
                                   tmp_path: Path) -> None:
    spec = dhcp_spec()
    servers.sync(spec)
    pid = processes.next_pid
    deleted = {**spec, "deleted": True}
    assert servers.sync(deleted) == ["dnsmasq stopped", f"namespace {namespace_name(spec['network_id'])}",
                                     "state directory", f"bridge {spec['bridge']}"]
    assert processes.signals == [(pid, signal.SIGTERM)] and not processes.alive_pids
    assert host.netns == set() and host.links == {}
    assert not (tmp_path / "_dhcp" / spec["network_id"]).exists()
    assert servers.sync(deleted) == []


def test_delete_keeps_a_bridge_a_guest_still_uses(servers: DhcpServers, host: FakeHost) -> None:
    spec = dhcp_spec()
    servers.sync(spec)
    host.links[("", "tapguest")] = {"flags": ["UP"], "master": spec["bridge"]}
    done = servers.sync({**spec, "deleted": True})
    assert f"bridge {spec['bridge']}" not in done and ("", spec["bridge"]) in host.links


def test_nothing_to_serve_removes_the_server(servers: DhcpServers, host: FakeHost) -> None:
    spec = dhcp_spec()
    servers.sync(spec)
    assert "dnsmasq stopped" in servers.sync({**spec, "subnets": []})
    assert host.netns == set()


@pytest.mark.parametrize("change", [
    {"network_id": "../etc"}, {"bridge": "brqother"}, {"dhcp_mac": "nope"}, {"mtu": 0},
    {"lease_seconds": 5}, {"hosts": [{"mac_address": MAC, "ip_address": "10.0.0.9", "hostname": None}]},
    {"hosts": [{"mac_address": "x", "ip_address": "10.0.0.9", "hostname": "a"}]},
    {"subnets": [{"subnet_id": "s", "cidr": "bad", "gateway_ip": None, "dns_nameservers": []}]},
    {"provider_type": "vlan"}, {"provider_type": "vxlan"}, {"segmentation_id": 1000},
])
def test_malformed_specs_are_refused(change: dict[str, Any]) -> None:
    spec: dict[str, Any] = {**copy.deepcopy(dhcp_spec()), **change}
    with pytest.raises(DhcpError):
        checked_spec(spec)


def test_a_refusal_names_the_field() -> None:
    with pytest.raises(DhcpError, match=r"^network\.mtu must be an integer in 68\.\.65535, not 0$"):
        checked_spec({**dhcp_spec(), "mtu": 0})
    with pytest.raises(DhcpError, match=r"^network\.hosts\[0\]\.mac_address must be a MAC address"):
        checked_spec(dhcp_spec(hosts=[("x", "10.0.0.9", "a")]))


def test_a_deletion_needs_only_the_network_and_its_bridge() -> None:
    network_id = str(uuid.uuid4())
    deletion = {"network_id": network_id, "bridge": contract.bridge_name(network_id), "deleted": True}
    assert checked_spec(deletion) == deletion
    with pytest.raises(DhcpError, match=r"^network\.bridge must be"):
        checked_spec({**deletion, "bridge": "brqother"})


def test_family_records_only_without_host_devices(tmp_path: Path) -> None:
    manager, _ = make_manager(FakeDriver(), tmp_path)
    family = manager.family(Dhcp)
    assert isinstance(family.servers, RecordedDhcp)
    bridges = family.bridges
    assert isinstance(bridges, RecordedBridges)
    spec = dhcp_spec()
    assert family.network_dhcp_sync(spec) == ["recorded"]
    assert family.network_dhcp_sync(spec) == []
    assert family.servers.networks == {spec["network_id"]: spec} and spec["bridge"] in bridges.bridges
    assert family.network_dhcp_sync({**spec, "deleted": True}) == ["recorded deletion"]
    assert family.servers.networks == {} and bridges.removed == [spec["bridge"]]
    assert family.network_dhcp_sync({"network_id": 1}) == []  # refused, logged, not raised


def test_bad_host_names_are_left_out_and_ipv6_hosts_skipped(servers: DhcpServers, tmp_path: Path) -> None:
    spec = dhcp_spec(hosts=[("fa:16:3e:00:00:01", "10.0.0.5", "a\nb,c"),
                            ("fa:16:3e:00:00:02", "fd00::5", "v6")])
    servers.sync(spec)
    assert (tmp_path / "_dhcp" / spec["network_id"] / "hosts").read_text() == "fa:16:3e:00:00:01,10.0.0.5\n"
