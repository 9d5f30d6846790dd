"""One contract, every driver: the same tests run against FakeDriver and LibvirtTestDriver (test:///default)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute_workers import contract
from compute_workers.exception import (
    HypervisorError,
    InstanceExists,
    InstanceInvalidState,
    InstanceNotFound,
    InvalidInstanceUUID,
)
from compute_workers.virt.driver import CAPABILITY_NAMES, DRIVER_RESOURCE_KEYS, ComputeDriver
from compute_workers.virt.fake import FakeDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import SpecFactory


@pytest.fixture(params=["fake", "libvirt-test"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ComputeDriver]:
    if request.param == "fake":
        driver: ComputeDriver = FakeDriver()
    else:
        driver = LibvirtTestDriver("test:///default", tmp_path / "instances")
    driver.init_host()
    yield driver
    driver.close()


class TestDriverContract:
    def test_capabilities_are_declared_as_data(self, driver: ComputeDriver) -> None:
        assert set(driver.capabilities) == set(CAPABILITY_NAMES)
        assert all(isinstance(value, bool) for value in driver.capabilities.values())

    def test_resources_have_every_driver_key(self, driver: ComputeDriver) -> None:
        resources = driver.get_available_resource()
        assert set(resources) == set(DRIVER_RESOURCE_KEYS)
        assert resources["vcpus"] > 0 and resources["memory_mb"] > 0 and resources["disk_gb"] > 0
        assert isinstance(resources["hypervisor_version"], int)
        assert {"arch", "model", "vendor", "features"} <= set(resources["cpu_info"])

    def test_spawn_runs_the_instance(self, driver: ComputeDriver, make_spec: SpecFactory) -> None:
        spec = make_spec()
        driver.spawn(spec, None)
        assert driver.get_info(spec["instance_uuid"]) == contract.POWER_RUNNING
        assert driver.list_instances() == {spec["instance_uuid"]: contract.POWER_RUNNING}

    def test_spawn_of_an_existing_instance_raises_and_keeps_it(self, driver: ComputeDriver,
                                                              make_spec: SpecFactory) -> None:
        spec = make_spec()
        driver.spawn(spec, None)
        with pytest.raises(InstanceExists):
            driver.spawn(spec, None)
        assert driver.list_instances() == {spec["instance_uuid"]: contract.POWER_RUNNING}

    def test_destroy_removes_the_instance(self, driver: ComputeDriver, make_spec: SpecFactory) -> None:
        keep, gone = make_spec(), make_spec()
        driver.spawn(keep, None)
        driver.spawn(gone, None)
        driver.destroy(gone["instance_uuid"])
        assert driver.list_instances() == {keep["instance_uuid"]: contract.POWER_RUNNING}
        with pytest.raises(InstanceNotFound):
            driver.get_info(gone["instance_uuid"])

    def test_destroy_of_a_missing_instance_succeeds(self, driver: ComputeDriver,
                                                    make_spec: SpecFactory) -> None:
        driver.destroy(make_spec()["instance_uuid"])
        assert driver.list_instances() == {}

    def test_destroy_twice_succeeds(self, driver: ComputeDriver, make_spec: SpecFactory) -> None:
        spec = make_spec()
        driver.spawn(spec, None)
        driver.destroy(spec["instance_uuid"])
        driver.destroy(spec["instance_uuid"])
        assert driver.list_instances() == {}

    def test_unknown_instance_is_not_found(self, driver: ComputeDriver, make_spec: SpecFactory) -> None:
        missing = make_spec()["instance_uuid"]
        with pytest.raises(InstanceNotFound):
            driver.get_info(missing)
        with pytest.raises(InstanceNotFound):
            driver.get_console_output(missing, 10)

    @pytest.mark.parametrize("bad", ["../../etc", "", "not-a-uuid", "6B1B3E1C-0D51-4C38-9F43-6E2C1B8D7A10"])
    def test_a_malformed_uuid_never_reaches_the_hypervisor(self, driver: ComputeDriver, bad: str) -> None:
        with pytest.raises(InvalidInstanceUUID):
            driver.destroy(bad)
        with pytest.raises(InvalidInstanceUUID):
            driver.get_info(bad)

    def test_console_output_of_a_running_instance_is_text(self, driver: ComputeDriver,
                                                          make_spec: SpecFactory) -> None:
        spec = make_spec()
        driver.spawn(spec, None)
        assert isinstance(driver.get_console_output(spec["instance_uuid"], 10), str)
        assert driver.get_console_output(spec["instance_uuid"], 0) == ""

    def test_power_operations_converge(self, driver: ComputeDriver, make_spec: SpecFactory) -> None:
        spec = make_spec()
        uuid = spec["instance_uuid"]
        driver.spawn(spec, None)
        steps: list[tuple[Callable[[str], object], str]] = [
            (driver.pause, contract.POWER_PAUSED), (driver.pause, contract.POWER_PAUSED),
            (driver.unpause, contract.POWER_RUNNING), (driver.unpause, contract.POWER_RUNNING),
            (lambda u: driver.power_off(u, 10), contract.POWER_SHUTDOWN),
            (lambda u: driver.power_off(u, 10), contract.POWER_SHUTDOWN),
            (driver.power_on, contract.POWER_RUNNING), (driver.power_on, contract.POWER_RUNNING),
            (driver.suspend, contract.POWER_SUSPENDED), (driver.suspend, contract.POWER_SUSPENDED),
            (driver.resume, contract.POWER_RUNNING), (driver.resume, contract.POWER_RUNNING),
            (lambda u: driver.shutdown(u, 10), contract.POWER_SHUTDOWN),
            (lambda u: driver.power_on(u, spec), contract.POWER_RUNNING),
            (lambda u: driver.hard_reboot(u, spec), contract.POWER_RUNNING),
        ]
        for number, (operation, expected) in enumerate(steps):
            operation(uuid)
            assert driver.get_info(uuid) == expected, number
            assert driver.list_instances() == {uuid: expected}, number

    def test_a_suspended_instance_is_suspended_until_resumed_or_discarded(self, driver: ComputeDriver,
                                                                          make_spec: SpecFactory) -> None:
        spec = make_spec()
        uuid = spec["instance_uuid"]
        driver.spawn(spec, None)
        driver.pause(uuid)
        driver.suspend(uuid)  # a paused guest can be saved too, and comes back running
        assert driver.get_info(uuid) == contract.POWER_SUSPENDED
        driver.power_on(uuid, spec)  # starts from the saved memory
        assert driver.get_info(uuid) == contract.POWER_RUNNING
        driver.suspend(uuid)
        assert driver.power_off(uuid, 10) is True  # nothing to force: the saved state is discarded
        assert driver.get_info(uuid) == contract.POWER_SHUTDOWN
        driver.power_on(uuid, spec)
        driver.suspend(uuid)
        driver.hard_reboot(uuid, spec)  # a fresh boot: the saved state is discarded
        assert driver.get_info(uuid) == contract.POWER_RUNNING
        driver.power_off(uuid, 10)
        assert driver.get_info(uuid) == contract.POWER_SHUTDOWN  # not suspended again

    def test_shutdown_and_power_off_say_whether_they_forced(self, driver: ComputeDriver,
                                                          make_spec: SpecFactory) -> None:
        uuid = make_spec()["instance_uuid"]
        driver.spawn(make_spec(instance_uuid=uuid), None)
        driver.pause(uuid)
        assert driver.shutdown(uuid, 10) is False  # a paused guest cannot act on ACPI: at once
        assert driver.get_info(uuid) == contract.POWER_PAUSED
        assert driver.power_off(uuid, 10) is False
        assert driver.get_info(uuid) == contract.POWER_SHUTDOWN
        assert driver.shutdown(uuid, 10) is True
        driver.power_on(uuid)
        assert driver.power_off(uuid, 0) is False  # timeout 0: forced without asking
        assert driver.get_info(uuid) == contract.POWER_SHUTDOWN

    @pytest.mark.parametrize(("operation", "from_state"), [
        ("pause", "shutdown"), ("unpause", "shutdown"), ("suspend", "shutdown"), ("resume", "shutdown"),
        ("resume", "running_no_save"), ("unpause", "suspended"), ("pause", "suspended")])
    def test_operations_refuse_states_they_cannot_start_from(self, driver: ComputeDriver,
                                                             make_spec: SpecFactory, operation: str,
                                                             from_state: str) -> None:
        uuid = make_spec()["instance_uuid"]
        driver.spawn(make_spec(instance_uuid=uuid), None)
        if from_state == "shutdown":
            driver.power_off(uuid, 0)
        elif from_state == "suspended":
            driver.suspend(uuid)
        before = driver.get_info(uuid)
        if from_state == "running_no_save":
            getattr(driver, operation)(uuid)  # resume of a running domain is simply done
            return
        with pytest.raises(InstanceInvalidState):
            getattr(driver, operation)(uuid)
        assert driver.get_info(uuid) == before

    @pytest.mark.parametrize("operation", ["shutdown", "power_off", "power_on", "hard_reboot", "pause",
                                           "unpause", "suspend", "resume"])
    def test_lifecycle_of_a_missing_instance_is_not_found(self, driver: ComputeDriver,
                                                          make_spec: SpecFactory, operation: str) -> None:
        spec = make_spec()
        args: tuple[object, ...] = (10,) if operation in ("shutdown", "power_off") else ()
        if operation in ("power_on", "hard_reboot"):
            args = (spec,)  # a spec cannot bring back an instance whose disk is not here
        with pytest.raises(InstanceNotFound):
            getattr(driver, operation)(spec["instance_uuid"], *args)
        assert driver.list_instances() == {}

    def test_lifecycle_callback_hears_every_change_of_state(self, driver: ComputeDriver,
                                                            make_spec: SpecFactory) -> None:
        heard: list[str] = []
        driver.register_lifecycle_callback(heard.append)
        try:
            spec = make_spec()
            uuid = spec["instance_uuid"]
            driver.spawn(spec, None)
            wait_until(lambda: uuid in heard)
            heard.clear()
            driver.pause(uuid)
            wait_until(lambda: uuid in heard)
            heard.clear()
            driver.register_lifecycle_callback(None)
            driver.unpause(uuid)
            time.sleep(0.2)
            assert heard == []
        finally:
            driver.close()

    @pytest.mark.parametrize("post_copy", [True, False])
    def test_a_switch_over_without_a_migration_is_refused_and_changes_nothing(
            self, driver: ComputeDriver, make_spec: SpecFactory, post_copy: bool) -> None:
        spec = make_spec()
        driver.spawn(spec, None)
        with pytest.raises(HypervisorError):
            driver.live_migration_force_complete(spec["instance_uuid"], post_copy)
        assert driver.get_info(spec["instance_uuid"]) == contract.POWER_RUNNING  # not paused for nothing
        with pytest.raises(InstanceNotFound):
            driver.live_migration_force_complete(make_spec()["instance_uuid"], post_copy)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_fake_drivers_domains_outlive_its_process_with_a_state_file(tmp_path: Path,
                                                                         make_spec: SpecFactory) -> None:
    """COMPUTE_FAKE_STATE_DIR: a fake worker killed and started again finds its domains, as libvirt's
    survive a compute worker's kill -9; without it the new driver starts empty (a rebooted host)."""
    from compute_workers.config import ComputeConfig
    from compute_workers.virt import load_driver

    env = {"COMPUTE_DRIVER": "fake", "COMPUTE_HOST": "hv9", "COMPUTE_FAKE_STATE_DIR": str(tmp_path / "fake")}
    first = load_driver(ComputeConfig.from_env(environ=env))
    running, stopped, gone = make_spec(), make_spec(), make_spec()
    for spec in (running, stopped, gone):
        first.spawn(spec, None)
    first.power_off(stopped["instance_uuid"], 0)
    first.destroy(gone["instance_uuid"])
    assert (tmp_path / "fake" / "hv9.json").exists()

    second = load_driver(ComputeConfig.from_env(environ=env))  # the same host after a restart
    assert second.list_instances() == {running["instance_uuid"]: contract.POWER_RUNNING,
                                       stopped["instance_uuid"]: contract.POWER_SHUTDOWN}
    second.power_on(stopped["instance_uuid"], stopped)
    assert second.get_info(stopped["instance_uuid"]) == contract.POWER_RUNNING
    in_memory = load_driver(ComputeConfig.from_env(environ={**env, "COMPUTE_FAKE_STATE_DIR": ""}))
    assert in_memory.list_instances() == {}
