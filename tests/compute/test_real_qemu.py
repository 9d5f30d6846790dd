"""The real thing: the demo image spawned by the manager under QEMU (qemu:///system, TCG), its console
read until the guest says it is ready, every lifecycle operation on that one guest, lifecycle events,
then terminate. Bounded waits throughout; the measured times are printed (``-s``) and recorded as
junit properties."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from compute_workers import contract
from compute_workers.manager import ComputeManager
from compute_workers.operations import Build, Lifecycle, Snapshot
from compute_workers.reporter import ListReporter
from compute_workers.virt.libvirt.driver import LibvirtDriver

from .conftest import ImageServer, SpecFactory, make_manager

pytestmark = pytest.mark.libvirt

READY = "cloudctl-guest: ready"
ACTIVE = {"vm_state": "active", "task_state": None, "power_state": "running"}
STOPPED = {"vm_state": "stopped", "task_state": None, "power_state": "shutdown"}
PAUSED = {"vm_state": "paused", "task_state": None, "power_state": "paused"}
SUSPENDED = {"vm_state": "suspended", "task_state": None, "power_state": "suspended"}
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
        manager.close()
        shutil.rmtree(instances, ignore_errors=True)


def wait_for_console(manager: ComputeManager, instance_uuid: str, text: str, timeout: float,
                     after: int = 0) -> float:
    """Seconds until ``text`` shows up in the console for the ``after + 1``-th time."""
    started = time.monotonic()
    output = ""
    while time.monotonic() - started < timeout:
        output = manager.family(Build).get_console_output(instance_uuid, None).get("output", "")
        if output.count(text) > after:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the console within {timeout} s; last output:\n{output}")


def console(manager: ComputeManager, instance_uuid: str) -> str:
    return manager.family(Build).get_console_output(instance_uuid, None)["output"]


def test_spawn_and_every_lifecycle_operation_on_the_demo_image(
        real_manager: tuple[ComputeManager, ListReporter], image_server: ImageServer, tiny_image_path: Path,
        make_spec: SpecFactory, record_property: Callable[[str, object], None]) -> None:
    """One guest through spawn, soft reboot (and its redelivery), hard reboot, power off/on,
    pause/unpause, suspend/resume, an ACPI power-off from outside cloudctl, and terminate."""
    manager, reporter = real_manager
    driver = manager.driver
    assert isinstance(driver, LibvirtDriver)
    manager.watch_power_states()
    spec = make_spec(image=image_server.add("tiny", tiny_image_path.read_bytes()))
    instance_uuid = spec["instance_uuid"]
    directory = driver.instance_dir(instance_uuid)
    name = contract.domain_name(instance_uuid)
    timings: dict[str, float] = {}

    def timed(label: str, operation: Callable[[], None]) -> dict[str, Any]:
        """Run one manager operation, record its time, return its last instance_update."""
        reporter.reports.clear()
        started = time.monotonic()
        operation()
        timings[label] = time.monotonic() - started
        return [{}, *reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)][-1]

    def booted(times: int, label: str) -> None:
        """Wait for the ``times``-th "ready", record how long after the last operation it came."""
        timings[label] = wait_for_console(manager, instance_uuid, READY, timeout=90, after=times - 1)
        assert f"cloudctl-guest: boot-count {times}" in console(manager, instance_uuid)

    def state() -> int:
        return int(driver.conn.lookupByName(name).state()[0])

    update = timed("spawn", lambda: manager.family(Build).spawn(spec))
    assert reporter.named(contract.CONDUCTOR_BUILD_FAILED) == []
    assert update["values"] == ACTIVE
    assert state() == libvirt.VIR_DOMAIN_RUNNING
    assert sorted(p.name for p in directory.iterdir()) == ["console.log", "disk", "libvirt.xml"]
    assert (manager.config.instances_path / "_base" / "tiny").exists()
    booted(1, "spawn_to_ready")

    # Soft reboot: the guest shuts down on ACPI and boots again, its boot counter at 2.
    domain_id = driver.conn.lookupByName(name).ID()
    lifecycle = manager.family(Lifecycle)
    update = timed("soft_reboot", lambda: lifecycle.reboot_instance(instance_uuid, 1, "SOFT", spec))
    assert update["values"] == ACTIVE, update
    assert update["event"]["message"].startswith("guest shut down cleanly in ")
    assert "cloudctl-guest: poweroff (clean)" in console(manager, instance_uuid)
    booted(2, "soft_reboot_to_ready")
    domain_id = driver.conn.lookupByName(name).ID()
    # Redis delivers the same task again: nothing happens, nothing is reported.
    reporter.reports.clear()
    manager.family(Lifecycle).reboot_instance(instance_uuid, 1, "SOFT", spec)
    assert reporter.reports == []
    assert driver.conn.lookupByName(name).ID() == domain_id
    assert (directory / "actions.done").read_text() == "1 success\n"

    update = timed("hard_reboot", lambda: lifecycle.reboot_instance(instance_uuid, 2, "HARD", spec))
    assert update["values"] == ACTIVE and update["event"]["message"].startswith("domain destroyed")
    assert driver.conn.lookupByName(name).ID() != domain_id
    booted(3, "hard_reboot_to_ready")

    update = timed("stop", lambda: manager.family(Lifecycle).power_off_instance(instance_uuid, 3, 30))
    assert update["values"] == STOPPED and update["event"]["message"].startswith("guest shut down cleanly")
    domain = driver.conn.lookupByName(name)  # still defined
    assert domain.isPersistent() and not domain.isActive() and not domain.hasManagedSaveImage(0)
    assert driver.get_info(instance_uuid) == contract.POWER_SHUTDOWN
    update = timed("start", lambda: manager.family(Lifecycle).power_on_instance(instance_uuid, 4, spec))
    assert update["values"] == ACTIVE and state() == libvirt.VIR_DOMAIN_RUNNING
    booted(4, "start_to_ready")

    update = timed("pause", lambda: manager.family(Lifecycle).pause_instance(instance_uuid, 5))
    assert update["values"] == PAUSED and state() == libvirt.VIR_DOMAIN_PAUSED
    update = timed("unpause", lambda: manager.family(Lifecycle).unpause_instance(instance_uuid, 6))
    assert update["values"] == ACTIVE and state() == libvirt.VIR_DOMAIN_RUNNING

    update = timed("suspend", lambda: manager.family(Lifecycle).suspend_instance(instance_uuid, 7))
    assert update["values"] == SUSPENDED
    domain = driver.conn.lookupByName(name)
    assert not domain.isActive() and domain.hasManagedSaveImage(0)
    assert driver.get_info(instance_uuid) == contract.POWER_SUSPENDED
    assert driver.list_instances()[instance_uuid] == contract.POWER_SUSPENDED
    update = timed("resume", lambda: manager.family(Lifecycle).resume_instance(instance_uuid, 8))
    assert update["values"] == ACTIVE and state() == libvirt.VIR_DOMAIN_RUNNING
    assert not driver.conn.lookupByName(name).hasManagedSaveImage(0)

    # The guest powers off without cloudctl asking (ACPI sent over a connection of its own). That it
    # complies also shows the resumed guest runs from its restored memory: it did not boot again.
    outsider = libvirt.open("qemu:///system")
    try:
        reporter.reports.clear()
        asked_at = time.time()
        started = time.monotonic()
        outsider.lookupByName(name).shutdown()
        update = wait_for_power_state(reporter, instance_uuid, contract.POWER_SHUTDOWN, timeout=15)
        timings["self_poweroff_to_event"] = time.monotonic() - started
    finally:
        outsider.close()
    assert update["host"] == manager.host and update["observed_at"] >= asked_at
    assert reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE) == []
    output = console(manager, instance_uuid)
    assert output.count(READY) == 4 and "cloudctl-guest: boot-count 5" not in output

    timed("terminate", lambda: manager.family(Build).terminate(instance_uuid))
    assert reporter.named(contract.CONDUCTOR_INSTANCE_DESTROYED) == [
        {"instance_uuid": instance_uuid, "host": manager.host}]
    assert instance_uuid not in driver.list_instances()
    with pytest.raises(libvirt.libvirtError):
        driver.conn.lookupByName(name)
    assert not directory.exists()

    for label, seconds in timings.items():
        record_property(f"{label}_s", round(seconds, 2))
    print("\nreal QEMU timings (s): " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))


def wait_for_power_state(reporter: ListReporter, instance_uuid: str, power_state: str,
                         timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for update in reporter.named(contract.CONDUCTOR_POWER_STATE_UPDATE):
            if update["instance_uuid"] == instance_uuid and update["power_state"] == power_state:
                return update
        time.sleep(0.01)
    raise AssertionError(f"no power_state_update {power_state} within {timeout} s")


class StatePoller(threading.Thread):
    """Polls a domain's state every few milliseconds (its own connection): how long it was not running."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.conn = libvirt.open("qemu:///system")
        self.domain = self.conn.lookupByName(name)
        self.stopping = threading.Event()
        self.samples = 0
        self.states: set[int] = set()
        self.not_running = 0.0

    def run(self) -> None:
        last = time.monotonic()
        while not self.stopping.is_set():
            state = self.domain.state()[0]
            now = time.monotonic()
            self.samples += 1
            self.states.add(state)
            if state != libvirt.VIR_DOMAIN_RUNNING:
                self.not_running += now - last
            last = now
            time.sleep(0.002)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.conn.close()


def uploaded_info(tmp_path: Path, data: bytes) -> dict[str, Any]:
    path = tmp_path / "uploaded.qcow2"
    path.write_bytes(data)
    result = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                            capture_output=True, text=True)
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def test_live_and_cold_snapshot_of_the_demo_image(
        real_manager: tuple[ComputeManager, ListReporter], image_server: ImageServer, tiny_image_path: Path,
        make_spec: SpecFactory, tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    """Live snapshot of a running guest (it keeps running), a new instance booted from it (its boot
    counter goes on: the disk was copied), then a cold snapshot of the stopped guest."""
    manager, reporter = real_manager
    driver = manager.driver
    assert isinstance(driver, LibvirtDriver)
    spec = make_spec(image=image_server.add("tiny", tiny_image_path.read_bytes()))
    instance_uuid = spec["instance_uuid"]
    timings: dict[str, float] = {}
    manager.family(Build).spawn(spec)
    assert reporter.named(contract.CONDUCTOR_BUILD_FAILED) == []
    wait_for_console(manager, instance_uuid, READY, timeout=90)
    assert "cloudctl-guest: boot-count 1" in console(manager, instance_uuid)

    # Live: the guest runs all along (its state polled every few ms from another connection).
    reporter.reports.clear()
    poller = StatePoller(contract.domain_name(instance_uuid))
    poller.start()
    started = time.monotonic()
    manager.family(Snapshot).snapshot_instance(instance_uuid, 1, "snap-live",
                                               image_server.upload_url("snap-live"), "snap-live")
    timings["live_snapshot"] = time.monotonic() - started
    poller.stop()
    timings["live_snapshot_not_running"] = poller.not_running
    updates = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
    assert updates[-1]["fault"] is None, updates[-1]
    assert updates[-1]["values"] == ACTIVE and updates[-1]["expected_task_state"] == "image_uploading"
    assert poller.samples > 10 and poller.states == {libvirt.VIR_DOMAIN_RUNNING}, poller.states
    assert driver.get_info(instance_uuid) == contract.POWER_RUNNING
    assert not driver.conn.lookupByName(contract.domain_name(instance_uuid)).blockJobInfo("vda", 0)
    assert list((manager.config.instances_path / "snapshots").iterdir()) == []
    data = image_server.uploads["snap-live"]
    info = uploaded_info(tmp_path, data)
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info and "full-backing-filename" not in info

    # A new instance from the snapshot boots with the first guest's counter: boot 2.
    copy = make_spec(image=image_server.add("snap-live", data))
    started = time.monotonic()
    manager.family(Build).spawn(copy)
    assert reporter.named(contract.CONDUCTOR_BUILD_FAILED) == []
    wait_for_console(manager, copy["instance_uuid"], READY, timeout=90)
    timings["spawn_from_snapshot_to_ready"] = time.monotonic() - started
    assert "cloudctl-guest: boot-count 2" in console(manager, copy["instance_uuid"])
    manager.family(Build).terminate(copy["instance_uuid"])

    # Cold: the stopped guest stays stopped.
    manager.family(Lifecycle).power_off_instance(instance_uuid, 2, 0)
    reporter.reports.clear()
    started = time.monotonic()
    manager.family(Snapshot).snapshot_instance(instance_uuid, 3, "snap-cold",
                                               image_server.upload_url("snap-cold"), "snap-cold")
    timings["cold_snapshot"] = time.monotonic() - started
    final = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]
    assert final["fault"] is None and final["values"] == STOPPED, final
    assert final["event"]["message"].startswith("cold snapshot")
    info = uploaded_info(tmp_path, image_server.uploads["snap-cold"])
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert driver.get_info(instance_uuid) == contract.POWER_SHUTDOWN
    manager.family(Build).terminate(instance_uuid)
    assert driver.list_instances() == {}

    for label, seconds in timings.items():
        record_property(f"{label}_s", round(seconds, 3))
    print("\nsnapshot timings (s): " + ", ".join(f"{k}={v:.3f}" for k, v in timings.items()))
    print(f"domain state polled {poller.samples} times during the live snapshot: never left running")
    print("live snapshot events: " + " | ".join(u["event"]["message"] for u in updates if u["event"]))
