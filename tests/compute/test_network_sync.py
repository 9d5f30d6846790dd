"""compute.network_host_sync with the fake driver (the desired state recorded, nothing run), the state
checker, the generation, and the families that apply a port's filtering before its guest starts and
remove it when the guest goes."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.network.firewall import RecordedFirewall
from compute_workers.network.host import HostNetworkError, checked_state
from compute_workers.network.linuxbridge import RecordedBridges
from compute_workers.operations import Build, Lifecycle, Network, Resize
from compute_workers.virt.fake import FakeDriver

from .conftest import HOST, SpecFactory, make_manager
from .test_firewall import RULES
from .test_linuxbridge import network_spec


def host_network(network_id: str, vni: int | None = 1001,
                 peers: list[str] | None = None) -> contract.HostNetwork:
    return {"network_id": network_id, "bridge": contract.bridge_name(network_id),
            "provider_type": "vxlan" if vni is not None else "flat", "segmentation_id": vni, "mtu": 1450,
            "peers": peers or []}


def secured(network: contract.NetworkSpec, rules: list[contract.SecurityRuleSpec] = RULES,
            enabled: bool = True) -> contract.NetworkSpec:
    return {**network, "security": {"enabled": enabled, "allowed_addresses": [
        {"mac_address": network["mac_address"], "ip_address": network["fixed_ips"][0]["ip_address"]}],
        "rules": rules}}


def state(generation: int, networks: list[contract.HostNetwork],
          ports: list[contract.NetworkSpec]) -> contract.HostNetworkState:
    return {"host": HOST, "generation": generation, "networks": networks, "ports": ports}


@pytest.fixture
def family(tmp_path: Path) -> Network:
    manager, _ = make_manager(FakeDriver(), tmp_path / "instances")
    return manager.family(Network)


def test_the_family_records_bridges_peers_and_filtering(family: Network, tmp_path: Path) -> None:
    bridges, firewall = family.bridges, family.firewall
    assert isinstance(bridges, RecordedBridges) and isinstance(firewall, RecordedFirewall)
    a, b = network_spec("vxlan", 1001), network_spec("flat", None)
    first = state(5, [host_network(a["network_id"], 1001, ["192.0.2.2", "192.0.2.3"]),
                      host_network(b["network_id"], None)], [secured(a), secured(b, enabled=False)])
    done = family.network_host_sync(first)
    assert done == [f"bridge {a['bridge']}", f"bridge {b['bridge']}", "peer 192.0.2.2 of vxlan-1001",
                    "peer 192.0.2.3 of vxlan-1001", f"firewall {a['tap']}"]
    assert set(bridges.bridges) == {a["bridge"], b["bridge"]} and bridges.peers == {1001: {"192.0.2.2",
                                                                                             "192.0.2.3"}}
    assert firewall.applied() == {a["tap"]}  # b's port security is off: no chains
    assert family.network_host_sync(first) == []  # the same state again: nothing to do
    assert (tmp_path / "instances" / "_network" / "generation").read_text() == "5\n"

    # Older than the last applied: ignored.
    assert family.network_host_sync(state(4, [], [])) == []
    assert firewall.applied() == {a["tap"]}

    # The peer set shrinks, b's network goes: its bridge is released and removed, a keeps its.
    second = state(6, [host_network(a["network_id"], 1001, ["192.0.2.3"])], [secured(a, RULES[:1])])
    assert family.network_host_sync(second) == ["peer 192.0.2.2 of vxlan-1001 removed",
                                                f"firewall {a['tap']}", f"bridge {b['bridge']} removed"]
    assert bridges.peers == {1001: {"192.0.2.3"}} and set(bridges.bridges) == {a["bridge"]}

    # The last port goes: no chains, no bridge.
    assert family.network_host_sync(state(7, [], [])) == [f"firewall of {a['tap']} removed",
                                                          f"bridge {a['bridge']} removed"]
    assert bridges.bridges == {} and firewall.applied() == set() and bridges.peers == {}


def test_the_generation_survives_a_restart(tmp_path: Path) -> None:
    manager, _ = make_manager(FakeDriver(), tmp_path / "instances")
    assert manager.family(Network).network_host_sync(state(9, [], [])) == []
    restarted, _ = make_manager(FakeDriver(), tmp_path / "instances")
    family = restarted.family(Network)
    assert family.networking.generation == 9
    a = network_spec("flat", None)
    assert family.network_host_sync(state(8, [], [secured(a)])) == []  # stale, redelivered after the restart
    assert family.network_host_sync(state(9, [], [secured(a)])) != []  # the same generation again converges


def test_a_bridge_someone_else_holds_survives(family: Network) -> None:
    a = network_spec("vxlan", 1001)
    family.network_host_sync(state(1, [host_network(a["network_id"])], [secured(a)]))
    family.bridges.hold("migration-x", [a])  # e.g. a live migration's destination, a DHCP port's bridge
    assert family.network_host_sync(state(2, [], [])) == [f"firewall of {a['tap']} removed"]
    assert a["bridge"] in family.bridges.bridges  # type: ignore[attr-defined]
    family.bridges.release("migration-x")
    assert family.network_host_sync(state(3, [], [])) == [f"bridge {a['bridge']} removed"]


def test_a_refusal_names_the_field() -> None:
    a = network_spec("flat", None)
    with pytest.raises(HostNetworkError, match=r"^ports\[0\]\.tap must be"):
        checked_state(state(1, [], [{**a, "tap": "tapevil"}]), HOST)
    with pytest.raises(HostNetworkError, match=r"^networks\[0\]\.segmentation_id must be a VNI"):
        checked_state(state(1, [{**host_network("n1"), "segmentation_id": 0}], []), HOST)


@pytest.mark.parametrize("change", [
    {"host": "other-host"}, {"generation": -1}, {"generation": "7"}, {"networks": {}},
    {"networks": [{**host_network("n1"), "bridge": "brqevil"}]},
    {"networks": [{**host_network("n1"), "peers": ["not-an-ip"]}]},
    {"networks": [{**host_network("n1"), "segmentation_id": None}]},
    {"networks": [{**host_network("n1"), "mtu": 10}]},
    {"networks": [{**host_network("n1", None), "segmentation_id": 1000}]},
    {"ports": [{**network_spec("flat", None), "mac_address": "nope"}]},
    {"ports": [{**network_spec("flat", None), "tap": "tapevil"}]},
    {"ports": [secured(network_spec("flat", None), [{**RULES[0], "protocol": "tcp -j ACCEPT"}])]},
])
def test_malformed_states_change_nothing(family: Network, change: dict[str, Any]) -> None:
    a = network_spec("flat", None)
    good = state(1, [host_network(a["network_id"], None)], [secured(a)])
    bad = {**copy.deepcopy(good), **change}
    with pytest.raises(HostNetworkError):
        checked_state(bad, HOST)
    assert family.network_host_sync(bad) == []  # logged, not raised
    assert family.bridges.bridges == {} and family.firewall.applied() == set()  # type: ignore[attr-defined]
    assert family.network_host_sync(good) != []
    assert family.network_host_sync("nonsense") == []


def test_spawn_applies_the_filtering_before_the_guest_starts_and_terminate_removes_it(
        tmp_path: Path, make_spec: SpecFactory) -> None:
    driver = FakeDriver()
    manager, reporter = make_manager(driver, tmp_path / "instances")
    firewall = manager.context.firewall
    assert isinstance(firewall, RecordedFirewall)
    network = secured(network_spec("flat", None))
    old = network_spec("flat", None, port_id="22222222-0000-4000-8000-000000000000")  # no security: old spec
    seen: list[set[str]] = []
    spawn = driver.spawn

    def spawn_and_look(spec: dict[str, Any], base_image: Path | None) -> None:
        seen.append(firewall.applied())
        spawn(spec, base_image)

    driver.spawn = spawn_and_look  # type: ignore[method-assign]
    spec = make_spec(networks=[network, old])
    manager.family(Build).spawn(spec)
    assert seen == [{network["tap"]}]
    plug = [r["event"]["message"] for r in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
            if r["event"] and r["event"]["name"] == "compute_plug_vifs"]
    assert plug and f"firewall {network['tap']}" in plug[0]

    firewall.remove([network["tap"]])  # e.g. lost: a hard reboot applies it again
    manager.family(Lifecycle).reboot_instance(spec["instance_uuid"], 1, "HARD", spec)
    assert firewall.applied() == {network["tap"]}

    manager.family(Build).terminate(spec["instance_uuid"])
    assert firewall.applied() == set() and firewall.removed[-1] == network["tap"]


def test_a_live_migration_moves_the_filtering(tmp_path: Path, make_spec: SpecFactory) -> None:
    """The destination applies it before the guest comes (and drops it on a rollback); the source
    removes it once the guest has left."""
    from .test_live_migration import Host, migrate

    network = secured(network_spec("flat", None))
    source, dest = Host(tmp_path, "src"), Host(tmp_path, "dst")
    try:
        spec = make_spec(host=source.name, networks=[network])
        source.manager.family(Build).spawn(spec)
        assert source.manager.context.firewall.applied() == {network["tap"]}
        uuid, dest_spec = spec["instance_uuid"], {**spec, "host": dest.name}

        dest.live.pre_live_migration(uuid, 1, dest_spec, True, False, None)
        assert dest.manager.context.firewall.applied() == {network["tap"]}
        dest.live.rollback_live_migration_at_destination(uuid, 1, False)
        assert dest.manager.context.firewall.applied() == set()

        dest.live.pre_live_migration(uuid, 2, dest_spec, True, False, None)
        migrate(source, dest, spec, 2)
        assert source.statuses(2)[-1] == contract.MIGRATION_MIGRATED
        assert source.manager.context.firewall.applied() == set()
        assert dest.manager.context.firewall.applied() == {network["tap"]}
    finally:
        source.manager.close()
        dest.manager.close()


def test_confirm_resize_removes_the_filtering_left_on_the_source(tmp_path: Path,
                                                                 make_spec: SpecFactory) -> None:
    from .test_resize import resize_to

    network = secured(network_spec("flat", None))
    manager, _ = make_manager(FakeDriver(), tmp_path / "instances")
    spec = make_spec(networks=[network])
    manager.family(Build).spawn(spec)
    resize_to(manager, spec, 1)  # a same-host resize: the taps stay the instance's
    manager.family(Resize).confirm_resize(spec["instance_uuid"], 1)
    assert manager.context.firewall.applied() == {network["tap"]}
    manager.context.migration_journal.record(2, "resize_instance", spec["instance_uuid"], "success",
                                             dest_host="elsewhere", taps=[network["tap"]])
    manager.family(Resize).confirm_resize(spec["instance_uuid"], 2)
    assert manager.context.firewall.applied() == set()


def test_a_live_migrations_destination_waits_for_the_state_holding_its_ports(
        tmp_path: Path, make_spec: SpecFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state that carries the incoming ports (and so their networks' flood peers) is a task of its
    own, sent at the same commit as pre_live_migration: the destination is prepared only once it is
    applied, so that no guest is switched over to a host that cannot flood its packets anywhere."""
    import threading

    from compute_workers.operations import live_migration

    from .test_live_migration import Host

    network = secured(network_spec("vxlan", 1001))
    dest = Host(tmp_path, "dst")
    try:
        dest.driver.capabilities = {**dest.driver.capabilities, "plugs_host_bridges": True}
        spec = {**make_spec(host=dest.name, networks=[network]), "host": dest.name}
        uuid = spec["instance_uuid"]
        sync = dest.manager.family(Network)
        incoming = {**state(9, [host_network(network["network_id"], 1001, ["192.0.2.7"])], [network]),
                    "host": dest.name}
        timer = threading.Timer(0.3, sync.network_host_sync, [incoming])
        timer.start()
        started = time.monotonic()
        dest.live.pre_live_migration(uuid, 1, spec, True, False, None)
        timer.join()
        assert time.monotonic() - started >= 0.3
        assert dest.statuses(1) == [contract.MIGRATION_PREPARED]
        assert dest.manager.context.bridges.peers == {1001: {"192.0.2.7"}}  # type: ignore[attr-defined]
        assert "network state with its ports applied" in dest.updates(1)[-1]["event"]["message"]

        # Never sent (lost): the migration goes on after the wait, and says so.
        monkeypatch.setattr(live_migration, "NETWORK_STATE_WAIT", 0.2)
        sync.network_host_sync({**state(10, [], []), "host": dest.name})
        dest.live.pre_live_migration(uuid, 2, spec, True, False, None)
        assert dest.statuses(2) == [contract.MIGRATION_PREPARED]
        assert "no network state with its ports" in dest.updates(2)[-1]["event"]["message"]
    finally:
        dest.manager.close()
