"""Cold migration and resize between real compute workers on harness hosts: the demo guest spawned on
host-a moves to host-b (private storage on both: the disk travels over libvirt volume streams between
the two daemons) and is confirmed; another is resized to host-b and reverted to host-a; a third
moves between host-b and host-c, which share their storage. The tasks go over Redis exactly as the
conductor sends them; the reports are read from the conductor's queue. The demo guest's persistent boot
counter (``boot-count N``) tells which disk it booted from. Timings are printed (``-s``)."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
import redis
from celery import Celery

from compute_workers import contract
from compute_workers.virt.libvirt import volumes
from testbed.broker import redis_url
from testbed.hosts import HostWorker, NamespaceHost, NamespaceHosts
from tests.compute_support import TOKEN, ConductorQueue, ImageServer, image_api_url, new_spec, serve_images

from .guests import READY, read, wait_for

pytestmark = pytest.mark.libvirt

BROKER = redis_url(7)  # Redis DBs of this module alone (other suites use others at once)
BACKEND = redis_url(6)
ACTIVE = {"vm_state": "active", "task_state": None, "power_state": "running"}
BIGGER = {"name": "m1.small", "vcpus": 2, "memory_mb": 256, "root_gb": 2}


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPUTE_", "CELERY_"))}
    return {**env, "CELERY_BROKER_URL": BROKER, "CELERY_RPC_BACKEND": BACKEND,
            "CLOUDCTL_SERVICE_TOKEN": TOKEN, "CLOUDCTL_API_URL": image_api_url(),
            "COMPUTE_HEARTBEAT_INTERVAL": "1",
            "PYTHONUNBUFFERED": "1",
            "COMPUTE_CLEAN_SHUTDOWN_TIMEOUT": "30"}


def domain_info(host: NamespaceHost, name: str) -> tuple[int, int, int] | None:
    """(libvirt state, vCPUs, MiB of RAM) of domain ``name`` on ``host``'s daemon; None if absent."""
    conn = libvirt.open(host.uri)
    try:
        state, _max, memory_kib, vcpus, _cpu = conn.lookupByName(name).info()
        return state, vcpus, memory_kib // 1024
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def state_on(host: NamespaceHost, name: str) -> int | None:
    info = domain_info(host, name)
    return None if info is None else info[0]


def flavor_on(host: NamespaceHost, name: str) -> tuple[int, int]:
    info = domain_info(host, name)
    assert info is not None, f"no domain {name} on {host.name}"
    return info[1], info[2]


def pools_on(host: NamespaceHost) -> list[str]:
    conn = libvirt.open(host.uri)
    try:
        return [pool.name() for pool in conn.listAllStoragePools(0)]
    finally:
        conn.close()


@dataclass
class Cold:
    """The harness, one worker per host, the conductor's queue and a Celery client."""

    harness: NamespaceHosts
    conductor: ConductorQueue
    client: Celery
    images: ImageServer
    image: dict[str, Any]
    workers: dict[str, HostWorker]
    timings: dict[str, float] = field(default_factory=dict)
    next_migration: int = 1

    def send(self, host: NamespaceHost, task: str, **kwargs: Any) -> None:
        self.client.send_task(task, kwargs=kwargs, queue=contract.compute_queue(host.name))

    def step(self, host: NamespaceHost, task: str, migration_id: int, status: str, timeout: float = 120,
             **kwargs: Any) -> dict[str, Any]:
        """Send one migration task to ``host`` and wait for its report; fail on any other status."""
        self.send(host, task, migration_id=migration_id, **kwargs)
        update = self.conductor.wait_for(contract.CONDUCTOR_MIGRATION_UPDATE, timeout=timeout,
                                         migration_id=migration_id, host=host.name)
        assert update["status"] == status, update
        assert update["event"]["name"] == f"compute_{task.removeprefix('compute.')}", update
        assert update["event"]["result"] == "success", update
        return update

    def spawn(self, host: NamespaceHost) -> dict[str, Any]:
        spec = new_spec(host=host.name, name=f"cold on {host.name}", image=self.image)
        self.send(host, contract.COMPUTE_SPAWN, spec=spec)
        self.conductor.wait_for(contract.CONDUCTOR_INSTANCE_UPDATE, timeout=120,
                                instance_uuid=spec["instance_uuid"], values=ACTIVE)
        wait_for_boot(host, spec["instance_uuid"], 1)
        return spec

    def terminate(self, host: NamespaceHost, instance_uuid: str) -> None:
        self.send(host, contract.COMPUTE_TERMINATE, instance_uuid=instance_uuid)
        self.conductor.wait_for(contract.CONDUCTOR_INSTANCE_DESTROYED, timeout=60,
                                instance_uuid=instance_uuid)

    def migration_id(self) -> int:
        self.next_migration += 1
        return self.next_migration


def wait_for_boot(host: NamespaceHost, instance_uuid: str, count: int, timeout: float = 120) -> float:
    """Seconds until ``host``'s console of the instance says ``boot-count <count>`` and then ready."""
    console = host.local_instances / instance_uuid / "console.log"

    def booted() -> bool:
        text = read(console)
        marker = f"cloudctl-guest: boot-count {count}"
        return marker in text and READY in text[text.index(marker):]

    return wait_for(booted, timeout, lambda: f"{host.name}: {read(console)[-2000:]}")


@pytest.fixture(scope="module")
def cold(shared_hosts: NamespaceHosts, tiny_image_path: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cold]:
    for url in (BROKER, BACKEND):
        redis.Redis.from_url(url).flushdb()
    conductor = ConductorQueue(BROKER)
    logs = tmp_path_factory.mktemp("cold-workers")
    client = Celery("cold-migration-test", broker=BROKER, backend=BACKEND, fixups=[])
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    workers: dict[str, HostWorker] = {}
    try:
        with serve_images(TOKEN) as images:
            for host in shared_hosts.hosts:
                workers[host.name] = shared_hosts.start_worker(host, worker_env(), logs / f"{host.name}.log")
            for host in shared_hosts.hosts:
                conductor.wait_for(contract.CONDUCTOR_HOST_INIT, timeout=60, host=host.name)
            yield Cold(shared_hosts, conductor, client, images,
                       images.add("tiny", tiny_image_path.read_bytes()), workers)
    finally:
        for worker in workers.values():
            worker.terminate()
        for name, worker in workers.items():
            if worker.wait() not in (0, None):
                print(f"\nworker of {name} did not stop cleanly:\n{worker.log()[-3000:]}")
        conductor.close()
        client.close()
        for url in (BROKER, BACKEND):
            redis.Redis.from_url(url).flushdb()


def report(timings: dict[str, float], title: str, record: Callable[[str, object], None]) -> None:
    for label, seconds in timings.items():
        record(f"{label}_s", round(seconds, 2))
    print(f"\n{title} (s): " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))


def cold_migrate(cold: Cold, source: NamespaceHost, dest: NamespaceHost, spec: dict[str, Any],
                 migration_id: int, flavor: dict[str, Any] | None = None) -> tuple[dict[str, Any],
                                                                                  dict[str, float]]:
    """prep_resize on ``dest``, resize_instance on ``source``, finish_resize on ``dest``, as the
    conductor orders them. Returns the destination's spec and the timings."""
    instance_uuid = spec["instance_uuid"]
    moved = {**spec, "host": dest.name, **({"flavor": flavor} if flavor else {})}
    timings: dict[str, float] = {}
    started = time.monotonic()
    cold.step(dest, contract.COMPUTE_PREP_RESIZE, migration_id, contract.MIGRATION_PREPARED,
              instance_uuid=instance_uuid, spec=moved, shared_marker=None)
    timings["prep_resize"] = time.monotonic() - started
    resizing = time.monotonic()
    migrated = cold.step(source, contract.COMPUTE_RESIZE_INSTANCE, migration_id, contract.MIGRATION_MIGRATED,
                         instance_uuid=instance_uuid, dest_host=dest.name, migration_uri=dest.peer_uri,
                         timeout=60)
    timings["resize_instance"] = time.monotonic() - resizing
    print(f"\nresize_instance {source.name} -> {dest.name}: {migrated['event']['message']}")
    finishing = time.monotonic()
    finished = cold.step(dest, contract.COMPUTE_FINISH_RESIZE, migration_id, contract.MIGRATION_FINISHED,
                         instance_uuid=instance_uuid, spec=moved, power_on=True)
    assert finished["values"] == {"power_state": "running"}, finished
    timings["finish_resize"] = time.monotonic() - finishing
    timings["cold_migration"] = time.monotonic() - started
    timings["guest_ready_after"] = wait_for_boot(dest, instance_uuid, 2)
    return moved, timings


def test_cold_migration_to_another_host_then_confirm(cold: Cold,
                                                     record_property: Callable[[str, object], None]) -> None:
    host_a, host_b, _host_c = cold.harness.hosts
    spec = cold.spawn(host_a)
    instance_uuid = spec["instance_uuid"]
    name = contract.domain_name(instance_uuid)
    migration_id = cold.migration_id()

    moved, timings = cold_migrate(cold, host_a, host_b, spec, migration_id)
    # The guest runs on host-b from the disk it had on host-a: its boot counter went on to 2.
    assert state_on(host_b, name) == libvirt.VIR_DOMAIN_RUNNING and state_on(host_a, name) is None
    assert (host_a.local_instances / f"{instance_uuid}_resize" / "disk").exists()
    assert not (host_a.local_instances / instance_uuid).exists()
    assert (host_b.local_instances / "_base" / "tiny").exists()  # prep_resize cached the image there

    confirming = time.monotonic()
    cold.step(host_a, contract.COMPUTE_CONFIRM_RESIZE, migration_id, contract.MIGRATION_CONFIRMED,
              instance_uuid=instance_uuid)
    timings["confirm_resize"] = time.monotonic() - confirming
    # Nothing of the instance is left on host-a but the journal of the migration's steps.
    assert sorted(p.name for p in host_a.local_instances.iterdir() if instance_uuid in p.name) == []
    assert state_on(host_a, name) is None and state_on(host_b, name) == libvirt.VIR_DOMAIN_RUNNING
    assert [p for p in pools_on(host_a) + pools_on(host_b) if p.startswith("cloudctl-")] == []

    # A redelivered resize_instance (Redis at least once) does nothing: the guest on host-b is safe.
    cold.send(host_a, contract.COMPUTE_RESIZE_INSTANCE, instance_uuid=instance_uuid,
              migration_id=migration_id, dest_host=host_b.name, migration_uri=host_b.peer_uri, timeout=60)
    cold.send(host_b, contract.COMPUTE_FINISH_RESIZE, instance_uuid=instance_uuid,
              migration_id=migration_id, spec=moved, power_on=True)
    with pytest.raises(AssertionError, match=r"no conductor\.migration_update"):
        cold.conductor.wait_for(contract.CONDUCTOR_MIGRATION_UPDATE, timeout=3, migration_id=migration_id)
    assert state_on(host_b, name) == libvirt.VIR_DOMAIN_RUNNING

    cold.terminate(host_b, instance_uuid)
    assert not (host_b.local_instances / instance_uuid).exists()
    report(timings, "cold migration host-a -> host-b (private storage), confirmed", record_property)


def test_resize_to_another_host_then_revert(cold: Cold,
                                            record_property: Callable[[str, object], None]) -> None:
    host_a, host_b, _host_c = cold.harness.hosts
    spec = cold.spawn(host_a)
    instance_uuid = spec["instance_uuid"]
    name = contract.domain_name(instance_uuid)
    migration_id = cold.migration_id()

    _moved, timings = cold_migrate(cold, host_a, host_b, spec, migration_id, flavor=BIGGER)
    assert flavor_on(host_b, name) == (2, 256)

    reverting = time.monotonic()
    cold.step(host_b, contract.COMPUTE_REVERT_RESIZE, migration_id, contract.MIGRATION_REVERTED_DEST,
              instance_uuid=instance_uuid)
    assert state_on(host_b, name) is None and not (host_b.local_instances / instance_uuid).exists()
    reverted = cold.step(host_a, contract.COMPUTE_FINISH_REVERT_RESIZE, migration_id,
                         contract.MIGRATION_REVERTED, instance_uuid=instance_uuid, spec=spec, power_on=True)
    timings["revert"] = time.monotonic() - reverting
    assert reverted["values"] == {"power_state": "running"}
    assert state_on(host_a, name) == libvirt.VIR_DOMAIN_RUNNING and flavor_on(host_a, name) == (1, 128)
    assert not (host_a.local_instances / f"{instance_uuid}_resize").exists()
    # Back on its original disk, which had booted once: boot 2 again (the copy's next would be 3).
    timings["guest_ready_after_revert"] = wait_for_boot(host_a, instance_uuid, 2)
    assert "boot-count 3" not in read(host_a.local_instances / instance_uuid / "console.log")

    cold.terminate(host_a, instance_uuid)
    report(timings, "resize host-a -> host-b (2 vCPUs, 256 MiB, 2 GiB), reverted", record_property)


def test_cold_migration_on_shared_storage(cold: Cold, record_property: Callable[[str, object], None]) -> None:
    _host_a, host_b, host_c = cold.harness.hosts
    spec = cold.spawn(host_b)
    instance_uuid = spec["instance_uuid"]
    name = contract.domain_name(instance_uuid)
    migration_id = cold.migration_id()
    shared = host_b.local_instances  # host-c's too

    _moved, timings = cold_migrate(cold, host_b, host_c, spec, migration_id)
    assert state_on(host_c, name) == libvirt.VIR_DOMAIN_RUNNING and state_on(host_b, name) is None
    assert (shared / instance_uuid / "disk").exists()
    assert (shared / f"{instance_uuid}_resize" / "disk").exists()

    cold.step(host_b, contract.COMPUTE_CONFIRM_RESIZE, migration_id, contract.MIGRATION_CONFIRMED,
              instance_uuid=instance_uuid)
    # host-b removed its original; host-c's copy in the same directory tree is untouched.
    assert not (shared / f"{instance_uuid}_resize").exists() and (shared / instance_uuid / "disk").exists()
    assert state_on(host_c, name) == libvirt.VIR_DOMAIN_RUNNING

    cold.terminate(host_c, instance_uuid)
    report(timings, "cold migration host-b -> host-c (shared storage), confirmed", record_property)


def test_volume_stream_throughput_between_hosts(cold: Cold,
                                                record_property: Callable[[str, object], None]) -> None:
    """What the copy of a big disk costs: 256 MiB of random data (no hole to skip) from host-a's daemon
    to host-b's over TCP, through this process as a worker would pipe it."""
    host_a, host_b, _host_c = cold.harness.hosts
    directory = f"xfer-{secrets.token_hex(4)}"
    source = host_a.local_instances / directory
    source.mkdir(mode=0o755)
    size = 256 * 1024 * 1024
    with open(source / "disk", "wb") as out:
        for _ in range(size // (16 * 1024 * 1024)):
            out.write(os.urandom(16 * 1024 * 1024))
    source_conn, dest_conn = libvirt.open(host_a.uri), libvirt.open(host_b.peer_uri)
    try:
        calls: list[tuple[int, int]] = []
        copied = volumes.copy_file(source_conn, host_a.instances_path / directory, dest_conn,
                                   host_b.instances_path / directory, "disk",
                                   lambda done, total: calls.append((done, total)), 120,
                                   source_label=host_a.name, dest_label=host_b.name)
        assert copied.size == copied.sent == size and calls[-1] == (size, size)
        assert sha256(host_b.local_instances / directory / "disk") == sha256(source / "disk")
        volumes.remove_copy(dest_conn, host_b.instances_path / directory, "disk", where=host_b.name)
        assert not (host_b.local_instances / directory).exists()
    finally:
        source_conn.close()
        dest_conn.close()
        shutil.rmtree(source, ignore_errors=True)
    rate = size / (1024 * 1024) / copied.seconds
    record_property("volume_stream_256MiB_s", round(copied.seconds, 2))
    print(f"\nvolume streams host-a -> host-b (TCP), 256 MiB of data: {copied.seconds:.2f} s "
          f"({rate:.0f} MiB/s)")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
