"""The real thing: the demo image spawned by the manager under QEMU (qemu:///system, TCG), its console
read until the guest says it is ready, ACPI power off/on, then terminate. Bounded waits throughout."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from compute_workers import contract
from compute_workers.manager import ComputeManager
from compute_workers.reporter import ListReporter
from compute_workers.virt.libvirt.driver import LibvirtDriver

from .conftest import ImageServer, SpecFactory, make_manager

pytestmark = pytest.mark.libvirt

READY = "cloudctl-guest: ready"
# QEMU runs as libvirt-qemu (qemu.conf defaults, dynamic ownership): every parent directory of the
# instance files must be traversable by it, which pytest's tmp_path (0700) is not.
TEST_ROOT = Path("/var/lib/cloudctl-test")


@pytest.fixture
def real_manager() -> Iterator[tuple[ComputeManager, ListReporter]]:
    TEST_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    instances = TEST_ROOT / f"compute-{secrets.token_hex(4)}"
    driver = LibvirtDriver("qemu:///system", instances, virt_type="qemu")
    manager, reporter = make_manager(driver, instances, COMPUTE_LIBVIRT_URI="qemu:///system",
                                     COMPUTE_VIRT_TYPE="qemu")
    try:
        yield manager, reporter
    finally:
        for instance_uuid in driver.list_instances():
            if (instances / instance_uuid).exists():  # only what this test made
                driver.destroy(instance_uuid)
        shutil.rmtree(instances, ignore_errors=True)


def wait_for_console(manager: ComputeManager, instance_uuid: str, text: str, timeout: float,
                     after: int = 0) -> float:
    """Seconds until ``text`` shows up in the console for the ``after + 1``-th time."""
    started = time.monotonic()
    output = ""
    while time.monotonic() - started < timeout:
        output = manager.get_console_output(instance_uuid, 200).get("output", "")
        if output.count(text) > after:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the console within {timeout} s; last output:\n{output}")


def test_spawn_boot_power_cycle_and_terminate_the_demo_image(
        real_manager: tuple[ComputeManager, ListReporter], image_server: ImageServer, tiny_image_path: Path,
        make_spec: SpecFactory, record_property: Callable[[str, object], None]) -> None:
    manager, reporter = real_manager
    driver = manager.driver
    assert isinstance(driver, LibvirtDriver)
    spec = make_spec(image=image_server.add("tiny", tiny_image_path.read_bytes()))
    instance_uuid = spec["instance_uuid"]
    directory = driver.instance_dir(instance_uuid)

    started = time.monotonic()
    manager.spawn(spec)
    spawn_seconds = time.monotonic() - started
    assert reporter.named(contract.CONDUCTOR_BUILD_FAILED) == []
    update = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]
    assert update["values"] == {"vm_state": "active", "task_state": None, "power_state": "running"}
    domain = driver.conn.lookupByName(contract.domain_name(instance_uuid))
    assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert sorted(p.name for p in directory.iterdir()) == ["console.log", "disk", "libvirt.xml"]
    assert (manager.config.instances_path / "_base" / "tiny").exists()

    ready_seconds = wait_for_console(manager, instance_uuid, READY, timeout=90)

    # ACPI works (a shutdown request is not ignored) and the console log survives a QEMU restart.
    started = time.monotonic()
    driver.power_off(instance_uuid, timeout=30)
    power_off_seconds = time.monotonic() - started
    assert driver.get_info(instance_uuid) == contract.POWER_SHUTDOWN
    assert "cloudctl-guest: poweroff (clean)" in manager.get_console_output(instance_uuid, 50)["output"]
    driver.power_on(instance_uuid)
    wait_for_console(manager, instance_uuid, READY, timeout=90, after=1)
    output = manager.get_console_output(instance_uuid, 200)["output"]
    assert "cloudctl-guest: boot-count 1" in output and "cloudctl-guest: boot-count 2" in output

    started = time.monotonic()
    manager.terminate(instance_uuid)
    terminate_seconds = time.monotonic() - started
    assert reporter.reports[-1] == (contract.CONDUCTOR_INSTANCE_DESTROYED,
                                    {"instance_uuid": instance_uuid, "host": manager.host})
    assert instance_uuid not in driver.list_instances()
    with pytest.raises(libvirt.libvirtError):
        driver.conn.lookupByName(contract.domain_name(instance_uuid))
    assert not directory.exists()

    timings = {"spawn_s": spawn_seconds, "spawn_to_ready_s": ready_seconds,
               "acpi_power_off_s": power_off_seconds, "terminate_s": terminate_seconds}
    for name, seconds in timings.items():
        record_property(name, round(seconds, 2))
    print("real QEMU timings: " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
