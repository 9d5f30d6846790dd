"""The network node's routers (compute_workers.network.router) with a fake host: the commands and the
iptables text of a first sync, idempotency, floating IPs added (address, NAT, gratuitous ARP), moved and
removed (conntrack), legs and the gateway removed, deletion; the Router family and its recorded mode."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.network.linuxbridge import CommandError, LinuxBridges, RecordedBridges
from compute_workers.network.router import (
    OUTPUT,
    POSTROUTING,
    PREROUTING,
    RecordedRouters,
    Routers,
    checked_spec,
    gateway_name,
    interface_name,
    namespace_name,
    nat_rules,
    parsed_nat,
    restore_input,
)
from compute_workers.operations import Router
from compute_workers.virt.fake import FakeDriver

from .conftest import make_manager
from .test_dhcp import FakeHost, FakeProcesses

EXT_NET, TENANT_NET = "e" * 8 + "-0000-4000-8000-" + "0" * 12, "t" * 8 + "-0000-4000-8000-" + "0" * 12
GW_PORT, IF_PORT = "9a000000-0000-4000-8000-000000000001", "9b000000-0000-4000-8000-000000000002"


def leg(port_id: str, network_id: str, ip: str, cidr: str, gateway_ip: str | None = None,
        provider: str = "flat", vni: int | None = None, mtu: int = 1500,
        mac: str = "fa:16:3e:00:00:01") -> contract.RouterPortSpec:
    return {"port_id": port_id, "network_id": network_id, "bridge": contract.bridge_name(network_id),
            "provider_type": provider, "segmentation_id": vni, "mtu": mtu,  # type: ignore[typeddict-item]
            "mac_address": mac, "ip_address": ip, "cidr": cidr, "gateway_ip": gateway_ip}


def router_spec(router_id: str | None = None, floating: dict[str, str] | None = None,
                enable_snat: bool = True) -> contract.RouterSpec:
    return {"router_id": router_id or str(uuid.uuid4()), "deleted": False, "enable_snat": enable_snat,
            "gateway": leg(GW_PORT, EXT_NET, "172.24.4.10", "172.24.4.0/24", "172.24.4.1",
                           mac="fa:16:3e:00:00:0a"),
            "interfaces": [leg(IF_PORT, TENANT_NET, "10.0.0.1", "10.0.0.0/24", provider="vxlan", vni=1001,
                               mtu=1450, mac="FA:16:3E:00:00:0B")],
            "floating_ips": [{"floating_ip_id": f"fip-{address}", "floating_ip_address": address,
                              "fixed_ip_address": fixed} for address, fixed in (floating or {}).items()]}


class RouterHost(FakeHost):
    """:class:`FakeHost` plus what a router namespace needs: sysctl, iptables-save/-restore (the nat
    table of each namespace), conntrack, arping, the default route, a namespace's whole device list."""

    def __init__(self) -> None:
        super().__init__(FakeProcesses())
        self.forwarding: dict[str, str] = {}
        self.nat: dict[str, dict[str, list[str]]] = {}  # netns -> chain -> "-A …" lines
        self.routes: dict[str, list[dict[str, str]]] = {}
        self.restored: list[str] = []
        self.conntrack_entries: set[str] = set()  # "netns address": entries conntrack -D would find

    def writes(self) -> list[str]:
        reads = ("sysctl -n", "iptables-save", " show")
        return [c for c in super().writes() if not any(read in c for read in reads)]

    def run(self, *argv: str) -> str:
        args = list(argv)
        if args[:3] == ["ip", "netns", "exec"] and args[4] != "dnsmasq":
            self.commands.append(" ".join(argv))
            assert args[3] in self.netns, args[3]
            return self._exec(args[3], args[4:], argv)
        if args[:2] == ["ip", "-n"]:
            ns, rest = args[2], args[3:]
            if rest == ["-j", "addr", "show"]:
                self.commands.append(" ".join(argv))
                return self._json([{"ifname": name, **link} for (s, name), link in self.links.items()
                                   if s == ns])
            if rest[:2] == ["-4", "-j"]:
                self.commands.append(" ".join(argv))
                return self._json(self.routes.get(ns, []))
            if rest[:3] == ["-4", "route", "replace"]:
                self.commands.append(" ".join(argv))
                self.routes[ns] = [{"dst": "default", "gateway": rest[5], "dev": rest[7]}]
                return ""
            if rest[:3] == ["-4", "route", "del"]:
                self.commands.append(" ".join(argv))
                self.routes.pop(ns)
                return ""
            if rest[:2] == ["link", "del"]:
                self.routes[ns] = [r for r in self.routes.get(ns, []) if r["dev"] != rest[3]]
        if args[:3] == ["ip", "link", "add"] and args[4:6] == ["type", "vxlan"]:
            self.commands.append(" ".join(argv))
            self.links[("", args[3])] = {"flags": [], "mtu": 1500}
            return ""
        if args[:3] == ["ip", "netns", "del"]:
            for state in (self.nat, self.routes):
                state.pop(args[3], None)  # type: ignore[attr-defined]
            self.forwarding = {k: v for k, v in self.forwarding.items() if not k.startswith(f"{args[3]} ")}
        return super().run(*argv)

    @staticmethod
    def _json(value: Any) -> str:
        return json.dumps(value)

    def _exec(self, ns: str, args: list[str], argv: tuple[str, ...]) -> str:
        if args[:2] == ["sysctl", "-n"]:  # net.ipv4.ip_forward, or a leg's neighbour settings
            return "".join(self.forwarding.get(f"{ns} {key}", "0") + "\n" for key in args[2:])
        if args[:3] == ["sysctl", "-q", "-w"]:
            for setting in args[3:]:
                key, value = setting.split("=")
                self.forwarding[f"{ns} {key}"] = value
            return ""
        if args == ["iptables-save", "-t", "nat"]:
            chains = self.nat.get(ns, {})
            builtin = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
            ours = sorted(c for c in chains if c.startswith("cloudctl-"))
            lines = ["*nat", *(f":{c} ACCEPT [0:0]" for c in builtin), *(f":{c} - [0:0]" for c in ours)]
            lines += [rule for chain in (*builtin, *ours) for rule in chains.get(chain, [])]
            return "\n".join(["# Generated by iptables-save", *lines, "COMMIT", ""])
        if args[:2] == ["iptables-restore", "--noflush"]:
            text = Path(args[2]).read_text()
            self.restored.append(text)
            chains = self.nat.setdefault(ns, {})
            for line in text.splitlines():
                if line.startswith(":"):
                    chains[line[1:].split()[0]] = []
                elif line.startswith("-A "):
                    chains[line.split()[1]].append(line)
                elif line.startswith("-I "):
                    _, chain, _, *rule = line.split()
                    chains.setdefault(chain, []).insert(0, " ".join(["-A", chain, *rule]))
            return ""
        if args[0] == "conntrack":
            key = f"{ns} {args[3]}"
            if key not in self.conntrack_entries:
                raise CommandError(argv, 1, "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been "
                                            "deleted.")
            self.conntrack_entries.discard(key)
            return ""
        if args[0] == "arping":
            return ""
        raise AssertionError(f"unexpected command in {ns}: {' '.join(args)}")


@pytest.fixture
def host() -> RouterHost:
    return RouterHost()


@pytest.fixture
def bridges(host: RouterHost) -> LinuxBridges:
    return LinuxBridges(host, tunnel_ip="192.0.2.10")


@pytest.fixture
def routers(host: RouterHost, bridges: LinuxBridges) -> Routers:
    return Routers(host, bridges, background=lambda job: job())


def test_first_sync_commands_and_nat_text(routers: Routers, host: RouterHost) -> None:
    spec = router_spec(floating={"172.24.4.20": "10.0.0.5"})
    ns, qg, qr = namespace_name(spec["router_id"]), gateway_name(GW_PORT), interface_name(IF_PORT)
    ext, tenant = contract.bridge_name(EXT_NET), contract.bridge_name(TENANT_NET)
    tap_gw, tap_if = contract.tap_name(GW_PORT), contract.tap_name(IF_PORT)
    assert (qg, qr, tap_gw) == ("qg-9a000000-00", "qr-9b000000-00", "tap9a000000-00")
    done = routers.sync(spec)
    assert done == [
        f"bridge {ext}", f"bridge {tenant}", "VXLAN vxlan-1001", f"namespace {ns}", "forwarding",
        f"veth {tap_gw}/{qg}", f"neighbour probing on {qg}", f"address 172.24.4.10/24 on {qg}",
        f"veth {tap_if}/{qr}", f"neighbour probing on {qr}", f"address 10.0.0.1/24 on {qr}",
        "default route via 172.24.4.1", "NAT rules",
        f"address 172.24.4.20/32 on {qg}"]  # after its DNAT: the router never answers it itself
    writes = [c for c in host.writes() if not c.startswith(("ip link add name brq", "ip link set dev brq",
                                                            "ip link add vxlan", "ip link set dev vxlan"))]
    restore = next(c for c in writes if "iptables-restore" in c)
    assert writes == [
        f"ip netns add {ns}",
        f"ip -n {ns} link set dev lo up",
        f"ip netns exec {ns} sysctl -q -w net.ipv4.ip_forward=1",
        f"ip link add {tap_gw} mtu 1500 type veth peer name {qg} mtu 1500 netns {ns}",
        f"ip link set dev {tap_gw} mtu 1500 master {ext} up",
        f"ip -n {ns} link set dev {qg} address fa:16:3e:00:00:0a mtu 1500 up",
        f"ip netns exec {ns} sysctl -q -w net.ipv4.neigh.{qg}.delay_first_probe_time=1 "
        f"net.ipv4.neigh.{qg}.ucast_solicit=0 net.ipv4.neigh.{qg}.mcast_resolicit=3",
        f"ip -n {ns} addr add 172.24.4.10/24 dev {qg}",
        f"ip link add {tap_if} mtu 1450 type veth peer name {qr} mtu 1450 netns {ns}",
        f"ip link set dev {tap_if} mtu 1450 master {tenant} up",
        f"ip -n {ns} link set dev {qr} address fa:16:3e:00:00:0b mtu 1450 up",  # MAC in lower case
        f"ip netns exec {ns} sysctl -q -w net.ipv4.neigh.{qr}.delay_first_probe_time=1 "
        f"net.ipv4.neigh.{qr}.ucast_solicit=0 net.ipv4.neigh.{qr}.mcast_resolicit=3",
        f"ip -n {ns} addr add 10.0.0.1/24 dev {qr}",
        f"ip -n {ns} -4 route replace default via 172.24.4.1 dev {qg}",
        restore,
        f"ip netns exec {ns} conntrack -D --orig-dst 172.24.4.20",  # none: nothing more is done
        f"ip netns exec {ns} conntrack -D --reply-dst 172.24.4.20",
        f"ip -n {ns} addr add 172.24.4.20/32 dev {qg}",
        f"ip netns exec {ns} arping -U -c 3 -I {qg} 172.24.4.10",
        f"ip netns exec {ns} arping -U -c 3 -I {qg} 172.24.4.20",
    ]
    assert restore.startswith(f"ip netns exec {ns} iptables-restore --noflush /")
    assert host.restored == [
        "*nat\n"
        f":{PREROUTING} - [0:0]\n:{OUTPUT} - [0:0]\n:{POSTROUTING} - [0:0]\n"
        f"-A {PREROUTING} -d 172.24.4.20/32 -j DNAT --to-destination 10.0.0.5\n"
        f"-A {OUTPUT} -d 172.24.4.20/32 -j DNAT --to-destination 10.0.0.5\n"
        f"-A {POSTROUTING} -s 10.0.0.5/32 -o {qg} -j SNAT --to-source 172.24.4.20\n"
        f"-A {POSTROUTING} -s 10.0.0.0/24 -o {qg} -j SNAT --to-source 172.24.4.10\n"
        f"-I PREROUTING 1 -j {PREROUTING}\n-I OUTPUT 1 -j {OUTPUT}\n-I POSTROUTING 1 -j {POSTROUTING}\n"
        "COMMIT\n"]
    assert not any(Path(c.split()[-1]).exists() for c in writes if "iptables-restore" in c)  # temp file gone

    host.commands.clear()
    assert routers.sync(spec) == []  # converged: reads only
    assert host.writes() == []


def test_floating_ips_added_moved_and_removed(routers: Routers, host: RouterHost) -> None:
    spec = router_spec()
    ns, qg = namespace_name(spec["router_id"]), gateway_name(GW_PORT)
    routers.sync(spec)
    host.commands.clear()

    # A connection to .20 that began before it was mapped (a ping already running) would never be
    # DNATed: it is deleted once the rules are in. .21 had none (conntrack finds nothing: no error).
    host.conntrack_entries = {f"{ns} 172.24.4.20"}
    added = router_spec(spec["router_id"], floating={"172.24.4.20": "10.0.0.5", "172.24.4.21": "10.0.0.6"})
    assert routers.sync(added) == ["NAT rules", "connections of 172.24.4.20 deleted",
                                   f"address 172.24.4.20/32 on {qg}", f"address 172.24.4.21/32 on {qg}"]
    assert [c for c in host.writes() if "arping" in c] == [
        f"ip netns exec {ns} arping -U -c 3 -I {qg} 172.24.4.20",
        f"ip netns exec {ns} arping -U -c 3 -I {qg} 172.24.4.21"]
    writes = host.writes()
    assert [c for c in writes if "conntrack" in c] == [
        f"ip netns exec {ns} conntrack -D --orig-dst 172.24.4.20",
        f"ip netns exec {ns} conntrack -D --reply-dst 172.24.4.20",
        f"ip netns exec {ns} conntrack -D --orig-dst 172.24.4.21",
        f"ip netns exec {ns} conntrack -D --reply-dst 172.24.4.21"]
    assert min(i for i, c in enumerate(writes) if "conntrack" in c) > \
        max(i for i, c in enumerate(writes) if "iptables-restore" in c)  # after the DNAT is in
    assert min(i for i, c in enumerate(writes) if "addr add" in c) > \
        max(i for i, c in enumerate(writes) if "iptables-restore" in c)  # so are the addresses

    # .20 moves to another fixed IP, .21 goes: both lose their connections; .20's address stays.
    host.conntrack_entries = {f"{ns} 172.24.4.20", f"{ns} 172.24.4.21"}
    host.commands.clear()
    moved = router_spec(spec["router_id"], floating={"172.24.4.20": "10.0.0.7"})
    assert routers.sync(moved) == [f"address 172.24.4.21/32 off {qg}", "NAT rules",
                                   "connections of 172.24.4.20 deleted", "connections of 172.24.4.21 deleted"]
    assert [c for c in host.writes() if "conntrack" in c or "arping" in c] == [
        f"ip netns exec {ns} conntrack -D --orig-dst 172.24.4.20",
        f"ip netns exec {ns} conntrack -D --reply-dst 172.24.4.20",
        f"ip netns exec {ns} conntrack -D --orig-dst 172.24.4.21",
        f"ip netns exec {ns} conntrack -D --reply-dst 172.24.4.21"]
    assert host.nat[ns][PREROUTING] == [
        f"-A {PREROUTING} -d 172.24.4.20/32 -j DNAT --to-destination 10.0.0.7"]
    assert host.nat[ns]["PREROUTING"] == [f"-A PREROUTING -j {PREROUTING}"]  # the jump is not added twice


def test_a_removed_leg_goes_and_its_bridge_with_it(routers: Routers, host: RouterHost,
                                                   bridges: LinuxBridges) -> None:
    spec = router_spec()
    ns, qr = namespace_name(spec["router_id"]), interface_name(IF_PORT)
    tenant = contract.bridge_name(TENANT_NET)
    routers.sync(spec)
    assert bridges.remove_bridge_if_unused(tenant) is False  # the router's leg is on it
    without = {**spec, "interfaces": []}
    assert routers.sync(without) == [f"leg {qr} removed", "NAT rules", f"bridge {tenant} removed"]
    assert (ns, qr) not in host.links and ("", contract.tap_name(IF_PORT)) not in host.links
    assert ("", tenant) not in host.links and ("", "vxlan-1001") not in host.links
    assert host.nat[ns][POSTROUTING] == []


def test_a_replaced_gateway_port_and_a_removed_gateway(routers: Routers, host: RouterHost) -> None:
    spec = router_spec(floating={"172.24.4.20": "10.0.0.5"})
    ns, old_qg = namespace_name(spec["router_id"]), gateway_name(GW_PORT)
    routers.sync(spec)
    new_port = "9c000000-0000-4000-8000-000000000003"
    replaced = copy.deepcopy(spec)
    assert replaced["gateway"] is not None
    replaced["gateway"]["port_id"] = new_port
    done = routers.sync(replaced)
    new_qg = gateway_name(new_port)
    assert done[0] == f"leg {old_qg} removed" and f"address 172.24.4.20/32 on {new_qg}" in done
    assert host.routes[ns] == [{"dst": "default", "gateway": "172.24.4.1", "dev": new_qg}]
    assert f"-A {POSTROUTING} -s 10.0.0.0/24 -o {new_qg} -j SNAT --to-source 172.24.4.10" in \
        host.nat[ns][POSTROUTING]

    no_gateway = {**replaced, "gateway": None}
    assert routers.sync(no_gateway) == [f"leg {new_qg} removed", "NAT rules",
                                        f"bridge {contract.bridge_name(EXT_NET)} removed"]
    assert host.routes[ns] == [] and all(host.nat[ns][chain] == [] for chain in (PREROUTING, OUTPUT,
                                                                                 POSTROUTING))


def test_delete_removes_everything(routers: Routers, host: RouterHost, bridges: LinuxBridges) -> None:
    spec = router_spec(floating={"172.24.4.20": "10.0.0.5"})
    routers.sync(spec)
    deleted = {"router_id": spec["router_id"], "deleted": True}
    assert routers.sync(deleted) == [f"leg {gateway_name(GW_PORT)} removed",
                                     f"leg {interface_name(IF_PORT)} removed",
                                     f"namespace {namespace_name(spec['router_id'])}",
                                     f"bridge {contract.bridge_name(EXT_NET)} removed",
                                     f"bridge {contract.bridge_name(TENANT_NET)} removed"]
    assert host.netns == set() and host.links == {}
    assert bridges.release(f"router-{spec['router_id']}") == []  # no hold left
    assert routers.sync(deleted) == []


def test_delete_keeps_a_bridge_a_guest_still_uses(routers: Routers, host: RouterHost) -> None:
    spec = router_spec()
    routers.sync(spec)
    host.links[("", "tapguest")] = {"flags": ["UP"], "master": contract.bridge_name(TENANT_NET)}
    done = routers.sync({**spec, "deleted": True})
    assert f"bridge {contract.bridge_name(TENANT_NET)} removed" not in done
    assert ("", contract.bridge_name(TENANT_NET)) in host.links


def test_a_lost_namespace_is_made_again_after_a_restart(host: RouterHost, bridges: LinuxBridges) -> None:
    spec = router_spec(floating={"172.24.4.20": "10.0.0.5"})
    Routers(host, bridges, background=lambda job: job()).sync(spec)
    host.run("ip", "netns", "del", namespace_name(spec["router_id"]))  # the veths go with it
    restarted = Routers(host, LinuxBridges(host, tunnel_ip="192.0.2.10"), background=lambda job: job())
    done = restarted.sync(spec)
    assert done[:2] == [f"namespace {namespace_name(spec['router_id'])}", "forwarding"]
    assert "NAT rules" in done and "default route via 172.24.4.1" in done
    assert restarted.sync(spec) == []


def test_without_snat_only_the_floating_ips_are_translated() -> None:
    rules = nat_rules(router_spec(floating={"172.24.4.20": "10.0.0.5"}, enable_snat=False))
    assert rules[POSTROUTING] == [f"-A {POSTROUTING} -s 10.0.0.5/32 -o {gateway_name(GW_PORT)} -j SNAT "
                                  "--to-source 172.24.4.20"]
    spec = router_spec(floating={"172.24.4.20": "10.0.0.5"})
    spec["gateway"] = None
    assert nat_rules(spec) == {PREROUTING: [], OUTPUT: [], POSTROUTING: []}


def test_parsed_nat_reads_what_restore_input_writes() -> None:
    wanted = nat_rules(router_spec(floating={"172.24.4.20": "10.0.0.5"}))
    text = restore_input(wanted, ["PREROUTING"])
    saved = text.replace(f"-I PREROUTING 1 -j {PREROUTING}", f"-A PREROUTING -j {PREROUTING}")
    assert parsed_nat(saved) == (wanted, {"PREROUTING"})
    assert parsed_nat(f"-A OUTPUT -o lo -j {OUTPUT}\n") == ({}, set())  # not our plain jump


@pytest.mark.parametrize("change", [
    {"router_id": "../etc"}, {"deleted": "no"}, {"enable_snat": 1}, {"interfaces": {}},
    {"interfaces": [{**leg(IF_PORT, TENANT_NET, "10.0.0.1", "10.0.0.0/24"), "bridge": "brqother"}]},
    {"interfaces": [leg(IF_PORT, TENANT_NET, "10.1.0.1", "10.0.0.0/24")]},
    {"interfaces": [leg(IF_PORT, TENANT_NET, "fd00::1", "fd00::/64")]},
    {"interfaces": [leg(IF_PORT, TENANT_NET, "10.0.0.1", "10.0.0.0/24", mtu=0)]},
    {"interfaces": [leg(IF_PORT, TENANT_NET, "10.0.0.1", "10.0.0.0/24", mac="x")]},
    {"interfaces": [leg(IF_PORT, TENANT_NET, "10.0.0.1", "10.0.0.0/24", provider="vlan")]},
    {"interfaces": [leg(IF_PORT, TENANT_NET, "10.0.0.1", "10.0.0.0/24", provider="vxlan")]},  # no VNI
    {"interfaces": [leg(IF_PORT, TENANT_NET, "10.0.0.1", "10.0.0.0/24", vni=1000)]},  # flat with one
    {"interfaces": [leg(IF_PORT, TENANT_NET, "10.0.0.1", "10.0.0.0/24"),
                    leg(IF_PORT[:11] + "x", TENANT_NET, "10.0.1.1", "10.0.1.0/24")]},  # same device name
    {"interfaces": [leg("bad id", TENANT_NET, "10.0.0.1", "10.0.0.0/24")]},
    {"floating_ips": [{"floating_ip_id": "f", "floating_ip_address": "x", "fixed_ip_address": "10.0.0.5"}]},
    {"floating_ips": [{"floating_ip_id": "f", "floating_ip_address": "172.24.4.20",
                       "fixed_ip_address": "10.0.0.5"}] * 2},
    {"gateway": {"port_id": GW_PORT}},
])
def test_malformed_specs_are_refused(change: dict[str, Any]) -> None:
    spec: dict[str, Any] = {**copy.deepcopy(router_spec()), **change}
    with pytest.raises(contract.SpecError):
        checked_spec(spec)


def test_a_refusal_names_the_leg_and_field() -> None:
    bad = leg(IF_PORT, TENANT_NET, "10.0.0.1", "10.0.0.0/24", mac="x")
    spec: dict[str, Any] = {**router_spec(router_id="r1"), "interfaces": [bad]}
    with pytest.raises(contract.SpecError,
                       match=r"^router r1: interfaces\[0\]\.mac_address must be a MAC address, not 'x'$"):
        checked_spec(spec)


def test_a_deletion_needs_only_the_id() -> None:
    assert checked_spec({"router_id": "r1", "deleted": True}) == {"router_id": "r1", "deleted": True}


def test_family_records_only_without_host_devices(tmp_path: Path) -> None:
    manager, _ = make_manager(FakeDriver(), tmp_path)
    family = manager.family(Router)
    assert isinstance(family.routers, RecordedRouters)
    bridges = family.bridges
    assert isinstance(bridges, RecordedBridges)
    spec = router_spec()
    ext, tenant = contract.bridge_name(EXT_NET), contract.bridge_name(TENANT_NET)
    assert family.network_router_sync(spec) == ["recorded"]
    assert family.network_router_sync(spec) == []
    assert family.routers.routers == {spec["router_id"]: spec} and {ext, tenant} <= set(bridges.bridges)
    assert bridges.remove_bridge_if_unused(tenant) is False  # held by the router
    assert family.network_router_sync({**spec, "interfaces": []}) == ["recorded"]
    assert bridges.removed == [tenant]
    assert family.network_router_sync({"router_id": spec["router_id"], "deleted": True}) == \
        ["recorded deletion"]
    assert family.routers.routers == {} and bridges.removed == [tenant, ext]
    assert family.network_router_sync({"router_id": 1}) == []  # refused, logged, not raised


def test_family_logs_a_failed_sync(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager, _ = make_manager(FakeDriver(), tmp_path)
    family = manager.family(Router)

    class Failing(RecordedRouters):
        def sync(self, router: Any) -> list[str]:
            raise CommandError(["ip"], 1, "boom")

    family.routers = Failing(family.bridges)
    assert family.network_router_sync(router_spec()) == []
    assert "boom" in caplog.text
