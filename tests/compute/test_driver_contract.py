"""One contract, every driver: the same tests run against FakeDriver and LibvirtDriver(test:///default)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_workers import contract
from compute_workers.exception import InstanceExists, InstanceNotFound, InvalidInstanceUUID
from compute_workers.virt.driver import CAPABILITY_NAMES, DRIVER_RESOURCE_KEYS, ComputeDriver
from compute_workers.virt.fake import FakeDriver
from compute_workers.virt.libvirt.driver import LibvirtDriver

from .conftest import SpecFactory


@pytest.fixture(params=["fake", "libvirt-test"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ComputeDriver]:
    if request.param == "fake":
        driver: ComputeDriver = FakeDriver()
    else:
        driver = LibvirtDriver("test:///default", tmp_path / "instances")
    driver.init_host()
    yield driver


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
        uuid = make_spec()["instance_uuid"]
        driver.spawn(make_spec(instance_uuid=uuid), None)
        steps = [
            (driver.pause, contract.POWER_PAUSED), (driver.pause, contract.POWER_PAUSED),
            (driver.unpause, contract.POWER_RUNNING), (driver.unpause, contract.POWER_RUNNING),
            (driver.power_off, contract.POWER_SHUTDOWN), (driver.power_off, contract.POWER_SHUTDOWN),
            (driver.power_on, contract.POWER_RUNNING), (driver.power_on, contract.POWER_RUNNING),
            (driver.suspend, contract.POWER_SHUTDOWN), (driver.resume, contract.POWER_RUNNING),
        ]
        for operation, expected in steps:
            operation(uuid)
            assert driver.get_info(uuid) == expected, operation.__name__
        for reboot_type in ("soft", "hard"):
            driver.reboot(uuid, reboot_type)
            assert driver.get_info(uuid) == contract.POWER_RUNNING
