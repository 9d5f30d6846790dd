"""The host's bridges (compute_workers.network.linuxbridge) with a fake runner: the exact commands,
idempotency, removal only when no tap is left, the faults; the build family plugging before the domain
starts and removing unused bridges after terminate; the guests' interfaces in the domain definitions."""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.manager import ComputeManager
from compute_workers.network.linuxbridge import (
    CommandError,
    CommandRunner,
    LinuxBridges,
    PlugError,
    RecordedBridges,
    namespaces_runner,
)
from compute_workers.operations import Build
from compute_workers.reporter import ListReporter
from compute_workers.virt.fake import FakeDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import SpecFactory, make_config, make_manager

TUNNEL_IP = "192.0.2.10"


def network_spec(provider: str = "vxlan", vni: int | None = 1001, mtu: int = 1450,
                 network_id: str | None = None, port_id: str | None = None,
                 mac: str = "fa:16:3e:00:00:01") -> contract.NetworkSpec:
    network_id = network_id or str(uuid.uuid4())
    port_id = port_id or str(uuid.uuid4())
    return {"port_id": port_id, "network_id": network_id, "mac_address": mac,
            "fixed_ips": [{"ip_address": "10.0.0.5", "subnet_id": str(uuid.uuid4()), "cidr": "10.0.0.0/24",
                           "gateway_ip": "10.0.0.1"}],
            "mtu": mtu, "provider_type": provider, "segmentation_id": vni,  # type: ignore[typeddict-item]
            "bridge": contract.bridge_name(network_id), "tap": contract.tap_name(port_id)}


class FakeRunner:
    """``ip``/``bridge`` against an in-memory set of links; every command is recorded. ``fail`` maps a
    command's first words to the stderr it fails with."""

    def __init__(self, links: dict[str, dict[str, Any]] | None = None) -> None:
        self.links: dict[str, dict[str, Any]] = links or {}
        self.commands: list[str] = []
        self.fdb: set[tuple[str, str]] = set()
        self.fail: dict[str, str] = {}

    def run(self, *argv: str) -> str:
        command = " ".join(argv)
        self.commands.append(command)
        for prefix, stderr in self.fail.items():
            if command.startswith(prefix):
                raise CommandError(argv, 2, stderr)
        args = list(argv)
        if args[:5] == ["ip", "-d", "-j", "link", "show"]:
            name = args[6]
            if name not in self.links:
                raise CommandError(argv, 1, f'Device "{name}" does not exist.')
            return json.dumps([{"ifname": name, **self.links[name]}])
        if args[:5] == ["ip", "-j", "link", "show", "master"]:
            if args[5] not in self.links:
                raise CommandError(argv, 1, f'Error: argument "{args[5]}" is wrong: Device does not exist')
            return json.dumps([{"ifname": name} for name, link in self.links.items()
                               if link.get("master") == args[5]])
        if args[:3] == ["ip", "link", "add"]:
            name = args[4] if args[3] == "name" else args[3]
            if name in self.links:
                raise CommandError(argv, 2, "RTNETLINK answers: File exists")
            self.links[name] = {"flags": [], "kind": args[args.index("type") + 1]}
            return ""
        if args[:4] == ["ip", "link", "set", "dev"]:
            link = self.links[args[4]]
            if "master" in args:
                link["master"] = args[args.index("master") + 1]
            if "up" in args:
                link["flags"] = ["UP"]
            return ""
        if args[:4] == ["ip", "link", "del", "dev"]:
            self.links.pop(args[4])
            for link in self.links.values():
                if link.get("master") == args[4]:
                    del link["master"]
            return ""
        if args[:3] == ["bridge", "fdb", "append"]:
            self.fdb.add((args[5], args[7]))
            return ""
        if args[:3] == ["bridge", "fdb", "del"]:
            if (args[5], args[7]) not in self.fdb:
                raise CommandError(argv, 255, "RTNETLINK answers: No such file or directory")
            self.fdb.discard((args[5], args[7]))
            return ""
        raise AssertionError(f"unexpected command {command}")

    def writes(self) -> list[str]:
        return [c for c in self.commands if " show " not in c]


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


# The module: exact commands ------------------------------------------------------------------------


def test_vxlan_network_commands(runner: FakeRunner) -> None:
    network = network_spec("vxlan", 1001, 1450)
    bridge = network["bridge"]
    made = LinuxBridges(runner, TUNNEL_IP).ensure_bridge(network)
    assert made == [f"bridge {bridge}", "VXLAN vxlan-1001"]
    assert runner.commands == [
        f"ip -d -j link show dev {bridge}",
        f"ip link add name {bridge} type bridge stp_state 0 forward_delay 0",
        f"ip link set dev {bridge} addrgenmode none",
        f"ip link set dev {bridge} mtu 1450 up",
        "ip -d -j link show dev vxlan-1001",
        f"ip link add vxlan-1001 type vxlan id 1001 dstport 4789 local {TUNNEL_IP} nolearning",
        f"ip link set dev vxlan-1001 mtu 1450 master {bridge} up",
    ]
    assert len(bridge) <= 15 and bridge.startswith("brq")


def test_flat_network_commands_with_and_without_an_uplink(runner: FakeRunner) -> None:
    runner.links["eth1"] = {"flags": ["UP"]}
    network = network_spec("flat", None, 1500)
    bridge = network["bridge"]
    assert LinuxBridges(runner, flat_interface="eth1").ensure_bridge(network) == [f"bridge {bridge}",
                                                                                  "uplink eth1"]
    assert runner.commands == [
        f"ip -d -j link show dev {bridge}",
        f"ip link add name {bridge} type bridge stp_state 0 forward_delay 0",
        f"ip link set dev {bridge} addrgenmode none",
        f"ip link set dev {bridge} mtu 1500 up",
        "ip -d -j link show dev eth1",
        f"ip link set dev eth1 master {bridge} up",
    ]
    # No COMPUTE_FLAT_INTERFACE: the bridge has no uplink (and needs no tunnel address).
    alone = FakeRunner()
    other = network_spec("flat", None, 1500)
    assert LinuxBridges(alone).ensure_bridge(other) == [f"bridge {other['bridge']}"]
    assert alone.writes() == [
        f"ip link add name {other['bridge']} type bridge stp_state 0 forward_delay 0",
        f"ip link set dev {other['bridge']} addrgenmode none",
        f"ip link set dev {other['bridge']} mtu 1500 up",
    ]


def test_ensure_is_idempotent_and_converges(runner: FakeRunner) -> None:
    bridges = LinuxBridges(runner, TUNNEL_IP)
    network = network_spec()
    bridges.ensure_bridge(network)
    runner.commands.clear()
    assert bridges.ensure_bridge(network) == []  # all there: only read
    assert runner.writes() == []
    # Something took the VXLAN out of the bridge and set the bridge down: put back, not recreated.
    del runner.links["vxlan-1001"]["master"]
    runner.links[network["bridge"]]["flags"] = []
    runner.commands.clear()
    assert bridges.ensure_bridge(network) == []
    assert runner.writes() == [f"ip link set dev {network['bridge']} up",
                               f"ip link set dev vxlan-1001 master {network['bridge']} up"]


def test_removed_only_when_no_tap_is_left(runner: FakeRunner) -> None:
    bridges = LinuxBridges(runner, TUNNEL_IP)
    network = network_spec()
    bridge = network["bridge"]
    bridges.ensure_bridge(network)
    runner.links["tapaaaa"] = {"flags": ["UP"], "master": bridge}
    runner.commands.clear()
    assert bridges.remove_bridge_if_unused(bridge) is False
    assert runner.writes() == [] and bridge in runner.links
    del runner.links["tapaaaa"]
    assert bridges.remove_bridge_if_unused(bridge) is True
    assert runner.writes() == ["ip link del dev vxlan-1001", f"ip link del dev {bridge}"]
    assert set(runner.links) == set()
    runner.commands.clear()
    assert bridges.remove_bridge_if_unused(bridge) is False  # gone already: nothing to do
    assert runner.writes() == []
    with pytest.raises(PlugError, match="not a cloudctl bridge"):
        bridges.remove_bridge_if_unused("virbr0")


def test_flat_uplink_is_released_not_deleted(runner: FakeRunner) -> None:
    runner.links["eth1"] = {"flags": ["UP"]}
    bridges = LinuxBridges(runner, flat_interface="eth1")
    network = network_spec("flat", None, 1500)
    bridges.ensure_bridge(network)
    runner.commands.clear()
    assert bridges.remove_bridge_if_unused(network["bridge"]) is True
    assert runner.writes() == [f"ip link del dev {network['bridge']}"]
    assert "master" not in runner.links["eth1"]
    # The interface in another flat network's bridge: a clear refusal.
    first, second = network_spec("flat", None, 1500), network_spec("flat", None, 1500)
    bridges.ensure_bridge(first)
    with pytest.raises(PlugError, match=f"eth1 is already in bridge {first['bridge']}"):
        bridges.ensure_bridge(second)


def test_a_plug_in_flight_keeps_its_bridge(runner: FakeRunner) -> None:
    bridges = LinuxBridges(runner, TUNNEL_IP)
    network = network_spec()
    with bridges.plugged([network]):  # the domain's taps do not exist yet
        assert bridges.remove_bridge_if_unused(network["bridge"]) is False
    bridges.hold("instance-a", [network])  # a live migration's destination
    assert bridges.remove_bridge_if_unused(network["bridge"]) is False
    assert bridges.release("instance-a") == [network["bridge"]]
    assert bridges.remove_bridge_if_unused(network["bridge"]) is True


def test_faults_name_the_device_and_what_ip_said(runner: FakeRunner) -> None:
    network = network_spec()
    runner.fail["ip link add name"] = "RTNETLINK answers: Operation not permitted"
    with pytest.raises(PlugError) as caught:
        LinuxBridges(runner, TUNNEL_IP).ensure_bridge(network)
    assert str(caught.value) == (f"cannot create bridge {network['bridge']} of network "
                                 f"{network['network_id']}: RTNETLINK answers: Operation not permitted")
    runner.fail.clear()
    runner.fail["ip link add vxlan"] = "RTNETLINK answers: Address already in use"
    with pytest.raises(PlugError, match=f"cannot create VXLAN vxlan-1001 of network {network['network_id']} "
                                        f"on bridge {network['bridge']}: RTNETLINK answers: Address"):
        LinuxBridges(runner, TUNNEL_IP).ensure_bridge(network)
    with pytest.raises(PlugError, match=r"COMPUTE_TUNNEL_IP .* is not set"):
        LinuxBridges(FakeRunner()).ensure_bridge(network)
    with pytest.raises(PlugError, match="without a valid VNI"):
        LinuxBridges(FakeRunner(), TUNNEL_IP).ensure_bridge(network_spec("vxlan", None))


def test_fdb_flood_entries(runner: FakeRunner) -> None:
    bridges = LinuxBridges(runner, TUNNEL_IP)
    bridges.add_fdb_peer(1001, "192.0.2.11")
    bridges.add_fdb_peer(1001, "192.0.2.11")
    assert runner.commands == ["bridge fdb append 00:00:00:00:00:00 dev vxlan-1001 dst 192.0.2.11"] * 2
    assert runner.fdb == {("vxlan-1001", "192.0.2.11")}
    bridges.remove_fdb_peer(1001, "192.0.2.11")
    bridges.remove_fdb_peer(1001, "192.0.2.11")  # already gone: success
    assert runner.fdb == set()
    assert runner.commands[-1] == "bridge fdb del 00:00:00:00:00:00 dev vxlan-1001 dst 192.0.2.11"


# The build family ----------------------------------------------------------------------------------


class TapMakingDriver(FakeDriver):
    """A fake hypervisor that does to the fake runner's links what libvirt does to the host's: a
    domain's taps appear on their bridges when it starts (which must exist then) and go with it."""

    def __init__(self, runner: FakeRunner) -> None:
        super().__init__()
        self.runner = runner

    def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
        for network in spec.get("networks") or ():
            if network["bridge"] not in self.runner.links:
                from compute_workers.exception import HypervisorError
                raise HypervisorError(f"Cannot get interface MTU on '{network['bridge']}': No such device")
        super().spawn(spec, base_image)
        for network in spec.get("networks") or ():
            self.runner.links[network["tap"]] = {"flags": ["UP"], "master": network["bridge"]}

    def destroy(self, instance_uuid: str) -> None:
        instance = self.instances.get(instance_uuid)
        super().destroy(instance_uuid)
        for network in (instance.spec.get("networks") or ()) if instance else ():
            self.runner.links.pop(network["tap"], None)


def bridged_manager(tmp_path: Path, runner: FakeRunner) -> tuple[ComputeManager, ListReporter]:
    reporter = ListReporter()
    manager = ComputeManager(make_config(tmp_path / "instances"), TapMakingDriver(runner), reporter,
                             bridges=LinuxBridges(runner, TUNNEL_IP))
    manager.init_host()
    return manager, reporter


def test_spawn_plugs_before_the_domain_and_terminate_removes_unused_bridges(
        tmp_path: Path, runner: FakeRunner, make_spec: SpecFactory) -> None:
    manager, reporter = bridged_manager(tmp_path, runner)
    shared = network_spec("vxlan", 1001)
    own = network_spec("flat", None, 1500)
    first = make_spec(networks=[shared, own])
    second = make_spec(networks=[{**network_spec("vxlan", 1001, network_id=shared["network_id"]),
                                  "mac_address": "fa:16:3e:00:00:02"}])
    build = manager.family(Build)
    build.spawn(first)
    assert reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]["values"]["vm_state"] == "active"
    plug = [r["event"] for r in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
            if r["event"]["name"] == "compute_plug_vifs"]
    assert plug[0]["result"] == "success"
    assert plug[0]["message"].startswith(f"bridges {shared['bridge']}, {own['bridge']} ready on ")
    build.spawn(second)
    commands = len(runner.commands)
    build.spawn(second)  # redelivered: the domain exists and runs, nothing is made again
    assert runner.commands[commands:] == []
    assert manager.driver.instance_bridges(first["instance_uuid"]) == [shared["bridge"], own["bridge"]]

    build.terminate(first["instance_uuid"])  # the shared bridge keeps the second guest's tap
    assert shared["bridge"] in runner.links and "vxlan-1001" in runner.links
    assert own["bridge"] not in runner.links
    build.terminate(second["instance_uuid"])
    assert set(runner.links) == set()
    assert [n for n, _ in reporter.reports].count(contract.CONDUCTOR_INSTANCE_DESTROYED) == 2


def test_plug_failure_is_a_build_failure_the_user_can_act_on(
        tmp_path: Path, runner: FakeRunner, make_spec: SpecFactory) -> None:
    manager, reporter = bridged_manager(tmp_path, runner)
    network = network_spec("vxlan", 1001)
    # What the kernel says when another device already has this VNI, port and local address.
    runner.fail["ip link add vxlan"] = "RTNETLINK answers: File exists"
    spec = make_spec(networks=[network])
    manager.family(Build).spawn(spec)
    failed = reporter.named(contract.CONDUCTOR_BUILD_FAILED)
    assert len(failed) == 1 and failed[0]["reschedule"] is True
    assert failed[0]["fault"]["message"] == (
        f"cannot create VXLAN vxlan-1001 of network {network['network_id']} on bridge {network['bridge']}: "
        "RTNETLINK answers: File exists")
    assert manager.driver.list_instances() == {}
    assert network["bridge"] not in runner.links  # the half-made plug is not left behind


def test_recorded_bridges_of_drivers_without_host_devices(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, _reporter = make_manager(FakeDriver(), tmp_path / "instances")
    bridges = manager.context.bridges
    assert isinstance(bridges, RecordedBridges)
    shared = network_spec()
    first, second = make_spec(networks=[shared]), make_spec(networks=[shared])
    manager.family(Build).spawn(first)
    manager.family(Build).spawn(second)
    assert list(bridges.bridges) == [shared["bridge"]]
    manager.family(Build).terminate(first["instance_uuid"])
    assert list(bridges.bridges) == [shared["bridge"]]  # the second guest still uses it
    manager.family(Build).terminate(second["instance_uuid"])
    assert bridges.bridges == {} and bridges.removed == [shared["bridge"]]


# The guests' interfaces ----------------------------------------------------------------------------


def two_networks() -> list[contract.NetworkSpec]:
    return [network_spec("vxlan", 1001, 1450, mac="fa:16:3e:00:00:01"),
            network_spec("flat", None, 1500, mac="fa:16:3e:00:00:02")]


def test_fake_driver_records_the_interfaces_in_order(make_spec: SpecFactory) -> None:
    driver = FakeDriver()
    networks = two_networks()
    spec = make_spec(networks=networks)
    driver.spawn(spec, None)
    assert driver.instances[spec["instance_uuid"]].interfaces == [
        {"type": "bridge", "mac": n["mac_address"], "bridge": n["bridge"], "tap": n["tap"], "model": "virtio",
         "mtu": n["mtu"]} for n in networks]
    no_networks = make_spec()
    driver.spawn(no_networks, None)
    assert driver.instances[no_networks["instance_uuid"]].interfaces == []


def test_libvirt_test_driver_defines_the_interfaces_in_order(tmp_path: Path, make_spec: SpecFactory) -> None:
    driver = LibvirtTestDriver("test:///default", tmp_path / "instances")
    driver.init_host()
    networks = two_networks()
    spec = make_spec(networks=networks)
    driver.spawn(spec, None)
    try:
        domain = driver.conn.lookupByName(contract.domain_name(spec["instance_uuid"]))
        interfaces = ET.fromstring(domain.XMLDesc(0)).findall("devices/interface")
        assert [(i.get("type"), i.find("mac").get("address"), i.find("source").get("bridge"),  # type: ignore[union-attr]
                 i.find("target").get("dev"), i.find("model").get("type"),  # type: ignore[union-attr]
                 i.find("mtu").get("size")) for i in interfaces] == [  # type: ignore[union-attr]
            ("bridge", n["mac_address"], n["bridge"], n["tap"], "virtio", str(n["mtu"])) for n in networks]
        assert driver.instance_bridges(spec["instance_uuid"]) == [n["bridge"] for n in networks]
        # The same definition in the instance's libvirt.xml (what hard reboot regenerates).
        written = ET.parse(tmp_path / "instances" / spec["instance_uuid"] / "libvirt.xml")
        assert len(written.findall("devices/interface")) == 2
        assert not driver.capabilities["plugs_host_bridges"]
        no_networks = make_spec()
        driver.spawn(no_networks, None)
        domain = driver.conn.lookupByName(contract.domain_name(no_networks["instance_uuid"]))
        assert ET.fromstring(domain.XMLDesc(0)).findall("devices/interface") == []
        driver.destroy(no_networks["instance_uuid"])
    finally:
        driver.destroy(spec["instance_uuid"])
        driver.close()


# The other families that (re)define a domain ------------------------------------------------------


def test_families_that_define_a_domain_ensure_its_bridges(tmp_path: Path, runner: FakeRunner,
                                                           make_spec: SpecFactory) -> None:
    """Hard reboot, power on and finish resize regenerate the definition from the spec: its bridges are
    ensured first (here deleted behind the worker's back, then made again); a live migration's
    destination makes them before the guest comes and holds them until it came or was rolled back."""
    from compute_workers.operations import Lifecycle, LiveMigration, Resize

    from .test_resize import resize_to

    instances = tmp_path / "instances"
    reporter = ListReporter()
    manager = ComputeManager(make_config(instances, COMPUTE_LIBVIRT_URI="test:///default"),
                             LibvirtTestDriver("test:///default", instances), reporter,
                             bridges=LinuxBridges(runner, TUNNEL_IP))
    manager.init_host()
    bridges = manager.context.bridges
    network = network_spec("vxlan", 1003)
    spec = make_spec(networks=[network])
    instance_uuid = spec["instance_uuid"]
    try:
        manager.family(Build).spawn(spec)
        lifecycle = manager.family(Lifecycle)
        for name, step in (
                ("hard reboot", lambda: lifecycle.reboot_instance(instance_uuid, 1, "HARD", spec)),
                ("power on", lambda: (lifecycle.power_off_instance(instance_uuid, 2, 0), runner.links.clear(),
                                      lifecycle.power_on_instance(instance_uuid, 3, spec))),
                ("finish resize", lambda: resize_to(manager, spec, 4))):
            runner.links.clear()  # someone removed the bridge and the VXLAN
            step()
            assert {network["bridge"], "vxlan-1003"} <= set(runner.links), name
        # A revert: the resized domain goes (its bridges with it: nothing else uses them), the old one is
        # defined again (its bridges made again first).
        manager.family(Resize).revert_resize(instance_uuid, 4)
        assert runner.links == {}
        manager.family(Resize).finish_revert_resize(instance_uuid, 4, spec, True)
        assert reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]["status"] == "reverted"
        assert {network["bridge"], "vxlan-1003"} <= set(runner.links)
        manager.family(Build).terminate(instance_uuid)
        assert reporter.named(contract.CONDUCTOR_INSTANCE_DESTROYED)
        assert runner.links == {}  # no tap on it (the test driver makes none): removed

        migrating = make_spec(networks=[network])
        live = manager.family(LiveMigration)
        live.pre_live_migration(migrating["instance_uuid"], 5, migrating, True, False, None)
        prepared = reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]
        assert prepared["status"] == "prepared", prepared
        assert f"made bridge {network['bridge']}, VXLAN vxlan-1003" in prepared["event"]["message"]
        assert bridges.remove_bridge_if_unused(network["bridge"]) is False  # held for the coming guest
        manager.family(LiveMigration).rollback_live_migration_at_destination(migrating["instance_uuid"], 5,
                                                                             False)
        assert reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]["status"] == "rolled_back"
        assert runner.links == {}
    finally:
        for uuid_ in manager.driver.list_instances():
            manager.driver.destroy(uuid_)
        manager.close()


def test_a_host_namespace_runs_the_node_namespaces_commands_from_the_workers_own() -> None:
    # COMPUTE_NETWORK_NAMESPACE: the host's devices in that namespace (ip netns exec), but qdhcp-/qrouter-
    # namespaces added from the worker's own mount namespace, where they outlive the command.
    inside = CommandRunner("cch-host", timeout=7)
    outside = namespaces_runner(inside)
    assert isinstance(outside, CommandRunner) and (outside.netns, outside.timeout) == (None, 7)
    assert namespaces_runner(CommandRunner()) is None
    assert namespaces_runner(FakeRunner()) is None
