"""Lifecycle operations (reboot, power off/on, pause, suspend): what the conductor is told, convergence,
faults, the redelivery journal, and the lifecycle tasks. Run against the fake driver and
LibvirtTestDriver (test:///default). (Power-state updates from lifecycle events: test_manager.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from compute_workers import contract
from compute_workers.app import create_app
from compute_workers.exception import HypervisorError
from compute_workers.journal import ActionJournal
from compute_workers.manager import ComputeManager
from compute_workers.operations import Build, Lifecycle
from compute_workers.reporter import ListReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeACPIIgnoringDriver, FakeDriver
from compute_workers.virt.libvirt.driver import LibvirtDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import HOST, Managed, SpecFactory, make_manager, spawned

ACTIVE = {"vm_state": "active", "task_state": None, "power_state": "running"}
STOPPED = {"vm_state": "stopped", "task_state": None, "power_state": "shutdown"}
PAUSED = {"vm_state": "paused", "task_state": None, "power_state": "paused"}
SUSPENDED = {"vm_state": "suspended", "task_state": None, "power_state": "suspended"}
NO_DOMAIN = {"vm_state": "error", "task_state": None, "power_state": "nostate"}


# operation -> (event, expected task_state, success values, how to call it)
OPERATIONS: dict[str, tuple[str, str, dict[str, Any], Callable[..., None]]] = {
    "reboot_soft": ("compute_reboot_instance", "rebooting", ACTIVE,
                    lambda m, u, a, spec: m.family(Lifecycle).reboot_instance(u, a, "SOFT", spec)),
    "reboot_hard": ("compute_reboot_instance", "rebooting_hard", ACTIVE,
                    lambda m, u, a, spec: m.family(Lifecycle).reboot_instance(u, a, "HARD", spec)),
    "power_off": ("compute_stop_instance", "powering_off", STOPPED,
                  lambda m, u, a, spec: m.family(Lifecycle).power_off_instance(u, a, 10)),
    "power_on": ("compute_start_instance", "powering_on", ACTIVE,
                 lambda m, u, a, spec: m.family(Lifecycle).power_on_instance(u, a, spec)),
    "pause": ("compute_pause_instance", "pausing", PAUSED,
              lambda m, u, a, spec: m.family(Lifecycle).pause_instance(u, a)),
    "unpause": ("compute_unpause_instance", "unpausing", ACTIVE,
                lambda m, u, a, spec: m.family(Lifecycle).unpause_instance(u, a)),
    "suspend": ("compute_suspend_instance", "suspending", SUSPENDED,
                lambda m, u, a, spec: m.family(Lifecycle).suspend_instance(u, a)),
    "resume": ("compute_resume_instance", "resuming", ACTIVE,
               lambda m, u, a, spec: m.family(Lifecycle).resume_instance(u, a)),
}
# The state each operation starts from in the success tests, reached from a running instance.
PREPARE: dict[str, Callable[[ComputeManager, str], object]] = {
    "reboot_soft": lambda m, u: None,
    "reboot_hard": lambda m, u: None,
    "power_off": lambda m, u: None,
    "power_on": lambda m, u: m.driver.power_off(u, 0),
    "pause": lambda m, u: None,
    "unpause": lambda m, u: m.driver.pause(u),
    "suspend": lambda m, u: None,
    "resume": lambda m, u: m.driver.suspend(u),
}


def updates(reporter: ListReporter) -> list[dict[str, Any]]:
    assert {name for name, _ in reporter.reports} <= {contract.CONDUCTOR_INSTANCE_UPDATE,
                                                       contract.CONDUCTOR_POWER_STATE_UPDATE}
    return reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)


def steps(reporter: ListReporter) -> list[tuple[str, str]]:
    return [(u["event"]["name"], u["event"]["result"]) for u in updates(reporter)]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_each_operation_opens_and_closes_its_event_with_the_target_values(
        managed: Managed, make_spec: SpecFactory, operation: str) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    PREPARE[operation](manager, uuid)
    event, task_state, target, call = OPERATIONS[operation]
    call(manager, uuid, 41, spec)
    start, success = updates(reporter)
    for update in (start, success):
        assert update["instance_uuid"] == uuid and update["host"] == HOST
        assert update["expected_task_state"] == task_state and update["action_id"] == 41
        assert update["fault"] is None
    assert start["values"] == {} and start["event"]["name"] == event and start["event"]["result"] == "start"
    assert success["values"] == target
    assert success["event"]["name"] == event and success["event"]["result"] == "success"
    assert "nothing to do" not in success["event"]["message"]
    assert " s" in success["event"]["message"]  # says how long it took
    assert manager.driver.get_info(uuid) == target["power_state"]
    assert manager.journal.done(uuid, 41)


@pytest.mark.parametrize(("operation", "message"), [
    ("reboot_soft", "guest shut down cleanly in "), ("reboot_hard", "domain destroyed and started again"),
    ("power_off", "guest shut down cleanly in "), ("power_on", "domain started from its regenerated"),
    ("pause", "vCPUs paused in "), ("unpause", "vCPUs running again in "),
    ("suspend", "memory saved to disk and domain stopped in "),
    ("resume", "memory restored from disk; guest running again in ")])
def test_success_messages_say_what_happened(managed: Managed, make_spec: SpecFactory, operation: str,
                                            message: str) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    PREPARE[operation](manager, uuid)
    OPERATIONS[operation][3](manager, uuid, 1, spec)
    assert updates(reporter)[-1]["event"]["message"].startswith(message)


@pytest.mark.parametrize(("operation", "already"), [
    ("power_off", "shut off"), ("power_on", "running"), ("pause", "paused"), ("unpause", "running"),
    ("suspend", "suspended"), ("resume", "running")])
def test_an_operation_on_a_domain_in_its_target_state_is_a_successful_no_op(
        managed: Managed, make_spec: SpecFactory, operation: str, already: str) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    event, _task_state, target, call = OPERATIONS[operation]
    call(manager, uuid, 1, spec)
    reporter.reports.clear()
    call(manager, uuid, 2, spec)  # a second action, not a redelivery: it runs, and changes nothing
    assert steps(reporter) == [(event, "start"), (event, "success")]
    success = updates(reporter)[-1]
    assert success["values"] == target
    assert success["event"]["message"] == f"domain was already {already} on host {HOST}; nothing to do"
    assert manager.driver.get_info(uuid) == target["power_state"]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_an_operation_on_a_missing_domain_fails_with_the_truth(managed: Managed, make_spec: SpecFactory,
                                                               operation: str) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spec["instance_uuid"]
    event, task_state, _target, call = OPERATIONS[operation]
    call(manager, uuid, 7, spec)
    assert [(e, r) for e, r in steps(reporter) if e != "fallback_to_hard_reboot"] == [
        (event, "start"), (event, "error")]
    failure = updates(reporter)[-1]
    assert failure["expected_task_state"] == task_state and failure["action_id"] == 7
    assert failure["values"] == NO_DOMAIN
    message = f"domain instance-{uuid} does not exist on host {HOST}"
    assert failure["fault"]["message"] == message and failure["fault"]["code"] == 500
    assert "InstanceNotFound" in failure["fault"]["details"]
    assert failure["event"]["message"] == message
    assert manager.journal.done(uuid, 7)


def test_a_redelivered_action_does_nothing_and_reports_nothing(managed: Managed,
                                                               make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    manager.family(Lifecycle).reboot_instance(uuid, 5, "HARD", spec)
    assert len(updates(reporter)) == 2
    boots = boot_marker(manager, uuid)
    reporter.reports.clear()
    manager.family(Lifecycle).reboot_instance(uuid, 5, "HARD", spec)  # Redis delivered the task again
    manager.family(Lifecycle).power_off_instance(uuid, 5, 10)  # whatever the task: action 5 is done here
    assert reporter.reports == []
    assert boot_marker(manager, uuid) == boots  # not rebooted again
    assert manager.driver.get_info(uuid) == contract.POWER_RUNNING
    manager.family(Lifecycle).reboot_instance(uuid, 6, "HARD", spec)  # a new action runs
    assert steps(reporter)[-1] == ("compute_reboot_instance", "success")
    assert boot_marker(manager, uuid) != boots
    journal = (manager.config.instances_path / uuid / "actions.done").read_text()
    assert journal == "5 success\n6 success\n"


def boot_marker(manager: ComputeManager, instance_uuid: str) -> object:
    """Something that changes on every boot: the fake's boot count, test:///default's domain id."""
    if isinstance(manager.driver, FakeDriver):
        return manager.driver.instances[instance_uuid].boots
    assert isinstance(manager.driver, LibvirtDriver)
    return manager.driver.conn.lookupByName(contract.domain_name(instance_uuid)).ID()


def test_concurrent_deliveries_of_one_action_run_it_once(tmp_path: Path, make_spec: SpecFactory) -> None:
    class SlowDriver(FakeDriver):
        def hard_reboot(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
            time.sleep(0.2)
            super().hard_reboot(instance_uuid, spec)

    driver = SlowDriver()
    manager, reporter = make_manager(driver, tmp_path)
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    reboot = manager.family(Lifecycle).reboot_instance
    threads = [threading.Thread(target=reboot, args=(uuid, 9, "HARD", spec)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert driver.instances[uuid].boots == 2
    assert steps(reporter) == [("compute_reboot_instance", "start"), ("compute_reboot_instance", "success")]


def test_an_action_without_id_runs_every_time(managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    manager.family(Lifecycle).reboot_instance(uuid, None, "HARD", spec)
    manager.family(Lifecycle).reboot_instance(uuid, None, "HARD", spec)
    assert [u["values"] for u in updates(reporter)] == [{}, ACTIVE, {}, ACTIVE]
    assert not (manager.config.instances_path / uuid / "actions.done").exists()


def test_an_invalid_uuid_reaches_neither_the_hypervisor_nor_the_disk(managed: Managed) -> None:
    manager, reporter = managed
    manager.family(Lifecycle).pause_instance("../../etc", 3)
    assert reporter.reports == []
    assert not manager.config.instances_path.exists() or list(manager.config.instances_path.iterdir()) == []


def test_soft_reboot_falls_back_to_hard_when_the_guest_ignores_acpi(tmp_path: Path,
                                                                    make_spec: SpecFactory) -> None:
    driver = FakeACPIIgnoringDriver()
    manager, reporter = make_manager(driver, tmp_path, COMPUTE_CLEAN_SHUTDOWN_TIMEOUT="0.2")
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    manager.family(Lifecycle).reboot_instance(uuid, 3, "SOFT", spec)
    assert steps(reporter) == [("compute_reboot_instance", "start"), ("fallback_to_hard_reboot", "success"),
                               ("compute_reboot_instance", "success")]
    _start, fallback, success = updates(reporter)
    assert fallback["expected_task_state"] == "rebooting" and fallback["action_id"] == 3
    assert fallback["values"] == {}
    assert fallback["event"]["message"] == ("guest did not shut down within 0.2 s after the ACPI request; "
                                            "hard rebooting")
    assert success["values"] == ACTIVE
    assert driver.instances[uuid].boots == 2


def test_soft_reboot_falls_back_on_test_libvirt_when_shutdown_is_ignored(
        tmp_path: Path, make_spec: SpecFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    instances = tmp_path / "instances"
    driver = LibvirtTestDriver("test:///default", instances)
    manager, reporter = make_manager(driver, instances, COMPUTE_LIBVIRT_URI="test:///default",
                                     COMPUTE_CLEAN_SHUTDOWN_TIMEOUT="0.3")
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    presses: list[float] = []

    def ignored(_domain: libvirt.virDomain) -> int:
        presses.append(time.monotonic())
        return 0

    monkeypatch.setattr(libvirt.virDomain, "shutdown", ignored)
    monkeypatch.setattr("compute_workers.virt.libvirt.driver.ACPI_RETRY_INTERVAL", 0.1)
    domain_id = driver.conn.lookupByName(contract.domain_name(uuid)).ID()
    try:
        manager.family(Lifecycle).reboot_instance(uuid, 3, "SOFT", spec)
        assert steps(reporter)[1] == ("fallback_to_hard_reboot", "success")
        assert updates(reporter)[-1]["values"] == ACTIVE
        assert len(presses) >= 2  # the power button was pressed again while waiting
        assert driver.conn.lookupByName(contract.domain_name(uuid)).ID() != domain_id
    finally:
        driver.destroy(uuid)
        manager.close()


@pytest.mark.parametrize(("prepare", "why"), [
    ("power_off", "guest is shutdown, not running; hard rebooting"),
    ("pause", "guest is paused, not running; hard rebooting"),
    ("suspend", "guest is suspended, not running; hard rebooting")])
def test_soft_reboot_of_a_guest_that_does_not_run_is_a_hard_one(managed: Managed, make_spec: SpecFactory,
                                                                 prepare: str, why: str) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    if prepare == "power_off":
        manager.driver.power_off(uuid, 0)
    else:
        getattr(manager.driver, prepare)(uuid)
    manager.family(Lifecycle).reboot_instance(uuid, 1, "SOFT", spec)
    assert updates(reporter)[1]["event"] == {"name": "fallback_to_hard_reboot", "result": "success",
                                             "message": why}
    assert updates(reporter)[-1]["values"] == ACTIVE
    assert manager.driver.get_info(uuid) == contract.POWER_RUNNING


@pytest.mark.parametrize("reboot_type", ["SOFT", "HARD"])
def test_reboot_and_power_on_define_a_lost_domain_again_from_the_spec(
        tmp_path: Path, make_spec: SpecFactory, reboot_type: str) -> None:
    instances = tmp_path / "instances"
    driver = LibvirtTestDriver("test:///default", instances)
    manager, reporter = make_manager(driver, instances, COMPUTE_LIBVIRT_URI="test:///default")
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    try:
        domain = driver.conn.lookupByName(contract.domain_name(uuid))
        domain.destroy()
        domain.undefine()  # the definition is lost, the files are still here
        bigger = make_spec(instance_uuid=uuid, flavor={"memory_mb": 256})
        manager.family(Lifecycle).reboot_instance(uuid, 1, reboot_type, bigger)
        success = updates(reporter)[-1]
        assert success["values"] == ACTIVE
        assert success["event"]["message"].startswith(
            f"domain instance-{uuid} was not defined on host {HOST}; defined again from the spec")
        domain = driver.conn.lookupByName(contract.domain_name(uuid))
        assert domain.maxMemory() == 256 * 1024 and domain.isPersistent()
        domain.destroy()
        domain.undefine()
        manager.family(Lifecycle).power_on_instance(uuid, 2, spec)
        assert updates(reporter)[-1]["values"] == ACTIVE
        assert driver.conn.lookupByName(contract.domain_name(uuid)).maxMemory() == 128 * 1024
    finally:
        driver.destroy(uuid)
        manager.close()


def test_hard_reboot_and_power_on_apply_a_changed_flavor(tmp_path: Path, make_spec: SpecFactory) -> None:
    instances = tmp_path / "instances"
    driver = LibvirtTestDriver("test:///default", instances)
    manager, reporter = make_manager(driver, instances, COMPUTE_LIBVIRT_URI="test:///default")
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    try:
        bigger = make_spec(instance_uuid=uuid, flavor={"vcpus": 2, "memory_mb": 512})
        manager.family(Lifecycle).reboot_instance(uuid, 1, "HARD", bigger)
        domain = driver.conn.lookupByName(contract.domain_name(uuid))
        assert (domain.maxMemory(), domain.info()[3]) == (512 * 1024, 2)
        assert "<vcpu>2</vcpu>" in (driver.instance_dir(uuid) / "libvirt.xml").read_text()
        manager.family(Lifecycle).power_off_instance(uuid, 2, 10)
        manager.family(Lifecycle).power_on_instance(uuid, 3, spec)
        assert driver.conn.lookupByName(contract.domain_name(uuid)).maxMemory() == 128 * 1024
        assert [u["values"] for u in updates(reporter)[1::2]] == [ACTIVE, STOPPED, ACTIVE]
    finally:
        driver.destroy(uuid)
        manager.close()


@pytest.mark.parametrize(("operation", "state", "values", "message"), [
    ("pause", "shutdown", STOPPED, "cannot pause instance {uuid}: its domain is shutdown on host test-host; "
                                   "start or resume it first"),
    ("unpause", "running", None, None),
    ("unpause", "suspended", SUSPENDED, "cannot unpause instance {uuid}: its domain is suspended on host "
                                        "test-host; only a paused instance can be unpaused"),
    ("suspend", "shutdown", STOPPED, "cannot suspend instance {uuid}: its domain is shutdown on host "
                                     "test-host; a shut-off instance has no memory to save"),
    ("resume", "shutdown", STOPPED, "cannot resume instance {uuid}: its domain is shutdown on host "
                                    "test-host; it has no saved memory state; start it instead")])
def test_an_operation_from_a_state_it_cannot_leave_fails_with_the_truth(
        managed: Managed, make_spec: SpecFactory, operation: str, state: str,
        values: dict[str, Any] | None, message: str | None) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    if state == "shutdown":
        manager.driver.power_off(uuid, 0)
    elif state == "suspended":
        manager.driver.suspend(uuid)
    event = OPERATIONS[operation][0]
    OPERATIONS[operation][3](manager, uuid, 1, spec)
    last = updates(reporter)[-1]
    if values is None:  # unpausing a running instance converges: nothing to do
        assert last["event"]["result"] == "success"
        return
    assert steps(reporter) == [(event, "start"), (event, "error")]
    assert last["values"] == values
    assert last["fault"]["message"] == message.format(uuid=uuid)  # type: ignore[union-attr]
    assert last["event"]["message"] == last["fault"]["message"]
    assert manager.driver.get_info(uuid) == values["power_state"]
    assert (manager.config.instances_path / uuid / "actions.done").read_text() == "1 error\n"


def test_a_hypervisor_failure_reports_what_the_domain_really_is(tmp_path: Path,
                                                                make_spec: SpecFactory) -> None:
    class NoSaveDriver(FakeDriver):
        def suspend(self, instance_uuid: str) -> None:
            raise HypervisorError("cannot suspend instance: no space left on /var/lib/libvirt/qemu/save")

    manager, reporter = make_manager(NoSaveDriver(), tmp_path)
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    manager.family(Lifecycle).suspend_instance(uuid, 4)
    failure = updates(reporter)[-1]
    assert failure["values"] == ACTIVE  # it still runs: the truth, not the target
    assert failure["fault"]["message"] == ("cannot suspend instance: no space left on "
                                           "/var/lib/libvirt/qemu/save")
    assert failure["event"] == {"name": "compute_suspend_instance", "result": "error",
                                "message": failure["fault"]["message"]}


def test_a_failure_whose_truth_cannot_be_read_only_ends_the_task(tmp_path: Path,
                                                                 make_spec: SpecFactory) -> None:
    class DeadDriver(FakeDriver):
        def get_info(self, instance_uuid: str) -> str:
            raise HypervisorError("cannot connect to libvirt at qemu:///system")

    manager, reporter = make_manager(DeadDriver(), tmp_path)
    uuid = make_spec()["instance_uuid"]
    manager.family(Lifecycle).pause_instance(uuid, 4)
    failure = updates(reporter)[-1]
    assert failure["values"] == {"task_state": None}
    assert failure["fault"]["message"] == "cannot connect to libvirt at qemu:///system"


@pytest.mark.parametrize(("reboot_type", "spec_change", "message"), [
    ("WARM", {}, "unknown reboot type 'WARM': expected SOFT or HARD"),
    ("HARD", {"version": 9}, "unsupported spec version 9, expected 1"),
    ("HARD", {"instance_uuid": "6b1b3e1c-0d51-4c38-9f43-6e2c1b8d7a10"},
     "spec is for instance 6b1b3e1c-0d51-4c38-9f43-6e2c1b8d7a10, not {uuid}")])
def test_a_malformed_reboot_fails_and_leaves_the_guest_alone(managed: Managed, make_spec: SpecFactory,
                                                             reboot_type: str, spec_change: dict[str, Any],
                                                             message: str) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    boots = boot_marker(manager, uuid)
    manager.family(Lifecycle).reboot_instance(uuid, 1, reboot_type, {**spec, **spec_change})
    failure = updates(reporter)[-1]
    assert failure["values"] == ACTIVE
    assert failure["fault"]["message"] == message.format(uuid=uuid)
    assert boot_marker(manager, uuid) == boots


def test_power_off_timeouts(tmp_path: Path, make_spec: SpecFactory) -> None:
    waits: list[float] = []

    class RecordingDriver(FakeACPIIgnoringDriver):
        def shutdown(self, instance_uuid: str, timeout: float) -> bool:
            waits.append(timeout)
            return False

    manager, reporter = make_manager(RecordingDriver(), tmp_path, COMPUTE_CLEAN_SHUTDOWN_TIMEOUT="42",
                                     COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT="100")
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    messages = []
    for action_id, timeout in enumerate([None, 7, 500, -1, "soon", True, 0], start=1):
        manager.family(Lifecycle).power_on_instance(uuid, 100 + action_id, spec)
        manager.family(Lifecycle).power_off_instance(uuid, action_id, timeout)  # type: ignore[arg-type]
        messages.append(updates(reporter)[-1]["event"]["message"])
    assert waits == [42, 7, 70, 42, 42, 42]  # default, as given, capped, default for nonsense; 0: no wait
    assert messages[:2] == ["guest did not shut down within 42 s; forced off",
                            "guest did not shut down within 7 s; forced off"]
    assert messages[-1].startswith("forced off in ") and messages[-1].endswith(
        "(timeout 0: no clean shutdown asked)")


@pytest.mark.parametrize(("prepare", "message"), [
    ("pause", "guest was paused and cannot act on an ACPI request; forced off in "),
    ("suspend", "saved memory state discarded; domain shut off in ")])
def test_power_off_of_a_guest_that_cannot_shut_down_itself(managed: Managed, make_spec: SpecFactory,
                                                           prepare: str, message: str) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    getattr(manager.driver, prepare)(uuid)
    started = time.monotonic()
    manager.family(Lifecycle).power_off_instance(uuid, 1, 30)
    assert time.monotonic() - started < 5  # no wait for an ACPI request nobody can act on
    success = updates(reporter)[-1]
    assert success["values"] == STOPPED and success["event"]["message"].startswith(message)
    assert manager.driver.get_info(uuid) == contract.POWER_SHUTDOWN


@pytest.mark.parametrize(("prepare", "message"), [
    ("suspend", "started from its saved memory state in "), ("pause", "guest was paused; unpaused in ")])
def test_power_on_converges_from_any_state(managed: Managed, make_spec: SpecFactory, prepare: str,
                                           message: str) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    getattr(manager.driver, prepare)(uuid)
    manager.family(Lifecycle).power_on_instance(uuid, 1, spec)
    assert updates(reporter)[-1]["event"]["message"].startswith(message)
    assert manager.driver.get_info(uuid) == contract.POWER_RUNNING


def test_resume_of_a_paused_guest_unpauses_it(managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    manager.driver.pause(uuid)
    manager.family(Lifecycle).resume_instance(uuid, 1)
    assert updates(reporter)[-1]["event"]["message"].startswith("guest was paused, not suspended; unpaused")
    assert manager.driver.get_info(uuid) == contract.POWER_RUNNING


def test_the_journal_ignores_a_line_cut_by_a_crash(tmp_path: Path, make_spec: SpecFactory) -> None:
    journal = ActionJournal(tmp_path)
    uuid = make_spec()["instance_uuid"]
    assert not journal.done(uuid, 1)
    journal.record(uuid, 1, "success")
    with open(journal.path(uuid), "a") as file:
        file.write("12")  # the start of "123 success\n", then the host died
    assert journal.done(uuid, 1) and not journal.done(uuid, 12) and not journal.done(uuid, 123)
    journal.record(uuid, 124, "error")
    assert journal.path(uuid).read_text() == "1 success\n12\n124 error\n"
    assert journal.done(uuid, 124) and not journal.done(uuid, 12)
    with pytest.raises(ValueError):
        journal.record(uuid, 125, "maybe")


# Tasks ------------------------------------------------------------------------------------------------

def test_lifecycle_tasks_take_the_contract_kwargs(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(FakeDriver(), tmp_path)
    app = create_app(manager.config)
    register_tasks(app, manager)
    app.finalize()
    spec = make_spec()
    uuid = spec["instance_uuid"]
    manager.family(Build).spawn(spec)
    reporter.reports.clear()
    calls: list[tuple[str, dict[str, Any]]] = [
        (contract.COMPUTE_REBOOT, {"reboot_type": "SOFT", "spec": spec}),
        (contract.COMPUTE_REBOOT, {"reboot_type": "HARD", "spec": spec}),
        (contract.COMPUTE_PAUSE, {}), (contract.COMPUTE_UNPAUSE, {}),
        (contract.COMPUTE_SUSPEND, {}), (contract.COMPUTE_RESUME, {}),
        (contract.COMPUTE_POWER_OFF, {"timeout": 30}), (contract.COMPUTE_POWER_ON, {"spec": spec}),
    ]
    for action_id, (name, kwargs) in enumerate(calls, start=1):
        task = app.tasks[name]
        assert (task.soft_time_limit, task.time_limit) == (300, 360) and task.ignore_result
        task.run(instance_uuid=uuid, action_id=action_id, **kwargs)
    results = [update for update in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
               if update["event"]["result"] != "start"]
    assert [(u["event"]["name"], u["event"]["result"], u["action_id"]) for u in results] == [
        ("compute_reboot_instance", "success", 1), ("compute_reboot_instance", "success", 2),
        ("compute_pause_instance", "success", 3), ("compute_unpause_instance", "success", 4),
        ("compute_suspend_instance", "success", 5), ("compute_resume_instance", "success", 6),
        ("compute_stop_instance", "success", 7), ("compute_start_instance", "success", 8)]
