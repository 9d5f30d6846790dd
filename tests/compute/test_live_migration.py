"""Live migration (the LiveMigration family), between two fake hypervisors of this process (a real monitor
thread, real progress, abort and timeouts; only the hypervisor is simulated) and on libvirt's
test:///default: the checks' answers, the reports in order, abort, completion timeout, redeliveries,
and what is left on each host; the journal too. (The settings, the markers and the job registry:
test_migration_jobs.py.)"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from compute_workers import contract, migration_jobs
from compute_workers import shared_storage as markers
from compute_workers.exception import HypervisorError, PostCopyUnsupported
from compute_workers.manager import ComputeManager
from compute_workers.operations import Build, LiveMigration, Resize
from compute_workers.reporter import ListReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import ImageServer, SpecFactory, make_manager

Managed = tuple[ComputeManager, ListReporter]


# Journal ------------------------------------------------------------------------------------------------

def test_live_migration_steps_are_journaled_with_their_status(hosts: tuple[Host, Host],
                                                               make_spec: SpecFactory) -> None:
    """The journal (outside the instance directory, which leaves the source) keeps the status each
    step reported: a redelivery reports that status again, whatever the instance's files became."""
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    source.live.abort_live_migration(spec["instance_uuid"], 71)
    migrate(source, dest, spec, 71)
    record = source.manager.migration_journal.done(71, "live_migration")
    assert record is not None
    assert (record["status"], record["result"], record["instance_uuid"]) == ("cancelled", "error",
                                                                             spec["instance_uuid"])
    assert not str(source.manager.migration_journal.path(71, "live_migration")).startswith(
        str(source.instances / spec["instance_uuid"]))
    source.reporter.reports.clear()
    migrate(source, dest, spec, 71)
    again = source.updates(71)
    assert [u["status"] for u in again] == ["cancelled"] and "redelivered" in again[0]["error"]
    assert source.driver.list_instances() == {spec["instance_uuid"]: "running"}


# Two fake hosts ---------------------------------------------------------------------------------------

class Host:
    """A compute manager on a fake hypervisor that other fake hosts of this process migrate to."""

    def __init__(self, root: Path, name: str, driver_class: type[FakeDriver] = FakeDriver,
                 instances: Path | None = None, **overrides: str) -> None:
        self.name = f"{name}-{secrets.token_hex(3)}"
        self.instances = instances or root / self.name
        config_uri = f"qemu+tcp://{self.name}/system"
        self.driver = driver_class(migration_uri=config_uri)
        self.manager, self.reporter = make_manager(self.driver, self.instances, COMPUTE_HOST=self.name,
                                                   **overrides)
        assert self.manager.config.migration_uri == config_uri
        self.live = self.manager.family(LiveMigration)

    def updates(self, migration_id: int | None = None) -> list[dict[str, Any]]:
        return [u for u in self.reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)
                if migration_id is None or u["migration_id"] == migration_id]

    def statuses(self, migration_id: int | None = None) -> list[str]:
        return [u["status"] for u in self.updates(migration_id)]

    def progress(self) -> list[dict[str, Any]]:
        return [r["progress"] for r in self.reporter.named(contract.CONDUCTOR_MIGRATION_PROGRESS)]


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    source, dest = Host(tmp_path, "src"), Host(tmp_path, "dst")
    yield source, dest
    source.manager.close()
    dest.manager.close()


def spawn_on(host: Host, make_spec: SpecFactory) -> dict[str, Any]:
    spec = make_spec(host=host.name)
    host.manager.family(Build).spawn(spec)
    host.reporter.reports.clear()
    return spec


def migrate(source: Host, dest: Host, spec: dict[str, Any], migration_id: int, *,
            completion_timeout: float = 60) -> None:
    config = dest.manager.config
    source.live.live_migration(spec["instance_uuid"], migration_id, dest.name, config.migration_uri,
                               config.migration_data_uri, True, False, completion_timeout)


def test_checks_answer_the_contract(hosts: tuple[Host, Host], make_spec: SpecFactory) -> None:
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    instance_uuid = spec["instance_uuid"]
    cpu_info = source.driver.get_available_resource()["cpu_info"]
    answer = dest.live.check_can_migrate_destination(instance_uuid, source.name, cpu_info, spec["image"],
                                                     True)
    assert answer == {"ok": True, "migration_uri": f"qemu+tcp://{dest.name}/system",
                      "migration_data_uri": f"tcp://{dest.name}", "shared_marker": answer["shared_marker"],
                      "disk_free_bytes": answer["disk_free_bytes"], "image_cached": False, "cpu": "identical"}
    assert answer["disk_free_bytes"] > 0
    assert (dest.instances / answer["shared_marker"]).exists()
    assert source.live.check_can_migrate_source(instance_uuid, answer["shared_marker"]) == {
        "ok": True, "shared_storage": False, "power_state": "running", "disk_bytes": 0}
    assert (dest.instances / answer["shared_marker"]).exists()  # not seen there: the destination removes it

    refused = source.live.check_can_migrate_destination(instance_uuid, dest.name, cpu_info, spec["image"],
                                                        True)
    assert refused["ok"] is False and refused["check"] == "instance_exists"
    assert source.name in refused["message"]
    arm = {**cpu_info, "arch": "aarch64"}
    refused = dest.live.check_can_migrate_destination(instance_uuid, source.name, arm, spec["image"], True)
    assert refused["ok"] is False and refused["check"] == "cpu"
    assert dest.name in refused["message"] and "aarch64" in refused["message"]
    # Cold migration: no CPU comparison.
    cold = dest.live.check_can_migrate_destination(instance_uuid, source.name, arm, spec["image"], False)
    assert cold["ok"] is True and cold["cpu"] == "skipped"
    gone = dest.live.check_can_migrate_source(instance_uuid, answer["shared_marker"])
    assert gone == {"ok": False, "check": "source",
                    "message": f"instance {instance_uuid} has no domain on host {dest.name}"}
    bad = source.live.check_can_migrate_source(instance_uuid, "../etc/passwd")
    assert bad["ok"] is False and bad["check"] == "source"


def test_shared_storage_is_detected_and_the_check_changes_nothing(tmp_path: Path,
                                                                   make_spec: SpecFactory) -> None:
    shared = tmp_path / "nfs"
    source, dest = Host(tmp_path, "src", instances=shared), Host(tmp_path, "dst", instances=shared)
    spec = spawn_on(source, make_spec)
    disk = shared / spec["instance_uuid"] / "disk"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"x" * 10000)
    answer = dest.live.check_can_migrate_destination(spec["instance_uuid"], source.name, {}, spec["image"],
                                                     True)
    assert answer["ok"] and answer["cpu"] == "skipped"  # nothing to compare with
    checked = source.live.check_can_migrate_source(spec["instance_uuid"], answer["shared_marker"])
    assert checked["shared_storage"] is True and checked["disk_bytes"] == disk.stat().st_blocks * 512 > 0
    # Delivered twice (or twice at once), the check answers the same: it removed nothing.
    answers: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: answers.append(source.live.check_can_migrate_source(
        spec["instance_uuid"], answer["shared_marker"]))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [checked, checked]
    # The step that follows removes it.
    dest.manager.family(Resize).prep_resize(spec["instance_uuid"], 7, {**spec, "host": dest.name},
                                            answer["shared_marker"])
    assert not (shared / answer["shared_marker"]).exists()


def test_destination_check_of_the_image(tmp_path: Path, make_spec: SpecFactory, image_server: ImageServer,
                                        small_qcow2: bytes) -> None:
    dest = Host(tmp_path, "dst")
    dest.driver.capabilities = {**dest.driver.capabilities, "needs_base_image": True}
    spec = make_spec(image=image_server.add("small", small_qcow2))

    def check(image: dict[str, Any]) -> dict[str, Any]:
        return dest.live.check_can_migrate_destination(spec["instance_uuid"], "elsewhere", {}, image, True)

    assert check(spec["image"])["image_cached"] is False  # fetchable
    assert image_server.requests[-1] == "/images/small" and image_server.files  # asked, not downloaded
    assert not (dest.instances / "_base" / "small").exists()
    dest.manager.images.fetch(spec["image"])
    assert check(spec["image"])["image_cached"] is True
    missing = check(image_server.add("gone", b"") | {"url": f"{image_server.base_url}/images/nothing"})
    assert missing["ok"] is False and missing["check"] == "image"
    assert "HTTP 404" in missing["message"] and dest.name in missing["message"]
    assert check({"id": "x"})["check"] == "image"


def test_live_migration_reports_running_progress_then_migrated(hosts: tuple[Host, Host],
                                                             make_spec: SpecFactory) -> None:
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    instance_uuid = spec["instance_uuid"]
    source.driver.migration_delay = 2.5
    answer = dest.live.check_can_migrate_destination(instance_uuid, source.name, {}, spec["image"], True)
    dest.live.pre_live_migration(instance_uuid, 11, spec, True, False, answer["shared_marker"])
    assert dest.statuses() == ["prepared"]
    assert not (dest.instances / answer["shared_marker"]).exists()

    started = time.monotonic()
    migrate(source, dest, spec, 11)
    seconds = time.monotonic() - started
    assert 2.5 <= seconds < 10  # it waited for the migration, not for anything else (loose: CI is noisy)
    assert source.statuses(11) == ["running", "migrated"]
    running, migrated = source.updates(11)
    assert running["event"]["result"] == "start" and running["host"] == source.name
    assert migrated["values"] == {"power_state": "nostate"} and migrated["error"] is None
    assert migrated["event"]["result"] == "success" and dest.name in migrated["event"]["message"]
    progress = source.progress()
    assert len(progress) >= 3
    assert all(set(p) == {*contract.MIGRATION_PROGRESS_KEYS, "observed_at"} for p in progress)
    gaps = [b["observed_at"] - a["observed_at"] for a, b in itertools.pairwise(progress)]
    assert max(gaps) <= 1.0, gaps  # "at least every second"
    assert progress[-1]["memory_processed"] > progress[0]["memory_processed"]
    # Reports arrive in order: running before any progress, progress before migrated.
    names = [name for name, kwargs in source.reporter.reports]
    assert names[0] == names[-1] == contract.CONDUCTOR_MIGRATION_UPDATE
    assert instance_uuid not in source.driver.list_instances()
    assert dest.driver.list_instances() == {instance_uuid: "running"}

    dest.live.post_live_migration_at_destination(instance_uuid, 11, spec)
    completed = dest.updates(11)[-1]
    assert completed["status"] == "completed"
    memory = spec["flavor"]["memory_mb"] << 20  # the destination's final figures of the migration
    assert completed["values"] == {"power_state": "running", "downtime_ms": 0, "progress": {
        "memory_total": memory, "memory_processed": memory, "memory_remaining": 0}}
    assert "downtime 0 ms" in completed["event"]["message"]

    # Redeliveries do nothing but say again what happened.
    source.reporter.reports.clear()
    migrate(source, dest, spec, 11)
    assert source.statuses() == ["migrated"] and source.progress() == []
    dest.reporter.reports.clear()
    dest.live.pre_live_migration(instance_uuid, 11, spec, True, False, None)
    dest.live.post_live_migration_at_destination(instance_uuid, 11, spec)
    assert dest.statuses() == ["prepared", "completed"]
    assert dest.driver.list_instances() == {instance_uuid: "running"}


def run_in_thread(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


def wait_for_status(host: Host, status: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while status not in host.statuses():
        assert time.monotonic() < deadline, host.statuses()
        time.sleep(0.01)


def test_abort_cancels_the_running_migration_and_the_guest_stays(hosts: tuple[Host, Host],
                                                                 make_spec: SpecFactory) -> None:
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 30
    started = time.monotonic()
    thread = run_in_thread(migrate, source, dest, spec, 12)
    wait_for_status(source, "running")
    source.live.abort_live_migration(spec["instance_uuid"], 12)
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 15  # not the 30 s migration
    assert source.statuses(12) == ["running", "cancelled"]
    cancelled = source.updates(12)[-1]
    assert cancelled["values"] == {"power_state": "running"}
    assert "cancelled on request" in cancelled["error"] and dest.name in cancelled["error"]
    assert cancelled["event"]["result"] == "cancelled"
    assert source.driver.list_instances() == {spec["instance_uuid"]: "running"}
    assert dest.driver.list_instances() == {}
    # An abort with nothing running is a logged no-op.
    source.live.abort_live_migration(spec["instance_uuid"], 99)
    assert source.statuses() == ["running", "cancelled"]


def test_an_abort_that_comes_first_cancels_the_migration_before_it_starts(hosts: tuple[Host, Host],
                                                                          make_spec: SpecFactory) -> None:
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    source.live.abort_live_migration(spec["instance_uuid"], 13)
    migrate(source, dest, spec, 13)
    assert source.statuses(13) == ["cancelled"]
    assert "before it started" in source.updates(13)[-1]["error"]
    assert source.driver.list_instances() == {spec["instance_uuid"]: "running"}


def test_completion_timeout_aborts_and_fails_naming_the_deadline(hosts: tuple[Host, Host],
                                                                 make_spec: SpecFactory) -> None:
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 30
    started = time.monotonic()
    migrate(source, dest, spec, 14, completion_timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 10  # aborted at 1 s, long before the 30 s migration
    assert source.statuses(14) == ["running", "failed"]
    failed = source.updates(14)[-1]
    assert "did not complete within its completion timeout of 1 s and was aborted" in failed["error"]
    assert failed["values"] == {"power_state": "running"}
    assert source.driver.list_instances() == {spec["instance_uuid"]: "running"}
    # The redelivered task reports the journaled failure again, and does not migrate.
    source.reporter.reports.clear()
    migrate(source, dest, spec, 14)
    assert source.statuses() == ["failed"] and dest.driver.list_instances() == {}


def test_a_redelivery_whose_domain_left_asks_the_destination(hosts: tuple[Host, Host],
                                                             make_spec: SpecFactory) -> None:
    """The worker died mid-migration (libvirt finished it on its own) and lost nothing but the journal
    entry: the domain is on the destination, so the migration is reported migrated, not failed."""
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    instance_uuid = spec["instance_uuid"]
    source.driver.live_migration(instance_uuid, dest.manager.config.migration_uri)  # the first run's work
    migrate(source, dest, spec, 15)
    assert source.statuses(15) == ["migrated"]
    assert "an earlier attempt completed it" in source.updates(15)[-1]["event"]["message"]
    # Nowhere at all: failed, naming both hosts.
    dest.driver.destroy(instance_uuid)
    migrate(source, dest, spec, 16)
    failed = source.updates(16)[-1]
    assert failed["status"] == "failed" and failed["values"] == {"power_state": "nostate"}
    assert source.name in failed["error"] and dest.name in failed["error"]


def test_a_concurrent_redelivery_of_a_running_migration_is_ignored(hosts: tuple[Host, Host],
                                                                   make_spec: SpecFactory) -> None:
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 1.0
    thread = run_in_thread(migrate, source, dest, spec, 17)
    wait_for_status(source, "running")
    migrate(source, dest, spec, 17)  # returns at once
    thread.join(10)
    assert source.statuses(17) == ["running", "migrated"]


def test_failures_are_reported_with_libvirts_message(tmp_path: Path, make_spec: SpecFactory) -> None:
    """On test:///default migrateToURI3 is unsupported: a real libvirt error, reported as failed with
    the host names and libvirt's words; the domain still runs here."""
    manager, reporter = make_manager(LibvirtTestDriver("test:///default", tmp_path / "i"), tmp_path / "i",
                                     COMPUTE_LIBVIRT_URI="test:///default")
    spec = make_spec()
    manager.family(Build).spawn(spec)
    manager.family(LiveMigration).live_migration(spec["instance_uuid"], 21, "host-b", "qemu+tcp://host-b/system",
                                                 "tcp://host-b", True, False, 60)
    update = reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]
    assert update["status"] == "failed" and update["values"] == {"power_state": "running"}
    assert "from host test-host to host host-b failed" in update["error"]
    assert "not supported" in update["error"]
    manager.driver.destroy(spec["instance_uuid"])
    manager.close()


def test_a_guest_left_paused_by_a_failed_migration_runs_again(hosts: tuple[Host, Host],
                                                             make_spec: SpecFactory) -> None:
    class PausingFailure(FakeDriver):
        def live_migration(self, instance_uuid: str, *args: Any, **kwargs: Any) -> None:
            self.pause(instance_uuid)
            raise HypervisorError("migration failed in its switch-over")

    source, dest = Host(hosts[0].instances.parent, "src", PausingFailure), hosts[1]
    spec = spawn_on(source, make_spec)
    migrate(source, dest, spec, 22)
    failed = source.updates(22)[-1]
    assert failed["status"] == "failed" and failed["values"] == {"power_state": "running"}
    assert "migration failed in its switch-over" in failed["error"]


def test_a_stopped_instance_is_not_live_migrated(hosts: tuple[Host, Host], make_spec: SpecFactory) -> None:
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    source.driver.power_off(spec["instance_uuid"], 0)
    migrate(source, dest, spec, 23)
    failed = source.updates(23)[-1]
    assert failed["status"] == "failed" and "is shutdown there" in failed["error"]
    assert failed["values"] == {"power_state": "shutdown"}


def test_pre_live_migration_errors_and_rollback(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(LibvirtTestDriver("test:///default", tmp_path / "i"), tmp_path / "i",
                                     COMPUTE_LIBVIRT_URI="test:///default")
    spec = make_spec()
    instance_uuid = spec["instance_uuid"]
    directory = tmp_path / "i" / instance_uuid
    marker = markers.create_marker(tmp_path / "i")
    manager.family(LiveMigration).pre_live_migration(instance_uuid, 31, spec, False, False, marker)
    update = reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]
    assert update["status"] == "error" and "test-host" in update["error"]
    assert "is no block migration" in update["error"]
    assert not (tmp_path / "i" / marker).exists() and not directory.exists()

    manager.family(LiveMigration).pre_live_migration(instance_uuid, 32, spec, True, False, None)
    assert reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]["status"] == "prepared"
    assert (directory / "console.log").exists()
    manager.family(LiveMigration).rollback_live_migration_at_destination(instance_uuid, 32, False)
    rolled = reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]
    assert rolled["status"] == "rolled_back" and not directory.exists()

    # A domain that runs here is never rolled back.
    manager.family(Build).spawn(spec)
    manager.family(LiveMigration).rollback_live_migration_at_destination(instance_uuid, 33, False)
    refused = reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]
    assert refused["status"] == "error" and refused["values"] == {"power_state": "running"}
    assert directory.exists()
    # post_live_migration_at_destination: a bad spec is an error, a running domain completes.
    manager.family(LiveMigration).post_live_migration_at_destination(instance_uuid, 34,
                                                                     {**spec, "instance_uuid": "x"})
    assert reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]["status"] == "error"
    manager.family(LiveMigration).post_live_migration_at_destination(instance_uuid, 35, spec)
    assert reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)[-1]["values"] == {"power_state": "running"}
    manager.driver.destroy(instance_uuid)
    manager.close()


def test_tasks_are_registered_and_checks_return_their_answer(hosts: tuple[Host, Host],
                                                             make_spec: SpecFactory) -> None:
    source, dest = hosts
    app = Celery("test", set_as_current=False, fixups=[])
    register_tasks(app, dest.manager)
    spec = spawn_on(source, make_spec)
    check = app.tasks[contract.COMPUTE_CHECK_MIGRATE_DESTINATION]
    assert check.ignore_result is False and check.time_limit == 30
    answer = check.run(instance_uuid=spec["instance_uuid"], source_host=source.name, source_cpu_info={},
                       image=spec["image"], live=True)
    assert answer["ok"] is True
    assert app.tasks[contract.COMPUTE_CHECK_MIGRATE_SOURCE].ignore_result is False
    live = app.tasks[contract.COMPUTE_LIVE_MIGRATION]
    assert live.ignore_result is True and (live.soft_time_limit, live.time_limit) == (3600, 3660)
    for name, kwargs in ((contract.COMPUTE_PRE_LIVE_MIGRATION,
                          {"spec": spec, "block_migration": True, "shared_storage": False,
                           "shared_marker": answer["shared_marker"]}),
                         (contract.COMPUTE_ABORT_LIVE_MIGRATION, {}),
                         (contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE, {}),
                         (contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST, {"shared_storage": False})):
        app.tasks[name].run(instance_uuid=spec["instance_uuid"], migration_id=41, **kwargs)
    assert dest.statuses(41) == ["prepared", "rolled_back"]


def test_a_redelivery_follows_the_job_an_earlier_attempt_left_running(hosts: tuple[Host, Host],
                                                                     make_spec: SpecFactory) -> None:
    """The first worker died mid-migration but libvirt goes on (peer to peer): the redelivered task
    finds the job, follows it (progress included) and reports where the domain ended up."""
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 1.5
    orphan = run_in_thread(source.driver.live_migration, spec["instance_uuid"],
                           dest.manager.config.migration_uri)
    deadline = time.monotonic() + 5
    while source.driver.live_migration_progress(spec["instance_uuid"]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    migrate(source, dest, spec, 51)
    orphan.join(5)
    assert source.statuses(51) == ["running", "migrated"]
    assert "left running completed" in source.updates(51)[-1]["event"]["message"]
    assert len(source.progress()) >= 2
    assert dest.driver.list_instances() == {spec["instance_uuid"]: "running"}


def test_a_migration_that_ignores_its_abort_is_given_up_on(hosts: tuple[Host, Host], make_spec: SpecFactory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    release, migrating = threading.Event(), threading.Event()

    class Stuck(FakeDriver):
        def live_migration(self, instance_uuid: str, *args: Any, **kwargs: Any) -> None:
            migrating.set()
            release.wait(30)

        def live_migration_progress(self, instance_uuid: str) -> dict[str, int] | None:
            return dict.fromkeys(contract.MIGRATION_PROGRESS_KEYS, 0) if migrating.is_set() else None

        def abort_live_migration(self, instance_uuid: str) -> bool:
            raise HypervisorError("cannot abort migration in post-copy mode")

    monkeypatch.setattr(migration_jobs, "ABORT_GRACE", 0.5)
    source, dest = Host(hosts[0].instances.parent, "src", Stuck), hosts[1]
    spec = spawn_on(source, make_spec)
    started = time.monotonic()
    migrate(source, dest, spec, 52, completion_timeout=0.5)
    release.set()
    assert time.monotonic() - started < 10  # gave up after the grace, did not wait for the release
    failed = source.updates(52)[-1]
    assert failed["status"] == "failed" and "its outcome is unknown" in failed["error"]
    assert "completion timeout passed" in failed["error"]


def test_a_hypervisor_slow_to_tell_the_progress_delays_neither_reports_nor_the_deadline(
        hosts: tuple[Host, Host], make_spec: SpecFactory) -> None:
    """libvirt 9.0 took up to 5 s to answer jobStats while a migration was setting up: the reports go
    on every second meanwhile (repeating the last answer, its observed_at unchanged) and the
    completion timeout still aborts on time."""
    class SlowToTell(FakeDriver):
        calls = 0

        def live_migration_progress(self, instance_uuid: str) -> dict[str, int] | None:
            progress = super().live_migration_progress(instance_uuid)
            SlowToTell.calls += 1
            if SlowToTell.calls == 3:
                time.sleep(3)
            return progress

    source, dest = Host(hosts[0].instances.parent, "src", SlowToTell), hosts[1]
    source.driver.migration_delay = 30
    spec = spawn_on(source, make_spec)
    started = time.monotonic()
    migrate(source, dest, spec, 61, completion_timeout=4)
    assert 4 <= time.monotonic() - started < 12  # on time, not after the 30 s migration
    assert source.statuses(61) == ["running", "failed"]
    progress = source.progress()
    assert len(progress) >= 6  # one per 0.6 s for 4 s, although libvirt was mute for 3 of them
    observed = [p["observed_at"] for p in progress]
    assert len(set(observed)) < len(observed)  # the same answer again while waiting for the next
    assert observed == sorted(observed)


# Switch-over (force-complete, post-copy, auto-converge) ------------------------------------------------

POST_COPY = {"COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY": "1"}


def two_hosts(tmp_path: Path, driver_class: type[FakeDriver] = FakeDriver,
              **overrides: str) -> tuple[Host, Host]:
    """A source configured with ``overrides`` and a plain destination."""
    return Host(tmp_path, "src", driver_class, **overrides), Host(tmp_path, "dst")


def force_complete_event(update: dict[str, Any]) -> dict[str, Any]:
    assert update["event"]["name"] == "compute_live_migration_force_complete", update
    return update["event"]


@pytest.mark.parametrize(("overrides", "flags"), [
    ({}, {"post_copy": False, "auto_converge": False}),
    ({"COMPUTE_LIVE_MIGRATION_PERMIT_AUTO_CONVERGE": "1"}, {"post_copy": False, "auto_converge": True}),
    # As in Nova: auto-converge only when post-copy is not permitted.
    ({**POST_COPY, "COMPUTE_LIVE_MIGRATION_PERMIT_AUTO_CONVERGE": "1"},
     {"post_copy": True, "auto_converge": False}),
])
def test_the_migration_is_started_with_the_configured_flags(tmp_path: Path, make_spec: SpecFactory,
                                                            overrides: dict[str, str],
                                                            flags: dict[str, bool]) -> None:
    source, dest = two_hosts(tmp_path, **overrides)
    spec = spawn_on(source, make_spec)
    migrate(source, dest, spec, 81)
    assert source.statuses(81) == ["running", "migrated"]
    assert source.driver.last_migration_flags == {"block_migration": True, "unsafe": False, **flags}


def test_force_complete_switches_to_post_copy(tmp_path: Path, make_spec: SpecFactory) -> None:
    source, dest = two_hosts(tmp_path, **POST_COPY)
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 30
    started = time.monotonic()
    thread = run_in_thread(migrate, source, dest, spec, 82)
    wait_for_status(source, "running")
    source.live.live_migration_force_complete(spec["instance_uuid"], 82)
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 15  # not the 30 s migration
    assert source.statuses(82) == ["running", "running (post-copy)", "migrated"]
    _, post_copy, migrated = source.updates(82)
    event = force_complete_event(post_copy)
    assert event["result"] == "success" and post_copy["error"] is None
    assert event["message"].startswith(f"switched to post-copy on {source.name} after ")
    assert migrated["event"]["name"] == "compute_live_migration" and migrated["error"] is None
    assert "switched to post-copy after" in migrated["event"]["message"]
    assert source.driver.list_instances() == {}
    assert dest.driver.list_instances() == {spec["instance_uuid"]: "running"}
    # Once it ended, a force-complete (a late or redelivered task) is a logged no-op.
    source.live.live_migration_force_complete(spec["instance_uuid"], 82)
    assert source.statuses(82) == ["running", "running (post-copy)", "migrated"]


def test_force_complete_without_post_copy_pauses_the_guest_until_it_converges(
        tmp_path: Path, make_spec: SpecFactory) -> None:
    source, dest = two_hosts(tmp_path)
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 30
    thread = run_in_thread(migrate, source, dest, spec, 83)
    wait_for_status(source, "running")
    source.live.live_migration_force_complete(spec["instance_uuid"], 83)
    thread.join(10)
    assert not thread.is_alive()
    assert source.statuses(83) == ["running", "running", "migrated"]
    paused = source.updates(83)[1]
    event = force_complete_event(paused)
    assert event["result"] == "success"
    assert event["message"].startswith(f"paused the guest on {source.name} after ")
    assert "so that the migration converges" in event["message"]
    assert "the guest paused so that it converged" in source.updates(83)[-1]["event"]["message"]
    # The destination resumed it (libvirt does so after a migration of a guest paused for it).
    assert dest.driver.list_instances() == {spec["instance_uuid"]: "running"}


def test_force_complete_without_a_migration_is_a_no_op(hosts: tuple[Host, Host],
                                                      make_spec: SpecFactory) -> None:
    source, dest = hosts
    spec = spawn_on(source, make_spec)
    source.live.live_migration_force_complete(spec["instance_uuid"], 84)
    assert source.reporter.reports == []
    assert source.driver.list_instances() == {spec["instance_uuid"]: "running"}  # not paused
    # Nor is it remembered for a migration that starts later: that one runs as usual.
    migrate(source, dest, spec, 84)
    assert source.statuses(84) == ["running", "migrated"]


def test_a_refused_switch_over_is_reported_once_and_the_migration_goes_on(tmp_path: Path,
                                                                          make_spec: SpecFactory) -> None:
    class NotYet(FakeDriver):
        def live_migration_force_complete(self, instance_uuid: str, post_copy: bool) -> str:
            self.attempts = getattr(self, "attempts", 0) + 1
            raise HypervisorError("post-copy can only be started while outgoing migration is in progress")

    source, dest = two_hosts(tmp_path, NotYet, **POST_COPY)
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 3.5
    thread = run_in_thread(migrate, source, dest, spec, 85)
    wait_for_status(source, "running")
    source.live.live_migration_force_complete(spec["instance_uuid"], 85)
    thread.join(10)
    assert source.statuses(85) == ["running", "running", "migrated"]
    event = force_complete_event(source.updates(85)[1])
    # "progress": the request's event stays open (the conductor closes it when the migration ends).
    assert event["result"] == "progress"
    assert "post-copy can only be started while outgoing migration is in progress" in event["message"]
    assert "retried every 1 s" in event["message"]
    assert source.driver.attempts >= 2  # type: ignore[attr-defined]  # retried, reported once
    assert "switched" not in source.updates(85)[-1]["event"]["message"]


def test_a_switch_over_refused_during_the_disk_copy_happens_once_libvirt_takes_it(
        tmp_path: Path, make_spec: SpecFactory) -> None:
    """libvirt refuses post-copy while a block migration copies the disk: the request is not lost, the
    switch-over happens as soon as libvirt takes it."""
    source, dest = two_hosts(tmp_path, **POST_COPY)
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 30
    source.driver.post_copy_refusals = 2
    started = time.monotonic()
    thread = run_in_thread(migrate, source, dest, spec, 89)
    wait_for_status(source, "running")
    source.live.live_migration_force_complete(spec["instance_uuid"], 89)
    thread.join(20)
    assert not thread.is_alive() and time.monotonic() - started < 15  # not the 30 s migration
    assert source.statuses(89) == ["running", "running", "running (post-copy)", "migrated"]
    refused, switched = (force_complete_event(update) for update in source.updates(89)[1:3])
    assert refused["result"] == "progress" and "post-copy can only be started" in refused["message"]
    assert switched["result"] == "success" and "switched to post-copy on src" in switched["message"]
    assert source.driver.post_copy_refusals == 0
    assert dest.driver.list_instances() == {spec["instance_uuid"]: "running"}


def test_in_post_copy_aborts_and_the_completion_timeout_are_ignored(tmp_path: Path,
                                                                     make_spec: SpecFactory) -> None:
    source, dest = two_hosts(tmp_path, **POST_COPY)
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 30
    source.driver.switch_over_delay = 2.0  # post-copy still fetching pages when the abort comes
    thread = run_in_thread(lambda: migrate(source, dest, spec, 86, completion_timeout=1.0))
    wait_for_status(source, "running")
    source.live.live_migration_force_complete(spec["instance_uuid"], 86)
    wait_for_status(source, "running (post-copy)")
    source.live.abort_live_migration(spec["instance_uuid"], 86)
    thread.join(15)  # meanwhile the 1 s completion timeout passed too
    assert not thread.is_alive()
    assert source.statuses(86) == ["running", "running (post-copy)", "migrated"]
    assert dest.driver.list_instances() == {spec["instance_uuid"]: "running"}


def test_a_failure_in_post_copy_says_the_guest_is_split_between_the_hosts(tmp_path: Path,
                                                                          make_spec: SpecFactory) -> None:
    source, dest = two_hosts(tmp_path, **POST_COPY)
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 30
    source.driver.post_copy_failure = "connection reset by peer"
    thread = run_in_thread(migrate, source, dest, spec, 87)
    wait_for_status(source, "running")
    source.live.live_migration_force_complete(spec["instance_uuid"], 87)
    thread.join(10)
    assert source.statuses(87) == ["running", "running (post-copy)", "failed"]
    failed = source.updates(87)[-1]
    assert "failed in post-copy" in failed["error"] and "connection reset by peer" in failed["error"]
    assert f"memory is split between host {source.name} and host {dest.name}" in failed["error"]
    assert failed["event"]["result"] == "error" and failed["event"]["message"] == failed["error"]
    # Read on the source, and left as it is: resuming it there would run a guest missing its memory.
    assert failed["values"] == {"power_state": "paused"}
    assert source.driver.list_instances() == {spec["instance_uuid"]: "paused"}
    assert dest.driver.list_instances() == {}


@pytest.mark.parametrize(("overrides", "status", "done"), [
    ({}, "running", "paused the guest on"),
    (POST_COPY, "running (post-copy)", "switched to post-copy on"),
])
def test_timeout_action_force_complete_switches_over_instead_of_aborting(
        tmp_path: Path, make_spec: SpecFactory, overrides: dict[str, str], status: str, done: str) -> None:
    source, dest = two_hosts(tmp_path, COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION="force_complete", **overrides)
    spec = spawn_on(source, make_spec)
    source.driver.migration_delay = 30
    started = time.monotonic()
    migrate(source, dest, spec, 88, completion_timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 15  # switched over at 1 s, not after the 30 s migration
    assert source.statuses(88) == ["running", status, "migrated"]
    event = force_complete_event(source.updates(88)[1])
    assert event["result"] == "success" and done in event["message"]
    assert "(its completion timeout passed)" in event["message"]
    assert dest.driver.list_instances() == {spec["instance_uuid"]: "running"}


def test_post_copy_unsupported_by_the_destination_says_what_to_do(tmp_path: Path,
                                                                  make_spec: SpecFactory) -> None:
    class NoUserfaultfd(FakeDriver):
        def live_migration(self, instance_uuid: str, *args: Any, **kwargs: Any) -> None:
            raise PostCopyUnsupported("libvirt could not migrate it to qemu+tcp://dst/system: internal "
                                      "error: unable to execute QEMU command 'migrate-set-capabilities': "
                                      "Postcopy is not supported")

    source, dest = two_hosts(tmp_path, NoUserfaultfd, **POST_COPY)
    spec = spawn_on(source, make_spec)
    migrate(source, dest, spec, 89)
    failed = source.updates(89)[-1]
    assert failed["status"] == "failed" and failed["values"] == {"power_state": "running"}
    assert "Postcopy is not supported" in failed["error"]
    assert f"sysctl vm.unprivileged_userfaultfd=1` on host {dest.name}" in failed["error"]
    assert "COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY=0" in failed["error"]
