"""Resize on the real libvirtd (qemu:///system, TCG): the demo guest resized on its own host with a
bigger flavor, its disk copied with libvirt volume streams, then reverted or confirmed; failures put
it back. The demo guest's persistent boot counter (``boot-count N`` on its console) tells which disk
it booted from. Also the volume-stream copy on its own: holes, progress, its time limit. Timings are
printed (``-s``) and recorded as junit properties."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from compute_workers import contract
from compute_workers.exception import HypervisorError
from compute_workers.manager import ComputeManager
from compute_workers.operations import Build, Resize
from compute_workers.reporter import ListReporter
from compute_workers.virt.libvirt import volumes
from compute_workers.virt.libvirt.driver import LibvirtDriver

from .conftest import HOST, ImageServer, SpecFactory
from .test_real_qemu import READY, TEST_ROOT, console, real_manager, wait_for_console

__all__ = ["real_manager"]  # the fixture, imported to be used here

pytestmark = pytest.mark.libvirt

URI = "qemu:///system"
BIGGER = {"name": "m1.small", "vcpus": 2, "memory_mb": 256, "root_gb": 2}
GiB = 1024 ** 3


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--force-share", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def our_pools() -> list[str]:
    conn = libvirt.open(URI)
    try:
        return [p.name() for p in conn.listAllStoragePools(0) if p.name().startswith(volumes.POOL_PREFIX)]
    finally:
        conn.close()


def updates(reporter: ListReporter) -> list[dict[str, Any]]:
    return reporter.named(contract.CONDUCTOR_MIGRATION_UPDATE)


def last_update(reporter: ListReporter) -> dict[str, Any]:
    return updates(reporter)[-1]


class Guest:
    """The demo guest spawned by a real manager, and what the resize tests look at."""

    def __init__(self, manager: ComputeManager, reporter: ListReporter, spec: dict[str, Any]) -> None:
        self.manager, self.reporter, self.spec = manager, reporter, spec
        self.uuid = spec["instance_uuid"]
        driver = manager.driver
        assert isinstance(driver, LibvirtDriver)
        self.driver = driver
        self.directory = driver.instance_dir(self.uuid)
        self.resize_dir = driver.resize_dir(self.uuid)
        self.timings: dict[str, float] = {}
        self.resize = manager.family(Resize)

    def timed(self, label: str, operation: Callable[[], None]) -> dict[str, Any]:
        self.reporter.reports.clear()
        started = time.monotonic()
        operation()
        self.timings[label] = time.monotonic() - started
        return last_update(self.reporter)

    def booted(self, count: int, label: str, after: int = 0) -> None:
        """Wait until the console shows boot ``count`` (``after`` readies already there)."""
        self.timings[label] = wait_for_console(self.manager, self.uuid, READY, timeout=120, after=after)
        assert f"cloudctl-guest: boot-count {count}" in console(self.manager, self.uuid)

    def domain(self) -> libvirt.virDomain:
        return self.driver.conn.lookupByName(contract.domain_name(self.uuid))

    def defined(self) -> bool:
        return self.uuid in self.driver.list_instances()

    def flavor(self) -> tuple[int, int]:
        """(vCPUs, MiB of RAM) libvirt gives the running domain."""
        _state, _max, memory_kib, vcpus, _cpu = self.domain().info()
        return vcpus, memory_kib // 1024

    def report(self, record: Callable[[str, object], None], title: str) -> None:
        for label, seconds in self.timings.items():
            record(f"{label}_s", round(seconds, 2))
        print(f"\n{title} (s): " + ", ".join(f"{k}={v:.2f}" for k, v in self.timings.items()))


@pytest.fixture
def guest(real_manager: tuple[ComputeManager, ListReporter], image_server: ImageServer, tiny_image_path: Path,
          make_spec: SpecFactory) -> Guest:
    manager, reporter = real_manager
    spec = make_spec(image=image_server.add("tiny", tiny_image_path.read_bytes()))
    manager.family(Build).spawn(spec)
    assert reporter.named(contract.CONDUCTOR_BUILD_FAILED) == []
    demo = Guest(manager, reporter, spec)
    demo.booted(1, "spawn_to_ready")
    return demo  # real_manager destroys the domain and removes every file, <uuid>_resize included


def resize(demo: Guest, migration_id: int) -> dict[str, Any]:
    """prep_resize, resize_instance to this same host, finish_resize with BIGGER; checks each step."""
    new_spec = {**demo.spec, "flavor": BIGGER}
    update = demo.timed("prep_resize", lambda: demo.resize.prep_resize(demo.uuid, migration_id, new_spec,
                                                                       None))
    assert update["status"] == "prepared", update
    assert update["event"]["message"] == f"image tiny already cached on {HOST}"

    update = demo.timed("resize_instance", lambda: demo.resize.resize_instance(
        demo.uuid, migration_id, HOST, URI, 60))
    assert update["status"] == "migrated", update
    assert update["event"]["message"].startswith("guest shut down cleanly; disk of "), update
    assert not demo.defined()
    assert (demo.resize_dir / "disk").exists() and (demo.resize_dir / "console.log").exists()
    assert sorted(p.name for p in demo.directory.iterdir()) == ["disk"]  # only the copy
    assert sha256(demo.directory / "disk") == sha256(demo.resize_dir / "disk")  # byte for byte
    assert disk_info(demo.directory / "disk")["backing-filename"] == str(
        demo.manager.config.instances_path / "_base" / "tiny")
    assert our_pools() == []  # the transient pools are gone

    update = demo.timed("finish_resize", lambda: demo.resize.finish_resize(
        demo.uuid, migration_id, new_spec, True))
    assert update["status"] == "finished" and update["values"] == {"power_state": "running"}, update
    assert demo.flavor() == (2, 256)
    assert disk_info(demo.directory / "disk")["virtual-size"] == 2 * GiB
    # The resized guest boots from the copied disk: its boot counter goes on from 1 to 2.
    demo.booted(2, "finish_to_ready")
    return new_spec


def test_same_host_resize_then_revert(guest: Guest, record_property: Callable[[str, object], None]) -> None:
    demo = guest
    resize(demo, 1)
    assert disk_info(demo.resize_dir / "disk")["virtual-size"] == GiB  # the original is untouched

    update = demo.timed("revert_resize", lambda: demo.resize.revert_resize(demo.uuid, 1))
    assert update["status"] == "reverted_dest", update
    assert not demo.defined() and not demo.directory.exists() and demo.resize_dir.exists()

    update = demo.timed("finish_revert_resize", lambda: demo.resize.finish_revert_resize(
        demo.uuid, 1, demo.spec, True))
    assert update["status"] == "reverted" and update["values"] == {"power_state": "running"}, update
    assert demo.flavor() == (1, 128) and not demo.resize_dir.exists()
    assert disk_info(demo.directory / "disk")["virtual-size"] == GiB
    # The original disk, which booted once: the counter says 2 again, not 3 (the copy's next boot).
    demo.booted(2, "revert_to_ready", after=1)
    output = console(demo.manager, demo.uuid)
    assert "boot-count 3" not in output and output.count("cloudctl-guest: boot-count 1") == 1
    assert "cloudctl-guest: poweroff (clean)" in output  # the original console kept its history
    demo.report(record_property, "same-host resize then revert")


def test_same_host_resize_then_confirm(guest: Guest, record_property: Callable[[str, object], None]) -> None:
    demo = guest
    resize(demo, 2)
    domain_id = demo.domain().ID()
    update = demo.timed("confirm_resize", lambda: demo.resize.confirm_resize(demo.uuid, 2))
    assert update["status"] == "confirmed", update
    assert not demo.resize_dir.exists()
    assert demo.domain().ID() == domain_id and demo.flavor() == (2, 256)  # the instance is untouched
    # A redelivered confirm or resize_instance of that migration does nothing.
    demo.reporter.reports.clear()
    demo.resize.confirm_resize(demo.uuid, 2)
    demo.resize.resize_instance(demo.uuid, 2, HOST, URI, 60)
    assert demo.reporter.reports == [] and demo.domain().ID() == domain_id
    demo.report(record_property, "same-host resize then confirm")


def test_failed_copies_put_the_guest_back(guest: Guest, monkeypatch: pytest.MonkeyPatch,
                                          record_property: Callable[[str, object], None]) -> None:
    demo = guest
    domain_id = demo.domain().ID()
    # A destination that cannot be reached: refused before the guest is touched.
    update = demo.timed("unreachable", lambda: demo.resize.resize_instance(
        demo.uuid, 3, "nowhere", "qemu+tcp://127.0.0.1:1/system", 60))
    assert update["status"] == "error" and update["values"] == {"power_state": "running"}
    assert update["error"].startswith("cannot connect to the destination hypervisor at "
                                      "qemu+tcp://127.0.0.1:1/system: ")
    assert update["error"].endswith("nothing was changed on this host")
    assert demo.domain().ID() == domain_id

    # The copy breaks half-way, the guest already shut down: everything goes back and it runs again.
    def broken_send(stream: libvirt.virStream, data: bytes) -> None:
        raise HypervisorError("injected: the destination went away")

    monkeypatch.setattr(volumes, "_send_all", broken_send)
    update = demo.timed("failed_copy", lambda: demo.resize.resize_instance(demo.uuid, 4, HOST, URI, 60))
    assert update["status"] == "error" and update["values"] == {"power_state": "running"}, update
    assert update["error"] == ("injected: the destination went away; everything was put back: the "
                               "instance runs on this host")
    assert update["event"] == {"name": "compute_resize_instance", "result": "error",
                               "message": update["error"]}
    assert demo.domain().ID() != domain_id and demo.domain().isPersistent()
    assert not demo.resize_dir.exists()
    assert sorted(p.name for p in demo.directory.iterdir()) == ["console.log", "disk", "libvirt.xml"]
    assert our_pools() == []
    demo.booted(2, "failed_copy_to_ready", after=1)
    demo.report(record_property, "failed resizes")


def test_volume_stream_copy_keeps_holes_reports_progress_and_times_out(
        record_property: Callable[[str, object], None]) -> None:
    root = TEST_ROOT / f"volumes-{time.monotonic_ns()}"
    source, dest = root / "a", root / "b"
    source.mkdir(parents=True)
    data = bytes(range(256)) * 4096 * 16  # 16 MiB
    path = source / "disk"
    with open(path, "wb") as out:
        out.write(data)
        out.seek(64 * 1024 * 1024)
        out.write(data)
        out.truncate(128 * 1024 * 1024)  # 16 MiB data, 48 MiB hole, 16 MiB data, 48 MiB hole
    conn = libvirt.open(URI)
    try:
        calls: list[tuple[int, int]] = []
        copied = volumes.copy_file(conn, source, conn, dest, "disk", lambda d, t: calls.append((d, t)), 60)
        record_property("volume_copy_128MiB_s", round(copied.seconds, 3))
        print(f"\nvolume stream copy of a 128 MiB file (32 MiB data): {copied.seconds:.3f} s "
              f"(sparse={copied.sparse})")
        assert (copied.size, copied.sparse) == (128 * 1024 * 1024, True)
        assert copied.sent == 32 * 1024 * 1024  # the holes travelled as lengths
        assert sha256(dest / "disk") == sha256(path)
        assert (dest / "disk").stat().st_blocks * 512 <= 40 * 1024 * 1024  # and are holes again
        assert calls[-1] == (copied.size, copied.size) and len(calls) > 100
        assert oct((dest / "disk").stat().st_mode & 0o777) == "0o644"

        # An existing copy is replaced; a copy that runs out of time fails and names its limit.
        with pytest.raises(HypervisorError, match=r"did not finish within 0 s"):
            volumes.copy_file(conn, source, conn, dest, "disk", lambda d, t: None, 0)
        volumes.remove_copy(conn, dest, "disk", where="this host")
        assert not dest.exists()
        volumes.remove_copy(conn, dest, "disk", where="this host")  # nothing there: fine
        with pytest.raises(HypervisorError, match=r"libvirt on the source cannot open directory"):
            volumes.copy_file(conn, root / "missing", conn, dest, "disk", lambda d, t: None, 60)
        assert our_pools() == []
    finally:
        conn.close()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_an_interrupted_resize_is_resumed(guest: Guest, monkeypatch: pytest.MonkeyPatch,
                                          record_property: Callable[[str, object], None]) -> None:
    """The worker dies mid-copy (guest off, domain undefined, files moved, a partial copy written):
    the redelivered resize_instance finds that state and finishes the copy."""
    demo = guest
    real_copy = volumes.copy_file

    def dies_mid_copy(*args: Any, **kwargs: Any) -> volumes.VolumeCopy:
        (demo.directory).mkdir()
        (demo.directory / "disk").write_bytes(b"partial")
        raise SystemExit("worker killed")

    with monkeypatch.context() as patch:
        patch.setattr(volumes, "copy_file", dies_mid_copy)
        patch.setattr(LibvirtDriver, "_put_back_resize", lambda *args: "")  # a dead process puts nothing back
        with pytest.raises(SystemExit):
            demo.driver.migrate_disk_and_power_off(demo.uuid, URI, 30, lambda d, t: None, 60)
    assert not demo.defined() and demo.resize_dir.exists()
    assert (demo.directory / "disk").read_bytes() == b"partial"
    assert volumes.copy_file is real_copy

    update = demo.timed("resumed_resize", lambda: demo.resize.resize_instance(demo.uuid, 5, HOST, URI, 30))
    assert update["status"] == "migrated", update
    assert update["event"]["message"].startswith("resumed a resize that was interrupted after the power off")
    assert sha256(demo.directory / "disk") == sha256(demo.resize_dir / "disk")
    new_spec = {**demo.spec, "flavor": BIGGER}
    update = demo.timed("finish_resize", lambda: demo.resize.finish_resize(demo.uuid, 5, new_spec, True))
    assert update["status"] == "finished", update
    demo.booted(2, "finish_to_ready")
    demo.report(record_property, "interrupted resize resumed")
