"""The image cache cleanup: unused base images older than COMPUTE_IMAGE_CACHE_MAX_AGE go; those an
instance disk is backed by, those a spawn used recently and those whose lock is held stay."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from compute_workers.images import ImageCache, qcow2_backing_file
from compute_workers.locks import file_lock
from compute_workers.manager import ComputeManager
from compute_workers.reporter import ListReporter
from compute_workers.virt.fake import FakeDriver

from .conftest import ImageServer, make_manager, qemu_img

DAY = 86400


@pytest.fixture
def managed(tmp_path: Path) -> tuple[ComputeManager, ListReporter]:
    return make_manager(FakeDriver(needs_base_image=True), tmp_path / "instances")


def cached(manager: ComputeManager, image_id: str, age: float) -> Path:
    path = manager.images.base_dir / image_id
    path.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    (manager.images.base_dir / f".{image_id}.lock").touch()
    old = time.time() - age
    os.utime(path, (old, old))
    return path


def instance_disk(manager: ComputeManager, base: Path) -> Path:
    disk = manager.config.instances_path / str(uuid.uuid4()) / "disk"
    disk.parent.mkdir(parents=True)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk))
    return disk


def test_old_unused_images_are_removed_and_the_others_kept(managed: tuple[ComputeManager, ListReporter]
                                                           ) -> None:
    manager, _ = managed
    unused = cached(manager, "unused", 2 * DAY)
    in_use = cached(manager, "in-use", 2 * DAY)
    recent = cached(manager, "recent", DAY / 2)
    disk = instance_disk(manager, in_use)
    assert qcow2_backing_file(disk) == str(in_use)
    assert manager.images_in_use() == {"in-use"}
    assert manager.cleanup_image_cache() == ["unused"]
    assert not unused.exists() and not (manager.images.base_dir / ".unused.lock").exists()
    assert in_use.exists() and recent.exists()
    assert manager.cleanup_image_cache() == []


def test_an_image_whose_lock_is_held_is_kept(managed: tuple[ComputeManager, ListReporter]) -> None:
    manager, _ = managed
    by_thread = cached(manager, "downloading", 2 * DAY)
    by_process = cached(manager, "spawning", 2 * DAY)
    with manager.images._locks.hold("downloading"), \
            file_lock(manager.images.base_dir / ".spawning.lock"):  # as another process would
        assert manager.cleanup_image_cache() == []
    assert by_thread.exists() and by_process.exists()
    assert manager.cleanup_image_cache() == ["downloading", "spawning"]


def test_a_spawn_touches_the_cached_image(tmp_path: Path, image_server: ImageServer,
                                          small_qcow2: bytes) -> None:
    cache = ImageCache(tmp_path / "_base", token="test-service-token", timeout=30,
                       api_url=image_server.base_url)
    image = image_server.add("tiny", small_qcow2)
    path = cache.fetch(image).path
    old = time.time() - 2 * DAY
    os.utime(path, (old, old))
    assert cache.fetch(image).downloaded_bytes == 0
    assert time.time() - path.stat().st_mtime < 60
    assert cache.cleanup(DAY, set()) == []


def test_the_heartbeat_cleans_up_once_per_interval(tmp_path: Path) -> None:
    manager, reporter = make_manager(FakeDriver(needs_base_image=True), tmp_path / "instances",
                                     COMPUTE_IMAGE_CACHE_MAX_AGE="3600",
                                     COMPUTE_IMAGE_CACHE_CLEANUP_INTERVAL="600")
    first = cached(manager, "first", 7200)
    manager.heartbeat()
    assert not first.exists()
    second = cached(manager, "second", 7200)
    manager.heartbeat()  # within the interval: not yet
    assert second.exists()
    manager._next_cache_cleanup = time.monotonic()
    manager.heartbeat()
    assert not second.exists()
    assert len(reporter.reports) == 3  # the heartbeats themselves went out


def test_no_cleanup_without_an_image_cache(tmp_path: Path) -> None:
    manager, _ = make_manager(FakeDriver(), tmp_path / "instances", COMPUTE_IMAGE_CACHE_MAX_AGE="0")
    image = cached(manager, "kept", 7200)
    manager.heartbeat()
    assert image.exists()


def test_backing_file_of_non_qcow2_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(b"\0" * 100)
    assert qcow2_backing_file(raw) is None
    assert qcow2_backing_file(tmp_path / "missing") is None
    plain = tmp_path / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(plain), "1M")
    assert qcow2_backing_file(plain) is None
