"""The typed contract: its enumerations are the one definition of the states, and reports are checked
at the conductor's boundary (pure: no Django, no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from compute_workers import contract
from compute_workers.contract import (
    ActionResult,
    EventResult,
    PowerState,
    ReportError,
    TaskState,
    VmState,
)


def test_every_power_state_has_one_truthful_vm_state() -> None:
    assert set(contract.VM_STATE_OF_POWER_STATE) == set(PowerState)
    assert contract.VM_STATE_OF_POWER_STATE[PowerState.RUNNING] is VmState.ACTIVE
    assert contract.VM_STATE_OF_POWER_STATE[PowerState.NOSTATE] is VmState.ERROR
    # Plain strings from JSON find the same entries: the members are str.
    assert contract.VM_STATE_OF_POWER_STATE[PowerState("shutdown")] == "stopped"


def test_enumerations_travel_as_their_plain_values() -> None:
    import json

    payload = {"vm_state": VmState.ACTIVE, "task_state": TaskState.SPAWNING, "result": ActionResult.SUCCESS}
    assert json.loads(json.dumps(payload)) == {"vm_state": "active", "task_state": "spawning",
                                               "result": "Success"}


def test_valid_instance_values_pass_with_their_members() -> None:
    checked = contract.validate_values({"vm_state": "active", "task_state": None, "power_state": "running"})
    assert checked == {"vm_state": VmState.ACTIVE, "task_state": None, "power_state": PowerState.RUNNING}
    assert contract.validate_values({"task_state": "image_uploading"}) == {
        "task_state": TaskState.IMAGE_UPLOADING}


@pytest.mark.parametrize(("values", "reason"), [
    ({"vm_state": "running"}, "vm_state 'running' is not one of"),
    ({"task_state": "napping"}, "task_state 'napping' is not one of"),
    ({"power_state": "off"}, "power_state 'off' is not one of"),
    ({"host": "elsewhere"}, r"values cannot set \['host'\]"),
    (["active"], "values must be a JSON object"),
])
def test_malformed_instance_values_are_refused_with_the_reason(values: Any, reason: str) -> None:
    with pytest.raises(ReportError, match=reason):
        contract.validate_values(values)


def test_events_and_faults_are_checked_and_normalised() -> None:
    assert contract.validate_event(None) is None and contract.validate_fault(None) is None
    assert contract.validate_event({"name": "compute_spawn", "result": "success"}) == {
        "name": "compute_spawn", "result": EventResult.SUCCESS, "message": ""}
    assert contract.validate_event({"name": "live_migration", "result": "cancelled", "message": "m"})[
        "result"] is EventResult.CANCELLED
    assert contract.validate_fault({"message": "disk full"}) == {"message": "disk full", "code": 500,
                                                                 "details": ""}
    with pytest.raises(ReportError, match="event result 'done' is not one of"):
        contract.validate_event({"name": "x", "result": "done"})
    with pytest.raises(ReportError, match="non-empty name"):
        contract.validate_event({"result": "success"})
    with pytest.raises(ReportError, match="fault must be an object with a message"):
        contract.validate_fault({"code": 500})
    with pytest.raises(ReportError, match="fault code 'x' is not an integer"):
        contract.validate_fault({"message": "m", "code": "x"})


def test_progress_keeps_the_contract_keys_and_refuses_negative_figures() -> None:
    checked = contract.validate_progress({"memory_total": 10, "memory_remaining": 4, "observed_at": 1.5,
                                          "junk": 3})
    assert checked == {"memory_total": 10, "memory_remaining": 4, "observed_at": 1.5}
    with pytest.raises(ReportError, match=r"progress\.disk_total must be a non-negative integer"):
        contract.validate_progress({"disk_total": -1})
    with pytest.raises(ReportError, match=r"progress\.disk_total must be a non-negative integer"):
        contract.validate_progress({"disk_total": True})


def test_spawn_spec_validation_returns_the_typed_spec() -> None:
    spec = {"version": 1, "instance_uuid": "u", "name": "n", "host": "h",
            "flavor": {"name": "f", "vcpus": 1, "memory_mb": 64, "root_gb": 1},
            "image": {"id": "i", "url": "http://127.0.0.1/i", "sha256": "0" * 64, "disk_format": "qcow2"}}
    assert contract.validate_spec(spec) is spec
    with pytest.raises(contract.SpecError, match="unsupported disk_format 'vmdk'"):
        contract.validate_spec({**spec, "image": {**spec["image"], "disk_format": "vmdk"}})


def test_network_device_names_are_neutrons_and_fit_linux() -> None:
    network_id = "3f2a9c4e-1b2d-4e5f-8a9b-0c1d2e3f4a5b"
    port_id = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
    assert contract.bridge_name(network_id) == "brq3f2a9c4e-1b"
    assert contract.tap_name(port_id) == "tapa1b2c3d4-e5"
    assert all(len(name) <= 15 for name in (contract.bridge_name(network_id), contract.tap_name(port_id)))


def _nic(**changes: Any) -> dict[str, Any]:
    network_id, port_id = "3f2a9c4e-1b2d-4e5f-8a9b-0c1d2e3f4a5b", "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
    nic = {"port_id": port_id, "network_id": network_id, "mac_address": "fa:16:3e:00:00:01",
           "fixed_ips": [{"ip_address": "10.0.0.2", "subnet_id": "s", "cidr": "10.0.0.0/24",
                          "gateway_ip": "10.0.0.1"}],
           "mtu": 1450, "provider_type": "vxlan", "segmentation_id": 1000,
           "bridge": contract.bridge_name(network_id), "tap": contract.tap_name(port_id)}
    nic.update(changes)
    return nic


@pytest.mark.parametrize(("networks", "reason"), [
    ({}, r"spec\.networks must be a list"),
    (["x"], r"spec\.networks\[0\] must be an object"),
    ([_nic(port_id="")], r"spec\.networks\[0\]\.port_id must be a non-empty string"),
    ([_nic(provider_type="vlan")], r"provider_type must be vxlan or flat"),
    ([_nic(mtu=20)], r"spec\.networks\[0\]\.mtu must be an integer in 68\.\.65535, not 20"),
    ([_nic(mtu=65536)], r"mtu must be an integer in 68\.\.65535"),
    ([_nic(segmentation_id=None)], r"segmentation_id must be a VNI in 1\.\.16777215 for a vxlan network"),
    ([_nic(segmentation_id="1000")], r"segmentation_id must be a VNI"),
    ([_nic(segmentation_id=2 ** 24)], r"segmentation_id must be a VNI"),
    ([_nic(provider_type="flat")], r"segmentation_id must be null for a flat network"),
    ([_nic(network_id="../etc")], r"network_id must be an id"),
    ([_nic(mac_address="nope")], r"mac_address must be a MAC address, not 'nope'"),
    ([_nic(bridge="br0")], r"spec\.networks\[0\]\.bridge must be brq3f2a9c4e-1b, not 'br0'"),
    ([_nic(tap="tap0")], r"spec\.networks\[0\]\.tap must be tapa1b2c3d4-e5, not 'tap0'"),
    ([_nic(fixed_ips=None)], r"fixed_ips must be a list"),
    ([_nic(fixed_ips=[{"ip_address": "10.0.0.2"}])], r"fixed_ips\[0\]\.subnet_id must be a string"),
    ([_nic(fixed_ips=[{"ip_address": "1", "subnet_id": "s", "cidr": "c", "gateway_ip": 5}])],
     r"gateway_ip must be a string or null"),
])
def test_spawn_spec_networks_are_checked(networks: Any, reason: str) -> None:
    spec = {"version": 1, "instance_uuid": "u", "name": "n", "host": "h",
            "flavor": {"name": "f", "vcpus": 1, "memory_mb": 64, "root_gb": 1},
            "image": {"id": "i", "url": "http://127.0.0.1/i", "sha256": "0" * 64, "disk_format": "qcow2"}}
    flat = _nic(provider_type="flat", segmentation_id=None,
                fixed_ips=[{"ip_address": "10.0.0.2", "subnet_id": "s", "cidr": "10.0.0.0/24",
                            "gateway_ip": None}])
    good = {**spec, "networks": [_nic(), flat]}
    assert contract.validate_spec(good) is good
    with pytest.raises(contract.SpecError, match=reason):
        contract.validate_spec({**spec, "networks": networks})
