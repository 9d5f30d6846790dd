"""Evacuation's compute side: ``compute.rebuild_instance`` on the destination, ``compute.destroy_evacuated``
on the host that came back, and the heartbeat's ``storage_id`` that tells which hosts share their
instances directory.

The logic runs on the fake driver (two fake hosts given the same instances path share their disks, as
hosts mounting one share do); the disk handling on the real libvirtd (qemu:///system, TCG; one
hypervisor plays both hosts, one after the other, since a domain name exists once per daemon): a shared
disk is the same file with the same bytes after the rebuild, private storage gets a new overlay of the
image, a missing shared disk is an error with nothing made, a redelivery builds no second domain, the
stale domain goes without ever being started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract, shared_storage
from compute_workers.app import create_app
from compute_workers.manager import ComputeManager
from compute_workers.operations import Build, Evacuate, Lifecycle
from compute_workers.reporter import ListReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeBuildAbortDriver, FakeDriver

from .conftest import HOST, ImageServer, SpecFactory, make_manager

DEST = "host-b"


def updates(reporter: ListReporter) -> list[dict[str, Any]]:
    return reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)


def last(reporter: ListReporter) -> dict[str, Any]:
    return updates(reporter)[-1]


def fake_host(instances: Path, host: str = HOST, driver: FakeDriver | None = None) -> tuple[ComputeManager,
                                                                                              ListReporter]:
    return make_manager(driver or FakeDriver(instances_path=instances), instances, COMPUTE_HOST=host,
                        COMPUTE_DRIVER="fake")


def moved(spec: dict[str, Any], host: str = DEST) -> dict[str, Any]:
    """The spec the control plane sends the destination: the same instance, for ``host``."""
    return {**spec, "host": host}


# storage_id ---------------------------------------------------------------------------------------------


def test_hosts_sharing_an_instances_path_report_one_storage_id(tmp_path: Path) -> None:
    shared, own = tmp_path / "shared", tmp_path / "own"
    first = shared_storage.storage_id(shared)
    assert contract.STORAGE_ID.match(first)
    assert (shared / ".storage-id").read_text().strip() == first
    assert shared_storage.storage_id(shared) == first  # written once
    assert shared_storage.storage_id(own) not in ("", first)

    a, reporter_a = fake_host(shared, "host-a")
    b, reporter_b = fake_host(shared, "host-b")
    c, reporter_c = fake_host(own, "host-c")
    for manager in (a, b, c):
        manager.heartbeat()
    a.host_init()
    ids = [reporter.named(contract.CONDUCTOR_HOST_HEARTBEAT)[0]["resources"]["storage_id"]
           for reporter in (reporter_a, reporter_b, reporter_c)]
    assert ids == [first, first, shared_storage.storage_id(own)]
    assert reporter_a.named(contract.CONDUCTOR_HOST_INIT)[0]["resources"]["storage_id"] == first


def test_hosts_racing_to_create_the_storage_id_agree(tmp_path: Path) -> None:
    """Each thread stands for a host finding the file missing at the same time: O_EXCL picks one."""
    ids: list[str] = []
    start = threading.Barrier(8)

    def host() -> None:
        start.wait()
        ids.append(shared_storage.storage_id(tmp_path))

    threads = [threading.Thread(target=host) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # A host that read the file between its creation and its write reports "" (shares with nobody)
    # for that heartbeat; every id reported is the one written.
    written = (tmp_path / ".storage-id").read_text().strip()
    assert set(ids) - {""} == {written} and contract.STORAGE_ID.match(written)


def test_an_unusable_storage_id_is_empty(tmp_path: Path) -> None:
    (tmp_path / ".storage-id").write_text("not an id\n")
    assert shared_storage.storage_id(tmp_path) == ""
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert shared_storage.storage_id(blocked / "instances") == ""  # cannot be made under a file
    assert contract.check_storage_id(None) == "" and contract.check_storage_id("") == ""
    with pytest.raises(contract.ReportError, match="storage_id"):
        contract.check_storage_id("ABC")


# rebuild_instance on the fake driver --------------------------------------------------------------------


@pytest.fixture
def dead_host(tmp_path: Path, make_spec: SpecFactory) -> tuple[ComputeManager, dict[str, Any]]:
    """host-a with a running instance that it hard-rebooted once (its disk says boot 2), then "dies"."""
    manager, reporter = fake_host(tmp_path / "shared", "host-a")
    spec = make_spec(host="host-a")
    manager.family(Build).spawn(spec)
    manager.family(Lifecycle).reboot_instance(spec["instance_uuid"], 1, contract.REBOOT_HARD, spec)
    assert reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]["values"]["power_state"] == "running"
    return manager, spec


def test_rebuild_on_shared_storage_boots_the_dead_hosts_disk(
        tmp_path: Path, dead_host: tuple[ComputeManager, dict[str, Any]]) -> None:
    _, spec = dead_host
    uuid = spec["instance_uuid"]
    dest, reporter = fake_host(tmp_path / "shared", DEST)
    dest.family(Evacuate).rebuild_instance(uuid, 7, moved(spec), True, True)
    update = last(reporter)
    assert (update["migration_id"], update["host"], update["status"], update["values"], update["error"]) == (
        7, DEST, "rebuilt", {"power_state": "running"}, None)
    assert update["event"]["name"] == "compute_rebuild_instance" and update["event"]["result"] == "success"
    assert "on its disk on the storage shared" in update["event"]["message"]
    driver = dest.driver
    assert isinstance(driver, FakeDriver)
    assert driver.instances[uuid].boots == 3  # booted twice on host-a, once more here: the same disk
    assert driver.instances[uuid].spec["host"] == DEST


def test_rebuild_on_private_storage_builds_from_the_image(
        tmp_path: Path, dead_host: tuple[ComputeManager, dict[str, Any]]) -> None:
    _, spec = dead_host
    uuid = spec["instance_uuid"]
    dest, reporter = fake_host(tmp_path / "other", DEST)
    dest.family(Evacuate).rebuild_instance(uuid, 7, moved(spec), False, False)
    update = last(reporter)
    assert (update["status"], update["values"]) == ("rebuilt", {"power_state": "shutdown"})
    assert "from image tiny (the old disk's data is lost)" in update["event"]["message"]
    assert "left shut off" in update["event"]["message"]
    driver = dest.driver
    assert isinstance(driver, FakeDriver)
    assert driver.instances[uuid].boots == 0 and driver.has_disk(uuid)  # a new disk, never booted


def test_a_missing_shared_disk_is_an_error_and_nothing_is_made(tmp_path: Path,
                                                               make_spec: SpecFactory) -> None:
    spec = make_spec(host=DEST)
    uuid = spec["instance_uuid"]
    dest, reporter = fake_host(tmp_path / "shared", DEST)
    dest.family(Evacuate).rebuild_instance(uuid, 7, spec, True, True)
    update = last(reporter)
    assert update["status"] == "error" and update["values"] == {"power_state": "nostate"}
    assert "is not on this host's storage" in update["error"] and "nothing was created" in update["error"]
    assert update["event"] == {"name": "compute_rebuild_instance", "result": "error",
                               "message": update["error"]}
    driver = dest.driver
    assert isinstance(driver, FakeDriver)
    assert driver.list_instances() == {} and not driver.has_disk(uuid)


def test_a_failed_rebuild_leaves_no_domain_and_keeps_the_shared_disk(
        tmp_path: Path, dead_host: tuple[ComputeManager, dict[str, Any]]) -> None:
    _, spec = dead_host
    uuid = spec["instance_uuid"]
    # Its rebuild leaves a broken domain defined, as a driver bug would: the manager removes it.
    broken = FakeBuildAbortDriver(instances_path=tmp_path / "shared")
    dest, reporter = fake_host(tmp_path / "shared", DEST, broken)
    dest.family(Evacuate).rebuild_instance(uuid, 7, moved(spec), True, True)
    update = last(reporter)
    assert update["status"] == "error" and "refused to start the rebuilt domain" in update["error"]
    assert update["values"] == {"power_state": "nostate"}
    assert broken.list_instances() == {}
    assert broken.has_disk(uuid)  # the dead host's disk, the instance's only copy, is still there


def test_a_redelivered_rebuild_builds_nothing_and_reports_the_same(
        tmp_path: Path, dead_host: tuple[ComputeManager, dict[str, Any]]) -> None:
    _, spec = dead_host
    uuid = spec["instance_uuid"]
    builds = []

    class Counting(FakeDriver):
        def rebuild(self, spec: dict[str, Any], base_image: Path | None, on_shared_storage: bool,
                    power_on: bool) -> None:
            builds.append(spec["instance_uuid"])
            super().rebuild(spec, base_image, on_shared_storage, power_on)

    driver = Counting(instances_path=tmp_path / "shared")
    dest, reporter = fake_host(tmp_path / "shared", DEST, driver)
    evacuate = dest.family(Evacuate)
    evacuate.rebuild_instance(uuid, 7, moved(spec), True, True)
    evacuate.rebuild_instance(uuid, 7, moved(spec), True, True)  # journaled: reported again
    first, again = updates(reporter)
    assert (again["status"], again["values"]) == (first["status"], first["values"]) == (
        "rebuilt", {"power_state": "running"})
    assert "redelivered task ignored" not in (again["error"] or "")
    # The journal lost (a crash between the build and its record): the domain is found, not rebuilt.
    (tmp_path / "shared" / ".migrations" / "migration-7-rebuild_instance").unlink()
    evacuate.rebuild_instance(uuid, 7, moved(spec), True, True)
    found = last(reporter)
    assert (found["status"], found["values"]) == ("rebuilt", {"power_state": "running"})
    assert "already exists on host-b (running); not built again" in found["event"]["message"]
    assert builds == [uuid] and list(driver.list_instances()) == [uuid] and driver.instances[uuid].boots == 3


def test_a_rebuild_refuses_a_spec_for_another_host(tmp_path: Path, make_spec: SpecFactory) -> None:
    spec = make_spec(host="host-c")
    dest, reporter = fake_host(tmp_path / "own", DEST)
    dest.family(Evacuate).rebuild_instance(spec["instance_uuid"], 7, spec, False, True)
    assert last(reporter)["status"] == "error"
    assert "spec is for host host-c, not host-b" in last(reporter)["error"]
    dest.family(Evacuate).rebuild_instance("not-a-uuid", 8, spec, False, True)
    assert last(reporter)["migration_id"] == 8 and last(reporter)["status"] == "error"
    dest.family(Evacuate).rebuild_instance(spec["instance_uuid"], "9", spec, False, True)  # type: ignore[arg-type]
    assert len(updates(reporter)) == 2  # no migration to report to
    assert isinstance(dest.driver, FakeDriver) and dest.driver.list_instances() == {}


# destroy_evacuated on the fake driver --------------------------------------------------------------------


def power_states_seen(driver: FakeDriver) -> list[str]:
    """Every power state the driver's domains pass through from now on (a lifecycle callback)."""
    seen: list[str] = []

    def observe(instance_uuid: str) -> None:
        state = driver.instances.get(instance_uuid)
        seen.append(state.power_state if state is not None else "gone")

    driver.register_lifecycle_callback(observe)
    return seen


@pytest.mark.parametrize("keep_disks", [True, False])
def test_destroy_evacuated_removes_the_stale_domain_without_starting_it(
        tmp_path: Path, dead_host: tuple[ComputeManager, dict[str, Any]], keep_disks: bool) -> None:
    source, spec = dead_host
    uuid = spec["instance_uuid"]
    driver = source.driver
    assert isinstance(driver, FakeDriver)
    driver.power_off(uuid, 0)  # as after the power cut: the domain is defined, shut off
    seen = power_states_seen(driver)
    reporter = source.reporter
    assert isinstance(reporter, ListReporter)
    source.family(Evacuate).destroy_evacuated(uuid, 7, keep_disks)
    update = last(reporter)
    assert (update["migration_id"], update["host"], update["status"], update["error"]) == (
        7, "host-a", "source_cleaned", None)
    assert update["event"]["name"] == "compute_destroy_evacuated"
    assert f"stale domain instance-{uuid} (shutdown) destroyed and undefined" in update["event"]["message"]
    assert driver.list_instances() == {} and seen == ["gone"]  # never running again
    assert driver.has_disk(uuid) is keep_disks
    # Redelivered: reported again, nothing else; and a host with nothing left succeeds as well.
    source.family(Evacuate).destroy_evacuated(uuid, 7, keep_disks)
    again = last(reporter)
    assert (again["status"], again["values"], again["error"]) == ("source_cleaned", None, None)
    assert seen == ["gone"] and len(updates(reporter)) == 2
    source.family(Evacuate).destroy_evacuated(uuid, 8, keep_disks)
    assert "no stale domain was left" in last(reporter)["event"]["message"]


def test_evacuation_tasks_are_registered_with_their_limits(
        tmp_path: Path, dead_host: tuple[ComputeManager, dict[str, Any]]) -> None:
    _, spec = dead_host
    uuid = spec["instance_uuid"]
    dest, reporter = fake_host(tmp_path / "shared", DEST)
    app = create_app(dest.config)
    register_tasks(app, dest)
    app.finalize()
    rebuild = app.tasks[contract.COMPUTE_REBUILD_INSTANCE]
    destroy = app.tasks[contract.COMPUTE_DESTROY_EVACUATED]
    assert rebuild.ignore_result and destroy.ignore_result
    assert (rebuild.soft_time_limit, rebuild.time_limit) == (dest.config.spawn_soft_time_limit,
                                                             dest.config.spawn_time_limit)
    assert (destroy.soft_time_limit, destroy.time_limit) == (dest.config.terminate_soft_time_limit,
                                                             dest.config.terminate_time_limit)
    rebuild.run(instance_uuid=uuid, migration_id=3, spec=moved(spec), on_shared_storage=True, power_on=True)
    destroy.run(instance_uuid=uuid, migration_id=4, keep_disks=True)  # here it is no stale copy: gone
    assert [u["status"] for u in updates(reporter)] == ["rebuilt", "source_cleaned"]


# The real libvirtd ------------------------------------------------------------------------------------------

URI = "qemu:///system"
MiB = 1024 * 1024
PATTERN_OFFSET = 1000 * MiB  # far from anything the demo guest writes at boot (a 1 GiB disk)


def qemu_io(disk: Path, command: str, *, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-r", "-U"] if read_only else []  # -U: the running guest holds the image's write lock
    return subprocess.run(["qemu-io", *flags, "-f", "qcow2", "-c", command, str(disk)], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def real_hosts() -> Iterator[dict[str, Any]]:
    """Makes real managers on qemu:///system (``make(host, instances)``); removes what they made."""
    from compute_workers.virt.libvirt.driver import LibvirtDriver
    from tests.compute.test_real_qemu import TEST_ROOT

    TEST_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    root = TEST_ROOT / f"evacuate-{secrets.token_hex(4)}"
    made: list[ComputeManager] = []

    def make(host: str, name: str) -> tuple[ComputeManager, ListReporter]:
        instances = root / name
        driver = LibvirtDriver(URI, instances, virt_type="qemu")
        manager, reporter = make_manager(driver, instances, COMPUTE_HOST=host, COMPUTE_LIBVIRT_URI=URI,
                                         COMPUTE_VIRT_TYPE="qemu")
        made.append(manager)
        return manager, reporter

    try:
        yield {"make": make, "root": root}
    finally:
        for manager in made:
            for instance_uuid in manager.driver.list_instances():
                if (manager.config.instances_path / instance_uuid).exists():  # only what this test made
                    manager.driver.destroy(instance_uuid)
            manager.close()
        shutil.rmtree(root, ignore_errors=True)


def domain_uuid(manager: ComputeManager, instance_uuid: str) -> str | None:
    """libvirt's own uuid of the instance's domain (a new definition gets a new one), None if none."""
    import libvirt

    try:
        return str(manager.driver.conn.lookupByName(contract.domain_name(instance_uuid)).UUIDString())
    except libvirt.libvirtError:
        return None


def started_events(instance_uuid: str) -> tuple[list[int], Any]:
    """libvirt's STARTED lifecycle events of the instance's domain from now on, and the connection to
    close (the drivers' event loop dispatches them)."""
    import libvirt

    conn = libvirt.open(URI)
    started: list[int] = []

    def callback(_conn: Any, domain: Any, event: int, detail: int, _opaque: Any) -> None:
        if domain.name() == contract.domain_name(instance_uuid) and event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            started.append(detail)

    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, callback, None)
    return started, conn


def stale_domain(source: ComputeManager, reporter: ListReporter, spec: dict[str, Any]) -> None:
    """The instance's domain on ``source`` as a power cut leaves it: defined, shut off, its disk built
    from the image (by the same rebuild, without starting it: a QEMU start costs ~20 s on a busy CI)."""
    source.family(Evacuate).rebuild_instance(spec["instance_uuid"], 1, spec, False, False)
    assert (last(reporter)["status"], last(reporter)["values"]) == ("rebuilt", {"power_state": "shutdown"})
    reporter.reports.clear()


@pytest.mark.libvirt
def test_real_evacuation_keeps_a_shared_disk_and_rebuilds_a_private_one(
        real_hosts: dict[str, Any], image_server: ImageServer, tiny_image_path: Path,
        make_spec: SpecFactory) -> None:
    """Shared storage: host-a's guest is shut off (as by the power cut) with known bytes written into its
    disk; host-a comes back and removes its stale domain without starting it, keeping the disk; host-b,
    on the same storage, rebuilds the guest on that very file; a redelivery defines nothing new.
    Private storage (host-c, another guest): no disk for a shared-storage rebuild (an error, nothing
    made), then a new disk from the image; its cleanup removes domain and directory. One guest starts:
    each libvirt define costs up to 20 s on a busy machine."""
    from compute_workers.images import qcow2_backing_file

    source, source_reports = real_hosts["make"](HOST, "shared")
    dest, reporter = real_hosts["make"](DEST, "shared")
    private, private_reports = real_hosts["make"]("host-c", "c")
    image = image_server.add("tiny", tiny_image_path.read_bytes())
    spec = make_spec(image=image)
    uuid = spec["instance_uuid"]
    stale_domain(source, source_reports, spec)
    disk = source.config.instances_path / uuid / "disk"
    written = qemu_io(disk, f"write -P 0xc5 {PATTERN_OFFSET} 64k")
    assert written.returncode == 0, written.stderr
    inode = os.stat(disk).st_ino

    started, conn = started_events(uuid)
    try:
        source.family(Evacuate).destroy_evacuated(uuid, 11, True)
        assert last(source_reports)["status"] == "source_cleaned", last(source_reports)
        assert domain_uuid(source, uuid) is None and os.stat(disk).st_ino == inode
        assert started == []  # the stale domain was never started
    finally:
        conn.close()

    dest.family(Evacuate).rebuild_instance(uuid, 11, moved(spec), True, True)
    update = last(reporter)
    assert (update["status"], update["values"]) == ("rebuilt", {"power_state": "running"}), update
    assert os.stat(dest.config.instances_path / uuid / "disk").st_ino == inode  # the same file
    read = qemu_io(disk, f"read -P 0xc5 {PATTERN_OFFSET} 64k", read_only=True)
    assert read.returncode == 0, read.stderr
    assert "Pattern verification failed" not in read.stdout and "read 65536/65536" in read.stdout, read.stdout
    defined = domain_uuid(dest, uuid)
    dest.family(Evacuate).rebuild_instance(uuid, 11, moved(spec), True, True)  # redelivered
    assert (last(reporter)["status"], last(reporter)["values"]) == ("rebuilt", {"power_state": "running"})
    assert domain_uuid(dest, uuid) == defined  # not defined again

    other = make_spec(image=image, host="host-c")
    other_uuid = other["instance_uuid"]
    private.family(Evacuate).rebuild_instance(other_uuid, 12, other, True, True)
    update = last(private_reports)
    assert update["status"] == "error" and "nothing was created in its place" in update["error"], update
    assert domain_uuid(private, other_uuid) is None
    assert not (private.config.instances_path / other_uuid).exists()
    private.family(Evacuate).rebuild_instance(other_uuid, 13, other, False, False)
    update = last(private_reports)
    assert (update["status"], update["values"]) == ("rebuilt", {"power_state": "shutdown"}), update
    other_disk = private.config.instances_path / other_uuid / "disk"
    assert qcow2_backing_file(other_disk) == str(private.images.path(image["id"]))
    private.family(Evacuate).destroy_evacuated(other_uuid, 14, False)
    assert last(private_reports)["status"] == "source_cleaned"
    assert domain_uuid(private, other_uuid) is None
    assert not (private.config.instances_path / other_uuid).exists()
