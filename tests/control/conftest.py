"""Fixtures for control-plane tests (Django, database; Celery transport captured)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from cloudctl.compute import conductor, rpc
from cloudctl.compute.errors import ComputeUnavailable
from cloudctl.compute.models import Flavor, Host
from cloudctl.compute.services import flavors_seed
from cloudctl.identity.models import Project
from cloudctl.identity.services import role_assign, token_issue
from cloudctl.images.models import Image
from cloudctl.images.services import image_import
from cloudctl.network import rpc as network_rpc
from compute_workers import contract


@dataclass
class Outbox:
    """Messages the control plane sent, instead of putting them on Redis."""

    scheduler: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    compute: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    calls: dict[str, Any] = field(default_factory=dict)
    # compute.network_host_sync, apart: (host, state). They go with many changes (a binding, a
    # worker's restart), and the operation tests read the last task of ``compute``.
    host_syncs: list[tuple[str, contract.HostNetworkState]] = field(default_factory=list)

    def compute_tasks(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for _, task, kwargs in self.compute if task == name]


@pytest.fixture
def outbox(monkeypatch: pytest.MonkeyPatch) -> Outbox:
    box = Outbox()
    monkeypatch.setattr(rpc, "send_to_scheduler",
                        lambda name, **kw: box.scheduler.append((name, kw)))
    monkeypatch.setattr(rpc, "cast", lambda host, name, expires=None, **kw: box.compute.append(
        (host, name, kw)))
    def network_cast(host: str, name: str, **kw: Any) -> None:
        if name == contract.COMPUTE_NETWORK_HOST_SYNC:
            assert set(kw) == {"state"}
            box.host_syncs.append((host, kw["state"]))
        else:
            box.compute.append((host, name, kw))

    # The network app's own sender (DHCP, router and host network syncs): it may not import rpc.
    monkeypatch.setattr(network_rpc, "cast", network_cast)

    def call(host: str, name: str, *, timeout: float, **kw: Any) -> Any:
        answer = box.calls.get(name)
        if answer is None:
            raise ComputeUnavailable(f"the compute worker of host {host} did not answer")
        return answer(host, **kw) if callable(answer) else answer

    monkeypatch.setattr(rpc, "call", call)
    return box


@pytest.fixture
def commit(django_capture_on_commit_callbacks: Any) -> Callable[[], Any]:
    """``with commit():`` runs the block's commit callbacks at its end and forgets them, as a real
    commit does (the test's own transaction never commits, and the capture keeps them queued)."""
    from django.db import connection

    @contextmanager
    def committed() -> Iterator[None]:
        start = len(connection.run_on_commit)
        with django_capture_on_commit_callbacks(execute=True):
            yield
        del connection.run_on_commit[start:]

    return committed


@pytest.fixture
def send_on_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks are sent when their transaction commits; a test's outer transaction never does, so they
    are sent at once instead."""
    from django.db import transaction

    monkeypatch.setattr(transaction, "on_commit", lambda callback, using=None, robust=False: callback())


@pytest.fixture(autouse=True)
def _image_store(settings: Any, tmp_path: Path) -> None:
    settings.IMAGES_PATH = tmp_path / "image-store"
    settings.CLOUDCTL_SERVICE_TOKEN = "service-secret"
    # Every host a test heartbeats joins enabled; tests/control/test_host_keys.py tests the default.
    settings.COMPUTE_TRUSTED_HOSTS = ["*"]


def make_user(username: str, project: Project, *, admin: bool = False, role: str = "member") -> Any:
    """A user with ``role`` in ``project`` (``admin=True``: the admin role, and Django admin access).
    Its password is "pw": users made here skip the password validators, as create_user does."""
    user = get_user_model().objects.create_user(username=username, password="pw",
                                                is_staff=admin, is_superuser=admin)
    role_assign(user=user, project=project, role="admin" if admin else role)
    return user


def client_for(user: Any, project: Project | None = None) -> APIClient:
    """An API client with a real token of ``user``, scoped to ``project`` (default: its first)."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=user, project=project).secret}")
    return client


@pytest.fixture
def project(db: None) -> Project:
    return Project.objects.create(name="blue")


@pytest.fixture
def other_project(db: None) -> Project:
    return Project.objects.create(name="green")


@pytest.fixture
def member(project: Project) -> Any:
    return make_user("alice", project)


@pytest.fixture
def admin(db: None) -> Any:
    return make_user("root", Project.objects.create(name="admin"), admin=True)


@pytest.fixture
def api(member: Any) -> APIClient:
    return client_for(member)


@pytest.fixture
def admin_api(admin: Any) -> APIClient:
    return client_for(admin)


@pytest.fixture
def flavors(db: None) -> dict[str, Flavor]:
    return {f.name: f for f in flavors_seed()}


@pytest.fixture(scope="session")
def small_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


@pytest.fixture
def image(db: None, small_qcow2: Path) -> Image:
    return image_import(name="tiny", source=small_qcow2, disk_format="qcow2", min_ram=64)


def heartbeat(name: str, *, vcpus: int = 4, memory_mb: int = 8192, disk_gb: int = 100,
              starting: bool = False, **extra: Any) -> Host:
    """A heartbeat of host ``name`` (``starting``: the host_init of a worker's start)."""
    resources = {"libvirt_uri": "test:///default", "driver": "fake", "virt_type": "qemu",
                 "hypervisor_type": "QEMU", "hypervisor_version": 7002000, "vcpus": vcpus,
                 "memory_mb": memory_mb, "memory_mb_reserved": 0, "disk_gb": disk_gb,
                 "disk_gb_reserved": 0, "cpu_info": {"arch": "x86_64"}, "instances": {},
                 "observed_at": time.time(), "tunnel_ip": "", "busy": [], "storage_id": ""}
    resources.update(extra)
    assert set(contract.HEARTBEAT_RESOURCE_KEYS) <= set(resources)
    return conductor.host_heartbeat(host=name, resources=resources, starting=starting)


@pytest.fixture
def host(db: None) -> Host:
    return heartbeat("hv1")


def active_server(api: APIClient, outbox: Outbox, name: str = "s") -> Any:
    """A server of ``api``'s user, placed on host hv1 and reported ACTIVE by its compute worker."""
    from cloudctl.compute.models import Instance
    from cloudctl.compute.scheduling import schedule_instance

    heartbeat("hv1")
    body = api.post("/api/v1/servers/", {"name": name, "flavor": "m1.nano", "image": "tiny"},
                    format="json").json()
    schedule_instance(body["id"])
    conductor.instance_update(instance_uuid=body["id"], host="hv1",
                              expected_task_state="spawning",
                              values={"vm_state": "active", "task_state": None,
                                      "power_state": "running"})
    outbox.compute.clear()
    return Instance.objects.get(uuid=body["id"])


def run_preflights(outbox: Outbox) -> list[str]:
    """Run the pre-flight checks the control plane sent to the scheduler's queue, as its worker runs
    them (``scheduler.migration_preflight``), until none is left (an ending batch member sends the
    next). Returns each run's outcome ("preparing", "refused", or "" when it did nothing)."""
    from cloudctl.compute.migration_preflight import migration_preflight

    outcomes: list[str] = []
    while True:
        sent = [kwargs for name, kwargs in outbox.scheduler if name == contract.MIGRATION_PREFLIGHT]
        if not sent:
            return outcomes
        outbox.scheduler[:] = [(name, kwargs) for name, kwargs in outbox.scheduler
                               if name != contract.MIGRATION_PREFLIGHT]
        outcomes.extend(migration_preflight(kwargs["migration_id"]) for kwargs in sent)


def run_concurrently(work: Callable[[Any], Any], items: list[Any], timeout: float = 60) -> list[Any]:
    """Run ``work(item)`` for every item in its own thread, all released at once; the results in
    completion order. Each thread closes its database connection."""
    from django.db import connection

    barrier = threading.Barrier(len(items))
    results: list[Any] = []

    def run(item: Any) -> None:
        barrier.wait()
        try:
            results.append(work(item))
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results


GIB = 1024**3


def dest_answer(host: str, **kw: Any) -> dict[str, Any]:
    ip = {"hv1": "10.0.0.1", "hv2": "10.0.0.2", "hv3": "10.0.0.3"}[host]
    return {"ok": True, "migration_uri": f"qemu+tcp://{ip}/system", "migration_data_uri": f"tcp://{ip}",
            "shared_marker": ".shared-abc", "disk_free_bytes": 50 * GIB, "image_cached": False,
            "cpu": "identical"}


@pytest.fixture
def checks(outbox: Outbox) -> Outbox:
    """Both hosts pass every check."""
    outbox.calls[contract.COMPUTE_CHECK_MIGRATE_DESTINATION] = dest_answer
    outbox.calls[contract.COMPUTE_CHECK_MIGRATE_SOURCE] = source_answer()
    return outbox


def source_answer(shared: bool = False, disk_bytes: int = 20 * 1024 * 1024) -> Any:
    return lambda host, **kw: {"ok": True, "shared_storage": shared, "power_state": "running",
                               "disk_bytes": disk_bytes}
