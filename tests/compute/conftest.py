"""Fixtures of the compute worker tests: specs, drivers, a list reporter, a local image API."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_workers.config import ComputeConfig
from compute_workers.manager import ComputeManager
from compute_workers.operations import Build
from compute_workers.reporter import ListReporter
from compute_workers.virt.driver import ComputeDriver
from compute_workers.virt.fake import FakeDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

# The helpers live in tests/compute_support.py (tests/multihost uses them too); the names stay
# importable from here.
from tests.compute_support import HOST as HOST
from tests.compute_support import TOKEN as TOKEN
from tests.compute_support import ConductorQueue as ConductorQueue
from tests.compute_support import ImageServer as ImageServer
from tests.compute_support import SpecFactory as SpecFactory
from tests.compute_support import forget_queues as forget_queues
from tests.compute_support import image_api_url, new_spec, serve_images


@pytest.fixture(autouse=True)
def require_libvirtd(request: pytest.FixtureRequest) -> None:
    """Tests marked ``libvirt`` need libvirtd and QEMU: they FAIL when those are missing (never skip
    silently), unless CLOUDCTL_SKIP_LIBVIRT=1 says this machine has none."""
    if request.node.get_closest_marker("libvirt") is None:
        return
    if os.environ.get("CLOUDCTL_SKIP_LIBVIRT") == "1":
        pytest.skip("CLOUDCTL_SKIP_LIBVIRT=1: real-libvirt tests skipped on purpose")
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd is not reachable at qemu:///system ({exc}); start it with "
                    "`tools/services.sh start`, or set CLOUDCTL_SKIP_LIBVIRT=1 to skip these tests")
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        pytest.fail("qemu-system-x86_64 and qemu-img are needed (tools/install-system.sh)")


@pytest.fixture
def make_spec() -> SpecFactory:
    return new_spec


def make_config(instances_path: Path, **overrides: str) -> ComputeConfig:
    values = {"COMPUTE_HOST": HOST, "INSTANCES_PATH": str(instances_path), "CLOUDCTL_SERVICE_TOKEN": TOKEN,
              "COMPUTE_IMAGE_DOWNLOAD_TIMEOUT": "30", "CLOUDCTL_API_URL": image_api_url(), **overrides}
    return ComputeConfig.from_env(values, environ={})


def make_manager(driver: ComputeDriver, instances_path: Path, **overrides: str) -> tuple[ComputeManager,
                                                                                         ListReporter]:
    reporter = ListReporter()
    manager = ComputeManager(make_config(instances_path, **overrides), driver, reporter)
    manager.init_host()
    return manager, reporter


Managed = tuple[ComputeManager, ListReporter]


@pytest.fixture(params=["fake", "libvirt-test"])
def managed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Managed]:
    """A manager on the fake driver, then on libvirt's test:///default: one test, both drivers."""
    instances = tmp_path / "instances"
    if request.param == "fake":
        manager, reporter = make_manager(FakeDriver(), instances, COMPUTE_CLEAN_SHUTDOWN_TIMEOUT="5")
    else:
        manager, reporter = make_manager(LibvirtTestDriver("test:///default", instances), instances,
                                         COMPUTE_LIBVIRT_URI="test:///default",
                                         COMPUTE_CLEAN_SHUTDOWN_TIMEOUT="5")
    yield manager, reporter
    for instance_uuid in manager.driver.list_instances():
        manager.driver.destroy(instance_uuid)
    manager.close()


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    with serve_images(TOKEN) as server:
        yield server


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def small_qcow2(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A valid 16 MiB (virtual) qcow2 image, a few hundred KiB of bytes."""
    path = tmp_path_factory.mktemp("images") / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    return path.read_bytes()


def spawned(manager: Any, reporter: Any, spec: dict[str, Any]) -> str:
    """Spawn ``spec`` through ``manager`` and forget the reports: the start of a lifecycle test."""
    manager.family(Build).spawn(spec)
    reporter.reports.clear()
    return str(spec["instance_uuid"])
