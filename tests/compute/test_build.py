"""Build operations (spawn, terminate, console output) with a list reporter: what the conductor is told,
what is left on the host, and the build tasks."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.app import create_app
from compute_workers.exception import HypervisorError
from compute_workers.journal import SpawnJournal
from compute_workers.manager import ComputeManager
from compute_workers.operations import Build
from compute_workers.reporter import ListReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeBuildAbortDriver, FakeDriver
from compute_workers.virt.libvirt.driver import LibvirtDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import HOST, ImageServer, Managed, SpecFactory, make_manager

ACTIVE = {"vm_state": "active", "task_state": None, "power_state": "running"}


def names(reporter: ListReporter) -> list[str]:
    return [name for name, _ in reporter.reports]


def last_update(reporter: ListReporter) -> dict[str, Any]:
    return reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]


@pytest.fixture
def libvirt_manager(tmp_path: Path) -> tuple[ComputeManager, ListReporter]:
    return make_manager(LibvirtTestDriver("test:///default", tmp_path / "instances"), tmp_path / "instances",
                        COMPUTE_LIBVIRT_URI="test:///default")


def test_spawn_reports_active(libvirt_manager: tuple[ComputeManager, ListReporter],
                              make_spec: SpecFactory) -> None:
    manager, reporter = libvirt_manager
    spec = make_spec()
    manager.family(Build).spawn(spec)
    assert names(reporter) == [contract.CONDUCTOR_INSTANCE_UPDATE]
    update = last_update(reporter)
    assert update["instance_uuid"] == spec["instance_uuid"] and update["host"] == HOST
    assert update["expected_task_state"] == "spawning"
    assert update["values"] == ACTIVE
    assert update["event"]["name"] == "compute_spawn" and update["event"]["result"] == "success"
    assert update["fault"] is None
    assert manager.driver.list_instances() == {spec["instance_uuid"]: contract.POWER_RUNNING}


def test_redelivered_spawn_reports_again_without_a_second_domain(
        libvirt_manager: tuple[ComputeManager, ListReporter], make_spec: SpecFactory) -> None:
    manager, reporter = libvirt_manager
    spec = make_spec()
    manager.family(Build).spawn(spec)
    manager.family(Build).spawn(spec)
    updates = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
    assert [u["values"] for u in updates] == [ACTIVE, ACTIVE]
    assert "redelivered spawn ignored" in updates[1]["event"]["message"]
    assert isinstance(manager.driver, LibvirtDriver)
    domains = [d.name() for d in manager.driver.conn.listAllDomains()]
    assert domains.count(contract.domain_name(spec["instance_uuid"])) == 1
    assert len(domains) == 2  # and the test driver's own "test"


def test_concurrent_redeliveries_build_once(tmp_path: Path, make_spec: SpecFactory) -> None:
    spawns: list[str] = []

    class CountingDriver(FakeDriver):
        def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
            spawns.append(spec["instance_uuid"])
            super().spawn(spec, base_image)

    manager, reporter = make_manager(CountingDriver(spawn_delay=0.2), tmp_path)
    spec = make_spec()
    threads = [threading.Thread(target=manager.family(Build).spawn, args=(spec,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert spawns == [spec["instance_uuid"]]
    assert [u["values"] for u in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)] == [ACTIVE] * 4


def test_spawn_of_a_defined_but_stopped_domain_starts_it(
        libvirt_manager: tuple[ComputeManager, ListReporter], make_spec: SpecFactory) -> None:
    manager, reporter = libvirt_manager
    spec = make_spec()
    manager.family(Build).spawn(spec)
    manager.driver.power_off(spec["instance_uuid"], 10)
    # A previous attempt died between define and start: it journaled nothing.
    manager.family(Build).spawns.path(spec["instance_uuid"]).unlink()
    manager.family(Build).spawn(spec)
    assert manager.driver.get_info(spec["instance_uuid"]) == contract.POWER_RUNNING
    assert last_update(reporter)["values"] == ACTIVE


def test_a_late_redelivered_spawn_leaves_a_server_stopped_since_as_it_is(
        managed: Managed, make_spec: SpecFactory) -> None:
    """Redis may deliver a spawn again hours after it ran (a worker that died before acknowledging
    it); the user stopped (or paused) the server meanwhile: the redelivery must not start it."""
    manager, reporter = managed
    spec = make_spec()
    uuid = spec["instance_uuid"]
    manager.family(Build).spawn(spec)
    manager.driver.power_off(uuid, 0)
    manager.family(Build).spawn(spec)
    assert manager.driver.get_info(uuid) == contract.POWER_SHUTDOWN
    # Its report says what is true (the conductor drops it: the server is no longer spawning).
    assert last_update(reporter)["values"] == {"vm_state": "stopped", "task_state": None,
                                               "power_state": "shutdown"}
    manager.driver.power_on(uuid, spec)
    manager.driver.pause(uuid)
    manager.family(Build).spawn(spec)
    assert manager.driver.get_info(uuid) == contract.POWER_PAUSED


def test_a_late_redelivered_spawn_builds_no_server_deleted_or_failed_since(
        managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    build = manager.family(Build)
    spec = make_spec()
    build.spawn(spec)
    build.terminate(spec["instance_uuid"])
    reporter.reports.clear()
    build.spawn(spec)  # the server was deleted since: nothing is built again, nothing reported
    assert manager.driver.list_instances() == {}
    assert reporter.reports == []

    failing = make_spec(host="elsewhere")  # refused: not journaled, refused again
    build.spawn(failing)
    build.spawn(failing)
    assert len(reporter.named(contract.CONDUCTOR_BUILD_FAILED)) == 2


def test_a_redelivered_spawn_whose_build_failed_does_not_build_again(tmp_path: Path,
                                                                    make_spec: SpecFactory) -> None:
    attempts: list[str] = []

    class FailingOnceDriver(FakeDriver):
        def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
            attempts.append(spec["instance_uuid"])
            if len(attempts) == 1:
                raise HypervisorError("libvirt cannot start the domain: no memory")
            super().spawn(spec, base_image)

    manager, reporter = make_manager(FailingOnceDriver(), tmp_path)
    spec = make_spec()
    manager.family(Build).spawn(spec)
    manager.family(Build).spawn(spec)  # the conductor rescheduled it elsewhere meanwhile
    assert len(attempts) == 1 and manager.driver.list_instances() == {}
    assert len(reporter.named(contract.CONDUCTOR_BUILD_FAILED)) == 1
    # A spawn of the same instance for another request (a rebuild here) is no redelivery: it runs.
    manager.family(Build).spawn({**spec, "request_id": "req-rebuild"})
    assert len(attempts) == 2 and manager.driver.list_instances() == {spec["instance_uuid"]: "running"}


def test_failing_driver_reports_build_failed_and_cleans_up(tmp_path: Path, make_spec: SpecFactory) -> None:
    driver = FakeBuildAbortDriver()
    manager, reporter = make_manager(driver, tmp_path)
    spec = make_spec()
    manager.family(Build).spawn(spec)
    assert names(reporter) == [contract.CONDUCTOR_BUILD_FAILED]
    failed = reporter.named(contract.CONDUCTOR_BUILD_FAILED)[0]
    assert failed["instance_uuid"] == spec["instance_uuid"] and failed["host"] == HOST
    assert failed["reschedule"] is True
    assert failed["fault"]["message"] == "fake hypervisor refused to start the domain"
    assert failed["fault"]["code"] == 500
    assert "HypervisorError" in failed["fault"]["details"]
    assert driver.list_instances() == {}  # the half-built domain was removed


def test_unexpected_errors_are_reported_and_rescheduled(tmp_path: Path, make_spec: SpecFactory) -> None:
    class BrokenDriver(FakeDriver):
        def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
            raise KeyError("boom")

    manager, reporter = make_manager(BrokenDriver(), tmp_path)
    manager.family(Build).spawn(make_spec())
    failed = reporter.named(contract.CONDUCTOR_BUILD_FAILED)[0]
    assert failed["reschedule"] is True
    assert failed["fault"]["message"] == f"unexpected error on host {HOST}: KeyError: 'boom'"


def test_checksum_mismatch_is_not_rescheduled(tmp_path: Path, make_spec: SpecFactory,
                                              image_server: ImageServer, small_qcow2: bytes) -> None:
    driver = FakeDriver(needs_base_image=True)
    manager, reporter = make_manager(driver, tmp_path)
    image = image_server.add("tiny", small_qcow2, sha256="cd" * 32)
    spec = make_spec(image=image)
    manager.family(Build).spawn(spec)
    assert names(reporter) == [contract.CONDUCTOR_INSTANCE_UPDATE, contract.CONDUCTOR_BUILD_FAILED]
    assert reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[0]["event"]["name"] == "compute_prep_image"
    failed = reporter.named(contract.CONDUCTOR_BUILD_FAILED)[0]
    assert failed["reschedule"] is False
    expected = f"Image tiny checksum mismatch: expected sha256 {'cd' * 32}, got "
    assert failed["fault"]["message"].startswith(expected)
    assert driver.list_instances() == {}
    assert not (tmp_path / "_base" / "tiny").exists()


def test_spawn_with_image_reports_image_events(tmp_path: Path, make_spec: SpecFactory,
                                               image_server: ImageServer, small_qcow2: bytes) -> None:
    driver = FakeDriver(needs_base_image=True)
    manager, reporter = make_manager(driver, tmp_path)
    spec = make_spec(image=image_server.add("tiny", small_qcow2))
    manager.family(Build).spawn(spec)
    events = [u["event"] for u in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)]
    assert [(e["name"], e["result"]) for e in events] == [
        ("compute_prep_image", "start"), ("compute_prep_image", "success"), ("compute_spawn", "success")]
    assert "downloaded" in events[1]["message"]
    assert (tmp_path / "_base" / "tiny").read_bytes() == small_qcow2


@pytest.mark.parametrize("change", [{"version": 2}, {"flavor": {"vcpus": -1}}, {"host": "elsewhere"},
                                    {"instance_uuid": "../../etc"}])
def test_bad_spec_is_not_rescheduled(tmp_path: Path, make_spec: SpecFactory, change: dict[str, Any]) -> None:
    driver = FakeDriver()
    manager, reporter = make_manager(driver, tmp_path)
    spec = make_spec(**change)
    manager.family(Build).spawn(spec)
    assert names(reporter) == [contract.CONDUCTOR_BUILD_FAILED]
    assert reporter.named(contract.CONDUCTOR_BUILD_FAILED)[0]["reschedule"] is False
    assert driver.list_instances() == {}


def test_terminate_reports_destroyed(libvirt_manager: tuple[ComputeManager, ListReporter],
                                     make_spec: SpecFactory) -> None:
    manager, reporter = libvirt_manager
    spec = make_spec()
    manager.family(Build).spawn(spec)
    manager.family(Build).terminate(spec["instance_uuid"])
    assert reporter.reports[-1] == (contract.CONDUCTOR_INSTANCE_DESTROYED,
                                    {"instance_uuid": spec["instance_uuid"], "host": HOST})
    assert manager.driver.list_instances() == {}


def test_terminate_of_a_missing_instance_reports_destroyed(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(FakeDriver(), tmp_path)
    uuid = make_spec()["instance_uuid"]
    manager.family(Build).terminate(uuid)
    assert reporter.reports == [(contract.CONDUCTOR_INSTANCE_DESTROYED,
                                 {"instance_uuid": uuid, "host": HOST})]


def test_failed_terminate_reports_error_with_fault(tmp_path: Path, make_spec: SpecFactory) -> None:
    class StuckDriver(FakeDriver):
        def destroy(self, instance_uuid: str) -> None:
            raise HypervisorError("libvirt cannot stop instance-x: device busy")

    manager, reporter = make_manager(StuckDriver(), tmp_path)
    uuid = make_spec()["instance_uuid"]
    manager.family(Build).terminate(uuid)
    assert names(reporter) == [contract.CONDUCTOR_INSTANCE_UPDATE]
    update = last_update(reporter)
    assert update["expected_task_state"] == "deleting"
    assert update["values"] == {"vm_state": "error", "task_state": None}
    assert update["fault"]["message"] == "libvirt cannot stop instance-x: device busy"


def test_terminate_during_spawn_waits_for_it(tmp_path: Path, make_spec: SpecFactory) -> None:
    class SpawnSignallingDriver(FakeDriver):
        def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
            spawning.set()
            super().spawn(spec, base_image)

    spawning = threading.Event()
    manager, reporter = make_manager(SpawnSignallingDriver(spawn_delay=0.3), tmp_path)
    spec = make_spec()
    spawn = threading.Thread(target=manager.family(Build).spawn, args=(spec,))
    spawn.start()
    assert spawning.wait(10)  # the spawn holds the instance's lock: the delete must wait for it
    manager.family(Build).terminate(spec["instance_uuid"])
    spawn.join()
    assert names(reporter) == [contract.CONDUCTOR_INSTANCE_UPDATE, contract.CONDUCTOR_INSTANCE_DESTROYED]
    assert manager.driver.list_instances() == {}


def test_console_output_answers_instead_of_raising(libvirt_manager: tuple[ComputeManager, ListReporter],
                                                   make_spec: SpecFactory) -> None:
    manager, _ = libvirt_manager
    spec = make_spec()
    manager.family(Build).spawn(spec)
    assert isinstance(manager.driver, LibvirtDriver)
    log = manager.driver.instance_dir(spec["instance_uuid"]) / "console.log"
    log.write_text("booting\ncloudctl-guest: ready\n")
    assert manager.family(Build).get_console_output(spec["instance_uuid"], 1) == {
        "output": "cloudctl-guest: ready\n"}
    assert manager.family(Build).get_console_output(spec["instance_uuid"], None) == {
        "output": "booting\ncloudctl-guest: ready\n"}
    log.unlink()
    assert manager.family(Build).get_console_output(spec["instance_uuid"], 1)["error"] == "ConsoleUnavailable"
    missing = manager.family(Build).get_console_output(make_spec()["instance_uuid"], 10)
    assert missing["error"] == "InstanceNotFound" and "not found" in missing["message"]
    assert manager.family(Build).get_console_output("../../etc/shadow", 10)["error"] == "InstanceNotFound"


def test_existing_domain_that_cannot_start_is_reported_in_error_and_kept(tmp_path: Path,
                                                                         make_spec: SpecFactory) -> None:
    class NoStartDriver(FakeDriver):
        def power_on(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
            raise HypervisorError("libvirt cannot start the domain: no memory")

    driver = NoStartDriver()
    manager, reporter = make_manager(driver, tmp_path)
    spec = make_spec()
    driver.spawn(spec, None)
    driver.instances[spec["instance_uuid"]].power_state = contract.POWER_SHUTDOWN
    manager.family(Build).spawn(spec)  # redelivered: a domain of that instance is already defined
    assert names(reporter) == [contract.CONDUCTOR_INSTANCE_UPDATE]  # not build_failed: no reschedule
    update = last_update(reporter)
    assert update["expected_task_state"] == "spawning"
    assert update["values"] == {"vm_state": "error", "task_state": None}
    assert update["fault"]["message"] == "libvirt cannot start the domain: no memory"
    assert driver.list_instances() == {spec["instance_uuid"]: contract.POWER_SHUTDOWN}  # never removed


def test_spawn_that_cannot_see_the_hypervisor_removes_nothing(tmp_path: Path, make_spec: SpecFactory) -> None:
    destroyed: list[str] = []

    class BlindDriver(FakeDriver):
        def get_info(self, instance_uuid: str) -> str:
            raise HypervisorError("cannot look up instance: libvirtd is restarting")

        def destroy(self, instance_uuid: str) -> None:
            destroyed.append(instance_uuid)

    manager, reporter = make_manager(BlindDriver(), tmp_path)
    manager.family(Build).spawn(make_spec())
    failed = reporter.named(contract.CONDUCTOR_BUILD_FAILED)[0]
    assert failed["reschedule"] is True
    assert failed["fault"]["message"] == "cannot look up instance: libvirtd is restarting"
    assert destroyed == []  # it may be a running instance of a redelivered spawn: never touch it


# Tasks ------------------------------------------------------------------------------------------------

def test_tasks_are_registered_with_contract_names_and_limits(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(FakeDriver(), tmp_path)
    app = create_app(manager.config)
    register_tasks(app, manager)
    app.finalize()
    spawn = app.tasks[contract.COMPUTE_SPAWN]
    assert (spawn.soft_time_limit, spawn.time_limit) == (900, 960) and spawn.ignore_result
    assert app.tasks[contract.COMPUTE_TERMINATE].time_limit == 180
    console = app.tasks[contract.COMPUTE_CONSOLE_OUTPUT]
    assert not console.ignore_result and console.time_limit == 30

    spec = make_spec()
    spawn.run(spec=spec)  # what a delivered message calls: the thin task runs the manager
    assert reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[0]["values"]["vm_state"] == "active"
    assert console.run(instance_uuid=spec["instance_uuid"], lines=None)["output"].endswith(
        "cloudctl-guest: ready\n")
    app.tasks[contract.COMPUTE_TERMINATE].run(instance_uuid=spec["instance_uuid"])
    assert reporter.named(contract.CONDUCTOR_INSTANCE_DESTROYED) == [
        {"instance_uuid": spec["instance_uuid"], "host": HOST}]


def test_the_spawn_journal_is_per_host_and_per_request(tmp_path: Path, make_spec: SpecFactory) -> None:
    """INSTANCES_PATH may be shared by several hosts: one host's record says nothing of another's spawn;
    a record is of one request (a rebuild's spawn is not a redelivery); a record written half counts."""
    uuid = make_spec()["instance_uuid"]
    here, there = SpawnJournal(tmp_path, "host-a"), SpawnJournal(tmp_path, "host-b")
    here.record(uuid, "req-1", "success")
    assert here.done(uuid, "req-1") == {"instance_uuid": uuid, "request_id": "req-1", "result": "success",
                                        "at": pytest.approx(time.time(), abs=60)}
    assert there.done(uuid, "req-1") is None
    assert here.done(uuid, "req-2") is None
    here.path(uuid).write_text("{not json")
    assert here.done(uuid, "req-2") == {"result": "error", "request_id": "req-2"}
    with pytest.raises(ValueError):
        here.record(uuid, "req-1", "maybe")
