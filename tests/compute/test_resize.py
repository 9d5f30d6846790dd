"""Cold migration and resize (the Resize family): the steps' reports, same-host confirm and revert, the
migration journal (redeliveries), failures put back, the tasks. Run against the fake driver and
LibvirtTestDriver (test:///default); the real disk copy is in test_resize_real_qemu.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.app import create_app
from compute_workers.config import ComputeConfig, ConfigError
from compute_workers.journal import MigrationJournal
from compute_workers.manager import ComputeManager
from compute_workers.operations import Build, Resize
from compute_workers.operations import resize as resize_module
from compute_workers.reporter import ListReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeDriver, FakeMigrationCopyFailsDriver
from compute_workers.virt.libvirt.driver import LibvirtDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import HOST, Managed, SpecFactory, make_manager, spawned

BIGGER = {"name": "m1.micro", "vcpus": 2, "memory_mb": 256, "root_gb": 2}



def local_uri(manager: ComputeManager) -> str:
    return manager.driver.uri if isinstance(manager.driver, LibvirtDriver) else "fake://"


def migration_updates(reporter: ListReporter) -> list[dict[str, Any]]:
    return reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)


def statuses(reporter: ListReporter) -> list[tuple[str, str]]:
    return [(u["status"], u["event"]["name"]) for u in migration_updates(reporter)]


def resize_to(manager: ComputeManager, spec: dict[str, Any], migration_id: int,
              flavor: dict[str, Any] | None = None, power_on: bool = True) -> dict[str, Any]:
    """prep_resize, resize_instance and finish_resize on this one host; returns the new spec."""
    new_spec = {**spec, "flavor": flavor or BIGGER}
    uuid = spec["instance_uuid"]
    manager.family(Resize).prep_resize(uuid, migration_id, new_spec, None)
    manager.family(Resize).resize_instance(uuid, migration_id, HOST, local_uri(manager), 5)
    manager.family(Resize).finish_resize(uuid, migration_id, new_spec, power_on)
    return new_spec


def flavor_of(manager: ComputeManager, uuid: str) -> tuple[int, int]:
    """(vcpus, memory MiB) of the domain as the hypervisor defines it."""
    driver = manager.driver
    if isinstance(driver, FakeDriver):
        flavor = driver.instances[uuid].spec["flavor"]
        return flavor["vcpus"], flavor["memory_mb"]
    domain = driver.conn.lookupByName(contract.domain_name(uuid))
    _state, _max, memory_kib, vcpus, _cpu = domain.info()
    return vcpus, memory_kib // 1024


def resize_files(manager: ComputeManager, uuid: str) -> bool:
    """Whether the source still keeps the original (<uuid>_resize)."""
    if isinstance(manager.driver, FakeDriver):
        return uuid in manager.driver.resize_sources
    return (manager.config.instances_path / f"{uuid}_resize").is_dir()


def test_same_host_resize_then_confirm(managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    resize_to(manager, spec, 7)
    updates = migration_updates(reporter)
    assert statuses(reporter) == [("prepared", "compute_prep_resize"),
                                  ("migrated", "compute_resize_instance"),
                                  ("finished", "compute_finish_resize")]
    for update in updates:
        assert update["migration_id"] == 7 and update["host"] == HOST and update["error"] is None
        assert update["event"]["result"] == "success"
    assert updates[1]["event"]["message"].startswith("guest shut down cleanly; disk of ")
    assert " copied to test-host in " in updates[1]["event"]["message"]
    assert updates[2]["values"] == {"power_state": "running"}
    assert ("flavor m1.micro (2 vCPU, 256 MiB RAM, 2 GiB disk) and started in "
            in updates[2]["event"]["message"])
    assert manager.driver.get_info(uuid) == "running"
    assert flavor_of(manager, uuid) == (2, 256)
    assert resize_files(manager, uuid)
    # Only instance updates of the instance itself: the power-state ones are the watcher's business.
    assert reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE) == []

    reporter.reports.clear()
    manager.family(Resize).confirm_resize(uuid, 7)
    assert statuses(reporter) == [("confirmed", "compute_confirm_resize")]
    assert not resize_files(manager, uuid)
    assert manager.driver.get_info(uuid) == "running"  # the same-host domain IS the instance
    assert flavor_of(manager, uuid) == (2, 256)


def test_same_host_resize_then_revert(managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    resize_to(manager, spec, 8)
    reporter.reports.clear()
    manager.family(Resize).revert_resize(uuid, 8)
    assert statuses(reporter) == [("reverted_dest", "compute_revert_resize")]
    assert uuid not in manager.driver.list_instances()
    assert resize_files(manager, uuid)  # the original is untouched
    manager.family(Resize).finish_revert_resize(uuid, 8, spec, True)
    update = migration_updates(reporter)[-1]
    assert (update["status"], update["values"]) == ("reverted", {"power_state": "running"})
    assert update["event"]["message"].startswith(f"instance {uuid} back on {HOST} on its original disk")
    assert manager.driver.get_info(uuid) == "running"
    assert flavor_of(manager, uuid) == (1, 128)
    assert not resize_files(manager, uuid)
    if isinstance(manager.driver, LibvirtDriver):
        directory = manager.config.instances_path / uuid
        assert (directory / "libvirt.xml").exists() and not (directory / "resize-source.json").exists()


def test_a_stopped_instance_is_resized_and_stays_stopped(managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    manager.driver.power_off(uuid, 0)
    resize_to(manager, spec, 9, power_on=False)
    updates = migration_updates(reporter)
    assert updates[1]["event"]["message"].startswith("guest was already shut off; ")
    assert updates[2]["values"] == {"power_state": "shutdown"}
    assert updates[2]["event"]["message"].endswith("and left shut off")
    assert manager.driver.get_info(uuid) == "shutdown"


def test_every_step_redelivered_is_a_logged_no_op(managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    new_spec = resize_to(manager, spec, 11)
    reporter.reports.clear()
    resize_to(manager, spec, 11)  # Redis delivers every step again
    assert reporter.reports == []
    assert manager.driver.get_info(uuid) == "running" and resize_files(manager, uuid)
    manager.family(Resize).revert_resize(uuid, 11)
    manager.family(Resize).finish_revert_resize(uuid, 11, spec, True)
    reporter.reports.clear()
    manager.family(Resize).revert_resize(uuid, 11)  # would destroy the reverted instance on this same host
    manager.family(Resize).finish_revert_resize(uuid, 11, spec, True)
    manager.family(Resize).finish_resize(uuid, 11, new_spec, True)
    assert reporter.reports == []
    assert manager.driver.get_info(uuid) == "running" and flavor_of(manager, uuid) == (1, 128)
    journal = MigrationJournal(manager.config.instances_path)
    record = journal.done(11, "resize_instance")
    assert record is not None
    assert record["result"] == "success" and record["dest_host"] == HOST and record["instance_uuid"] == uuid
    assert journal.done(12, "resize_instance") is None


def test_a_second_resize_waits_for_the_first_to_be_confirmed(managed: Managed,
                                                             make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    resize_to(manager, spec, 1)
    reporter.reports.clear()
    manager.family(Resize).resize_instance(uuid, 2, HOST, local_uri(manager), 5)
    (update,) = migration_updates(reporter)
    assert update["status"] == "error" and update["values"] == {"power_state": "running"}
    assert "an earlier resize" in update["error"] and update["event"]["result"] == "error"
    assert manager.driver.get_info(uuid) == "running" and resize_files(manager, uuid)


def test_finish_revert_refuses_while_the_resized_copy_is_still_here(managed: Managed,
                                                                     make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    resize_to(manager, spec, 3)
    reporter.reports.clear()
    manager.family(Resize).finish_revert_resize(uuid, 3, spec, True)  # revert_resize did not run
    (update,) = migration_updates(reporter)
    assert update["status"] == "error" and "resized copy" in update["error"]
    assert update["values"] == {"power_state": "running"}
    assert manager.driver.get_info(uuid) == "running" and flavor_of(manager, uuid) == (2, 256)
    assert resize_files(manager, uuid)


def test_a_failed_copy_puts_everything_back(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(FakeMigrationCopyFailsDriver(), tmp_path / "instances")
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    manager.family(Resize).resize_instance(uuid, 4, "other-host", "fake://other", 5)
    (update,) = migration_updates(reporter)
    assert update["status"] == "error" and update["values"] == {"power_state": "running"}
    assert update["error"] == "fake destination fake://other refused the disk half-way"
    assert manager.driver.get_info(uuid) == "running"
    assert "cloudctl-guest: boot-count 2" in manager.family(Build).get_console_output(uuid, None)["output"]
    assert not resize_files(manager, uuid)
    assert MigrationJournal(manager.config.instances_path).done(4, "resize_instance")["result"] == "error"


def test_an_unreachable_destination_changes_nothing(tmp_path: Path, make_spec: SpecFactory) -> None:
    instances = tmp_path / "instances"
    manager, reporter = make_manager(LibvirtTestDriver("test:///default", instances), instances,
                                     COMPUTE_LIBVIRT_URI="test:///default")
    try:
        spec = make_spec()
        uuid = spawned(manager, reporter, spec)
        manager.family(Resize).resize_instance(uuid, 5, "other-host", "qemu+tcp://127.0.0.1:1/system", 5)
        (update,) = migration_updates(reporter)
        assert update["status"] == "error" and update["values"] == {"power_state": "running"}
        assert update["error"].startswith("cannot connect to the destination hypervisor at "
                                          "qemu+tcp://127.0.0.1:1/system: ")
        assert update["error"].endswith("; nothing was changed on this host")
        assert manager.driver.get_info(uuid) == "running"
        assert sorted(p.name for p in instances.iterdir()) == [".migrations", ".spawns", uuid]
    finally:
        for instance_uuid in manager.driver.list_instances():
            manager.driver.destroy(instance_uuid)
        manager.close()


def test_confirm_removes_a_leftover_definition_only_when_the_instance_moved(
        managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    # Cross-host as the source sees it: resize_instance to another host ...
    manager.family(Resize).resize_instance(uuid, 21, "other-host", local_uri(manager), 5)
    assert migration_updates(reporter)[-1]["status"] == "migrated"
    # ... then something defined the domain here again (a leftover the source must not keep).
    if isinstance(manager.driver, FakeDriver):
        manager.driver.spawn(spec, None)
    else:
        manager.driver.finish_migration(spec, power_on=True)
    manager.family(Resize).confirm_resize(uuid, 21)
    assert migration_updates(reporter)[-1]["status"] == "confirmed"
    assert uuid not in manager.driver.list_instances()
    assert not resize_files(manager, uuid)


def test_prep_resize_removes_the_marker_and_checks_the_spec(managed: Managed, make_spec: SpecFactory) -> None:
    manager, reporter = managed
    spec = make_spec()
    uuid = spec["instance_uuid"]
    instances = manager.config.instances_path
    instances.mkdir(parents=True, exist_ok=True)
    (instances / ".shared-abc123").write_text("")
    (instances / "keep").write_text("")
    manager.family(Resize).prep_resize(uuid, 30, spec, ".shared-abc123")
    manager.family(Resize).prep_resize(uuid, 31, spec, "../keep")  # never a path
    assert not (instances / ".shared-abc123").exists() and (instances / "keep").exists()
    manager.family(Resize).prep_resize(uuid, 32, {**spec, "host": "elsewhere"}, None)
    manager.family(Resize).finish_resize(uuid, 33, {**spec, "instance_uuid": "not-a-uuid"}, True)
    manager.family(Resize).finish_resize("not-a-uuid", 34, spec, True)
    manager.family(Resize).finish_resize(uuid, 35, None, True)  # type: ignore[arg-type]
    manager.family(Resize).confirm_resize(uuid, "36")  # type: ignore[arg-type]  # no report can name it: dropped
    results = [(u["migration_id"], u["status"], u["error"]) for u in migration_updates(reporter)]
    assert results == [
        (30, "prepared", None), (31, "prepared", None),
        (32, "error", f"spec is for host elsewhere, not {HOST}"),
        (33, "error", f"spec is for instance not-a-uuid, not {uuid}"),
        (34, "error", "invalid instance uuid 'not-a-uuid'"),
        (35, "error", f"no spec for instance {uuid}: this step needs one")]
    assert uuid not in manager.driver.list_instances()


def test_finish_resize_without_the_copied_disk_defines_nothing(managed: Managed,
                                                               make_spec: SpecFactory) -> None:
    manager, reporter = managed
    if isinstance(manager.driver, LibvirtDriver):
        pytest.skip("test:// domains have no disk to miss")
    spec = make_spec()
    manager.family(Resize).finish_resize(spec["instance_uuid"], 40, spec, True)
    (update,) = migration_updates(reporter)
    assert update["status"] == "error" and "was not copied here" in update["error"]
    assert update["values"] == {"power_state": "nostate"}
    assert manager.driver.list_instances() == {}


def test_fake_hosts_migrate_to_each_other(tmp_path: Path, make_spec: SpecFactory) -> None:
    source, source_reports = make_manager(FakeDriver(), tmp_path / "a", COMPUTE_HOST="host-a")
    dest, dest_reports = make_manager(FakeDriver(), tmp_path / "b", COMPUTE_HOST="host-b")
    spec = make_spec(host="host-a")
    uuid = spawned(source, source_reports, spec)
    moved = {**spec, "host": "host-b"}
    dest.family(Resize).prep_resize(uuid, 50, moved, None)
    source.family(Resize).resize_instance(uuid, 50, "host-b", "fake://host-b", 5)
    dest.family(Resize).finish_resize(uuid, 50, moved, True)
    source.family(Resize).confirm_resize(uuid, 50)
    assert [u["status"] for u in source_reports.named(contract.CONDUCTOR_MIGRATION_UPDATE)] == [
        "migrated", "confirmed"]
    assert [u["status"] for u in dest_reports.named(contract.CONDUCTOR_MIGRATION_UPDATE)] == [
        "prepared", "finished"]
    assert source.driver.list_instances() == {} and dest.driver.list_instances() == {uuid: "running"}
    assert "cloudctl-guest: boot-count 2" in dest.family(Build).get_console_output(uuid, None)["output"]


def test_resize_tasks_are_registered_with_their_limits(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(FakeDriver(), tmp_path)
    app = create_app(manager.config)
    register_tasks(app, manager)
    app.finalize()
    spec = make_spec()
    uuid = spawned(manager, reporter, spec)
    new_spec = {**spec, "flavor": BIGGER}
    resize = app.tasks[contract.COMPUTE_RESIZE_INSTANCE]
    assert (resize.soft_time_limit, resize.time_limit) == (1800, 1860) and resize.ignore_result
    for name in (contract.COMPUTE_PREP_RESIZE, contract.COMPUTE_FINISH_RESIZE,
                 contract.COMPUTE_CONFIRM_RESIZE, contract.COMPUTE_REVERT_RESIZE,
                 contract.COMPUTE_FINISH_REVERT_RESIZE):
        assert (app.tasks[name].soft_time_limit, app.tasks[name].time_limit) == (600, 660)
    app.tasks[contract.COMPUTE_PREP_RESIZE].run(instance_uuid=uuid, migration_id=1, spec=new_spec,
                                                shared_marker=None)
    resize.run(instance_uuid=uuid, migration_id=1, dest_host=HOST, migration_uri="fake://", timeout=10)
    app.tasks[contract.COMPUTE_FINISH_RESIZE].run(instance_uuid=uuid, migration_id=1, spec=new_spec,
                                                  power_on=True)
    app.tasks[contract.COMPUTE_REVERT_RESIZE].run(instance_uuid=uuid, migration_id=1)
    app.tasks[contract.COMPUTE_FINISH_REVERT_RESIZE].run(instance_uuid=uuid, migration_id=1, spec=spec,
                                                         power_on=True)
    resize.run(instance_uuid=uuid, migration_id=2, dest_host=HOST, migration_uri="fake://", timeout=10)
    app.tasks[contract.COMPUTE_CONFIRM_RESIZE].run(instance_uuid=uuid, migration_id=2)
    assert [u["status"] for u in migration_updates(reporter)] == [
        "prepared", "migrated", "finished", "reverted_dest", "reverted", "migrated", "confirmed"]


def test_the_copy_reports_its_progress(tmp_path: Path, make_spec: SpecFactory,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resize_module, "MIGRATION_PROGRESS_INTERVAL", 0.0)
    manager, reporter = make_manager(FakeDriver(), tmp_path / "instances")
    uuid = spawned(manager, reporter, make_spec())
    manager.family(Resize).resize_instance(uuid, 60, HOST, "fake://", 5)
    progress = reporter.named(contract.CONDUCTOR_MIGRATION_PROGRESS)
    assert [(p["migration_id"], p["host"]) for p in progress] == [(60, HOST), (60, HOST)]
    assert set(progress[0]["progress"]) == {*contract.MIGRATION_PROGRESS_KEYS, "observed_at"}
    size = 20 * 1024 * 1024
    assert [(p["progress"]["disk_processed"], p["progress"]["disk_remaining"]) for p in progress] == [
        (0, size), (size, 0)]
    assert progress[0]["progress"]["memory_total"] == 0 and progress[0]["progress"]["disk_total"] == size


def test_resize_time_limits_are_checked() -> None:
    config = ComputeConfig.from_env(environ={"COMPUTE_RESIZE_SOFT_TIME_LIMIT": "900"})
    assert config.resize_copy_timeout(60) == 780
    assert config.resize_copy_timeout(2000) == 60
    with pytest.raises(ConfigError, match="COMPUTE_RESIZE_STEP_SOFT_TIME_LIMIT"):
        ComputeConfig.from_env(environ={"COMPUTE_RESIZE_STEP_SOFT_TIME_LIMIT": "700"})
    with pytest.raises(ConfigError, match="must exceed COMPUTE_RESIZE_TIME_LIMIT"):
        ComputeConfig.from_env(environ={"COMPUTE_RESIZE_TIME_LIMIT": "8000"})
