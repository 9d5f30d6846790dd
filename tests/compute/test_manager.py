"""The thin ComputeManager: what the host itself reports (heartbeat, host_init, power-state updates from
lifecycle events) and how it hands out its operation families. Run against the fake driver and
LibvirtTestDriver (test:///default)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.manager import ComputeManager
from compute_workers.operations import FAMILIES, Build, Lifecycle, OperationFamily
from compute_workers.operations.base import HostContext
from compute_workers.reporter import ListReporter
from compute_workers.virt.fake import FakeDriver
from compute_workers.virt.libvirt.driver import LibvirtDriver

from .conftest import HOST, Managed, SpecFactory, make_config, make_manager, spawned

# Families ---------------------------------------------------------------------------------------------

def test_every_family_is_built_once_per_manager_on_the_managers_parts(tmp_path: Path) -> None:
    manager, _ = make_manager(FakeDriver(), tmp_path)
    other, _ = make_manager(FakeDriver(), tmp_path / "other")
    for family in FAMILIES:
        ops = manager.family(family)
        assert isinstance(ops, family) and manager.family(family) is ops and other.family(family) is not ops
        assert ops.driver is manager.driver and ops.reporter is manager.reporter
        assert ops.instance_locks is manager.instance_locks and ops.journal is manager.journal


def test_a_new_family_plugs_in_and_an_absent_one_is_named(tmp_path: Path) -> None:
    class Consoles(OperationFamily):
        def __init__(self, context: HostContext) -> None:
            super().__init__(context)
            self.opened: list[str] = []

    manager = ComputeManager(make_config(tmp_path), FakeDriver(), ListReporter(), families=(Build, Consoles))
    assert manager.family(Consoles).host == HOST
    with pytest.raises(LookupError, match="no Lifecycle operations"):
        manager.family(Lifecycle)


# Heartbeat, power-state updates and host_init ------------------------------------------------------------

def test_heartbeat_sends_every_resource_key(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(FakeDriver(vcpus=8, memory_mb=4096, disk_gb=40), tmp_path,
                                     COMPUTE_DRIVER="fake")
    spec = make_spec()
    manager.family(Build).spawn(spec)
    manager.heartbeat()
    beat = reporter.named(contract.CONDUCTOR_HOST_HEARTBEAT)[0]
    assert beat["host"] == HOST
    assert set(beat["resources"]) == set(contract.HEARTBEAT_RESOURCE_KEYS)
    assert beat["resources"]["vcpus"] == 8 and beat["resources"]["memory_mb"] == 4096
    assert beat["resources"]["driver"] == "fake"
    assert beat["resources"]["instances"] == {spec["instance_uuid"]: "running"}


def wait_for_power_state(reporter: ListReporter, instance_uuid: str, power_state: str,
                         timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for update in reporter.named(contract.CONDUCTOR_POWER_STATE_UPDATE):
            if update["instance_uuid"] == instance_uuid and update["power_state"] == power_state:
                return update
        time.sleep(0.01)
    raise AssertionError(f"no power_state_update {power_state} of {instance_uuid} within {timeout} s: "
                         f"{reporter.named(contract.CONDUCTOR_POWER_STATE_UPDATE)}")


def test_a_guest_powering_itself_off_is_reported_by_a_lifecycle_event(managed: Managed,
                                                                      make_spec: SpecFactory) -> None:
    manager, reporter = managed
    manager.watch_power_states()
    uuid = spawned(manager, reporter, make_spec())
    reporter.reports.clear()
    before = time.time()
    if isinstance(manager.driver, FakeDriver):
        manager.driver.guest_power_off(uuid)
    else:
        assert isinstance(manager.driver, LibvirtDriver)
        manager.driver.conn.lookupByName(contract.domain_name(uuid)).shutdown()  # not through the manager
    update = wait_for_power_state(reporter, uuid, contract.POWER_SHUTDOWN)
    assert update["host"] == HOST
    assert before <= update["observed_at"] <= time.time()
    assert set(update) == {"host", "instance_uuid", "power_state", "observed_at"}
    assert reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE) == []


def test_operations_and_deletes_are_reported_as_they_are_now(managed: Managed,
                                                             make_spec: SpecFactory) -> None:
    manager, reporter = managed
    manager.watch_power_states()
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    manager.family(Lifecycle).suspend_instance(uuid, 1)
    wait_for_power_state(reporter, uuid, contract.POWER_SUSPENDED)
    manager.family(Build).terminate(uuid)
    wait_for_power_state(reporter, uuid, contract.POWER_NOSTATE)


def test_power_states_are_read_when_sent_and_a_burst_is_sent_once(tmp_path: Path,
                                                                  make_spec: SpecFactory) -> None:
    release, stuck = threading.Event(), threading.Event()

    class SlowReader(FakeDriver):
        def get_info(self, instance_uuid: str) -> str:
            if threading.current_thread().name == "power-state-events":
                stuck.set()
                release.wait(5)
            return super().get_info(instance_uuid)

    driver = SlowReader()
    manager, reporter = make_manager(driver, tmp_path)
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    other = spawned(manager, reporter, make_spec())
    manager.watch_power_states()
    try:
        assert manager._power_events is not None
        manager._power_events.notify(HOST, other)
        assert stuck.wait(5)  # the sender is reading the state of the other instance
        for _ in range(50):
            manager._power_events.notify(HOST, uuid)
        driver.instances[uuid].power_state = contract.POWER_PAUSED  # what it is by the time it is read
        release.set()
        wait_for_power_state(reporter, uuid, contract.POWER_PAUSED)
        time.sleep(0.1)
        sent = [u for u in reporter.named(contract.CONDUCTOR_POWER_STATE_UPDATE)
                if u["instance_uuid"] == uuid]
        assert [u["power_state"] for u in sent] == [contract.POWER_PAUSED]
    finally:
        release.set()
        manager.close()


def test_a_failing_send_does_not_stop_the_power_state_updates(tmp_path: Path, make_spec: SpecFactory) -> None:
    failed = threading.Event()

    class FlakyReporter(ListReporter):
        def report(self, task_name: str, **kwargs: Any) -> None:
            if task_name == contract.CONDUCTOR_POWER_STATE_UPDATE and not failed.is_set():
                failed.set()
                raise ConnectionError("broker away")
            super().report(task_name, **kwargs)

    driver = FakeDriver()
    reporter = FlakyReporter()
    manager = ComputeManager(make_manager(driver, tmp_path)[0].config, driver, reporter)
    manager.watch_power_states()
    try:
        spec = make_spec()
        manager.family(Build).spawn(spec)  # its event's update is lost
        assert failed.wait(5)
        driver.pause(spec["instance_uuid"])
        wait_for_power_state(reporter, spec["instance_uuid"], contract.POWER_PAUSED)
    finally:
        manager.close()


def test_host_init_reports_the_heartbeat_resources(managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    uuid = spawned(manager, reporter, make_spec())
    manager.family(Lifecycle).suspend_instance(uuid, 1)
    reporter.reports.clear()
    manager.host_init()
    (name, kwargs), = reporter.reports
    assert name == contract.CONDUCTOR_HOST_INIT and kwargs["host"] == HOST
    assert set(kwargs["resources"]) == set(contract.HEARTBEAT_RESOURCE_KEYS)
    assert kwargs["resources"]["instances"] == {uuid: contract.POWER_SUSPENDED}
