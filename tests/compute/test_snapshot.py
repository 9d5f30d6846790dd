"""compute.snapshot_instance (the Snapshot family): what the conductor is told and in which order, the state
a failure leaves, the upload's failures, the redelivery journal and the per-host concurrency bound.
Run against the fake driver and LibvirtTestDriver (test:///default); the real thing is in test_real_qemu."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_workers import contract
from compute_workers.app import create_app
from compute_workers.exception import HypervisorError
from compute_workers.manager import ComputeManager
from compute_workers.operations import Snapshot
from compute_workers.operations import snapshot as snapshot_module
from compute_workers.reporter import ListReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import ImageServer, SpecFactory, make_manager, spawned

ACTIVE = {"vm_state": "active", "task_state": None, "power_state": "running"}
STOPPED = {"vm_state": "stopped", "task_state": None, "power_state": "shutdown"}
PAUSED = {"vm_state": "paused", "task_state": None, "power_state": "paused"}
NO_DOMAIN = {"vm_state": "error", "task_state": None, "power_state": "nostate"}
EVENT = "compute_snapshot_instance"

Managed = tuple[ComputeManager, ListReporter]


@pytest.fixture(params=["fake", "libvirt-test"])
def managed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Managed]:
    instances = tmp_path / "instances"
    if request.param == "fake":
        manager, reporter = make_manager(FakeDriver(), instances)
    else:
        manager, reporter = make_manager(LibvirtTestDriver("test:///default", instances), instances,
                                         COMPUTE_LIBVIRT_URI="test:///default")
    yield manager, reporter
    for instance_uuid in manager.driver.list_instances():
        manager.driver.destroy(instance_uuid)
    manager.close()


def snapshot(manager: ComputeManager, server: ImageServer, instance_uuid: str, action_id: int | None,
             name: str = "snap") -> None:
    manager.family(Snapshot).snapshot_instance(instance_uuid, action_id, name, server.upload_url(name), name)


def steps(reporter: ListReporter) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(event name, result, expected task_state, values) of every instance_update, in order."""
    return [(u["event"]["name"], u["event"]["result"], u["expected_task_state"], u["values"])
            for u in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)]


def no_temporary_files(manager: ComputeManager) -> bool:
    directory = manager.config.instances_path / "snapshots"
    return not directory.exists() or list(directory.iterdir()) == []


@pytest.mark.parametrize(("prepare", "kind", "target"), [
    (lambda m, u: None, "live", ACTIVE),
    (lambda m, u: m.driver.pause(u), "live", PAUSED),
    (lambda m, u: m.driver.power_off(u, 0), "cold", STOPPED),
])
def test_snapshot_reports_in_order_uploads_and_keeps_the_state(
        managed: Managed, make_spec: SpecFactory, image_server: ImageServer,
        prepare: Callable[[ComputeManager, str], object], kind: str, target: dict[str, Any]) -> None:
    manager, reporter = managed
    uuid = spawned(manager, reporter, make_spec())
    prepare(manager, uuid)
    snapshot(manager, image_server, uuid, 7)
    assert steps(reporter) == [
        (EVENT, "start", "image_snapshot", {}),
        (EVENT, "progress", "image_snapshot", {"task_state": "image_uploading"}),
        ("compute_upload_image", "start", "image_uploading", {}),
        ("compute_upload_image", "success", "image_uploading", {}),
        (EVENT, "success", "image_uploading", target),
    ]
    updates = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
    assert all(u["action_id"] == 7 and u["fault"] is None for u in updates)
    assert updates[-1]["event"]["message"].startswith(f"{kind} snapshot of instance-{uuid} uploaded as "
                                                      "image snap: ")
    assert f"snapshot of {uuid} ({kind}" in image_server.uploads["snap"].decode()
    assert image_server.requests == ["PUT /uploads/snap"]
    assert manager.driver.get_info(uuid) == target["power_state"]
    assert manager.journal.done(uuid, 7)
    assert no_temporary_files(manager)


def test_a_redelivered_snapshot_does_nothing(managed: Managed, make_spec: SpecFactory,
                                            image_server: ImageServer) -> None:
    manager, reporter = managed
    uuid = spawned(manager, reporter, make_spec())
    snapshot(manager, image_server, uuid, 3)
    reporter.reports.clear()
    snapshot(manager, image_server, uuid, 3)
    assert reporter.reports == []
    assert image_server.requests == ["PUT /uploads/snap"]


def test_a_refused_upload_is_a_fault_with_the_servers_message(managed: Managed, make_spec: SpecFactory,
                                                              image_server: ImageServer) -> None:
    manager, reporter = managed
    uuid = spawned(manager, reporter, make_spec())
    image_server.upload_answer = (413, '{"detail": "image larger than the quota allows"}')
    snapshot(manager, image_server, uuid, 4)
    assert [s[:3] for s in steps(reporter)] == [
        (EVENT, "start", "image_snapshot"),
        (EVENT, "progress", "image_snapshot"),
        ("compute_upload_image", "start", "image_uploading"),
        ("compute_upload_image", "error", "image_uploading"),
        (EVENT, "error", "image_uploading"),
    ]
    final = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]
    assert final["values"] == ACTIVE
    assert final["fault"]["message"] == ("the image service refused image snap: HTTP 413: image larger "
                                         "than the quota allows")
    assert final["event"]["message"] == final["fault"]["message"]
    assert manager.driver.get_info(uuid) == contract.POWER_RUNNING
    assert manager.journal.done(uuid, 4)
    assert no_temporary_files(manager)


def test_an_unreachable_image_service_is_a_fault(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(FakeDriver(), tmp_path / "instances", CLOUDCTL_API_URL="http://127.0.0.1:9")
    uuid = spawned(manager, reporter, make_spec())
    manager.family(Snapshot).snapshot_instance(uuid, 5, "snap", "http://127.0.0.1:9/uploads/snap", "snap")
    final = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]
    assert final["fault"]["message"].startswith("cannot upload image snap to the image service: ")
    assert final["values"] == ACTIVE and final["expected_task_state"] == "image_uploading"
    assert no_temporary_files(manager)


def test_an_upload_url_outside_the_api_is_refused_before_any_work(managed: Managed, make_spec: SpecFactory,
                                                                 image_server: ImageServer) -> None:
    """A snapshot_instance naming an upload URL elsewhere (a forged message): no snapshot is made, no
    connection is attempted (the service token would go with it), the action ends with the reason."""
    manager, reporter = managed
    uuid = spawned(manager, reporter, make_spec())
    snapshots: list[Path] = []
    real_snapshot = manager.driver.snapshot

    def recording(instance_uuid: str, target: Path, progress: Callable[[int, int], None]) -> None:
        snapshots.append(target)
        real_snapshot(instance_uuid, target, progress)

    with socket.create_server(("127.0.0.1", 0)) as elsewhere:
        elsewhere.settimeout(0.2)
        url = f"http://127.0.0.1:{elsewhere.getsockname()[1]}/uploads/snap"
        manager.driver.snapshot = recording  # type: ignore[method-assign]
        manager.family(Snapshot).snapshot_instance(uuid, 5, "snap", url, "snap")
        with pytest.raises(TimeoutError):
            elsewhere.accept()  # nobody connected
    final = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]
    assert final["fault"]["message"] == (f"the upload URL of image snap {url} is not under the configured "
                                         f"API URL {image_server.base_url} (CLOUDCTL_API_URL): refused, the "
                                         "service token is sent nowhere else")
    assert final["values"] == ACTIVE
    assert snapshots == [] and image_server.requests == []
    assert no_temporary_files(manager)


class FailingSnapshotDriver(FakeDriver):
    def snapshot(self, instance_uuid: str, target_path: Path, progress: Callable[[int, int], None]) -> None:
        target_path.write_bytes(b"half a snapshot")
        raise HypervisorError("block copy failed: disk on fire")


@pytest.mark.parametrize("stopped", [False, True])
def test_a_failed_copy_leaves_the_server_as_it_was(tmp_path: Path, make_spec: SpecFactory,
                                                   image_server: ImageServer, stopped: bool) -> None:
    manager, reporter = make_manager(FailingSnapshotDriver(), tmp_path)
    uuid = spawned(manager, reporter, make_spec())
    if stopped:
        manager.driver.power_off(uuid, 0)
    snapshot(manager, image_server, uuid, 6)
    assert [s[:3] for s in steps(reporter)] == [(EVENT, "start", "image_snapshot"),
                                                (EVENT, "error", "image_snapshot")]
    final = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]
    assert final["values"] == (STOPPED if stopped else ACTIVE)
    assert final["fault"]["message"] == "block copy failed: disk on fire"
    assert image_server.requests == [] and no_temporary_files(manager)
    assert manager.journal.done(uuid, 6)


def test_snapshot_of_a_missing_instance(managed: Managed, make_spec: SpecFactory,
                                        image_server: ImageServer) -> None:
    manager, reporter = managed
    uuid = make_spec()["instance_uuid"]
    snapshot(manager, image_server, uuid, 8)
    final = reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]
    assert final["values"] == NO_DOMAIN
    assert final["fault"]["message"] == f"domain instance-{uuid} does not exist on host {manager.host}"
    assert image_server.requests == []


class SlowCopyDriver(FakeDriver):
    """A copy of 0.4 s reporting progress every 10 ms; counts the snapshots running at once."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0
        self.counter = threading.Lock()

    def snapshot(self, instance_uuid: str, target_path: Path, progress: Callable[[int, int], None]) -> None:
        with self.counter:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            for step in range(41):
                progress(step * 1024 * 1024, 40 * 1024 * 1024)
                time.sleep(0.01)
            target_path.write_bytes(b"snapshot")
        finally:
            with self.counter:
                self.running -= 1


def test_progress_events_are_throttled(tmp_path: Path, make_spec: SpecFactory, image_server: ImageServer,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_module, "SNAPSHOT_PROGRESS_INTERVAL", 0.15)
    manager, reporter = make_manager(SlowCopyDriver(), tmp_path)
    uuid = spawned(manager, reporter, make_spec())
    snapshot(manager, image_server, uuid, 1)
    progress = [u["event"]["message"] for u in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
                if u["event"]["result"] == "progress" and u["values"] == {}]
    assert 1 <= len(progress) <= 3, progress
    assert all(m.startswith("copied ") and m.endswith(" of 40.0 MiB") for m in progress)


def test_at_most_max_concurrent_snapshots_run_at_once(tmp_path: Path, make_spec: SpecFactory,
                                                      image_server: ImageServer) -> None:
    driver = SlowCopyDriver()
    manager, reporter = make_manager(driver, tmp_path, COMPUTE_MAX_CONCURRENT_SNAPSHOTS="2")
    uuids = [spawned(manager, reporter, make_spec()) for _ in range(5)]
    threads = [threading.Thread(target=snapshot, args=(manager, image_server, u, 1, f"snap{i}"))
               for i, u in enumerate(uuids)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert driver.most == 2
    assert time.monotonic() - started >= 1.2  # three rounds of 0.4 s
    assert sorted(image_server.uploads) == [f"snap{i}" for i in range(5)]
    finals = [u for u in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
              if u["event"]["result"] == "success" and u["event"]["name"] == EVENT]
    assert len(finals) == 5 and all(u["values"] == ACTIVE for u in finals)


def test_the_snapshot_task_is_registered_with_its_limits(tmp_path: Path, make_spec: SpecFactory,
                                                         image_server: ImageServer) -> None:
    manager, reporter = make_manager(FakeDriver(), tmp_path)
    app = create_app(manager.config)
    register_tasks(app, manager)
    task = app.tasks[contract.COMPUTE_SNAPSHOT]
    assert (task.soft_time_limit, task.time_limit) == (1800, 1860)
    uuid = spawned(manager, reporter, make_spec())
    task.run(uuid, 2, "img", image_server.upload_url("img"), "my image")
    assert reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[-1]["values"] == ACTIVE
    assert "img" in image_server.uploads
