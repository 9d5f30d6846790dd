"""What tests of migrations need from the harness beyond the daemons: storage shared by some hosts
(as NFS would give) and private to others, and real compute worker processes running on a host."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
import redis
from celery import Celery

from compute_workers import contract
from testbed.broker import redis_url
from testbed.domains import remove_domains
from testbed.hosts import NamespaceHost, NamespaceHosts, command_pid
from tests.compute_support import TOKEN, ConductorQueue, image_api_url, new_spec, serve_images

from .conftest import running_hosts
from .guests import READY, domain_xml, read, wait_for

pytestmark = pytest.mark.libvirt


def on_host(host: NamespaceHost, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.command(*command), capture_output=True, text=True, timeout=30)


def test_shared_storage_groups(shared_hosts: NamespaceHosts) -> None:
    host_a, host_b, host_c = shared_hosts.hosts
    assert host_b.local_instances == host_c.local_instances != host_a.local_instances
    assert len({host.instances_path for host in shared_hosts.hosts}) == 1
    marker = f"marker-{secrets.token_hex(4)}"
    # Written where host-b's daemon sees its instances; host-c sees it, host-a does not.
    written = on_host(host_b, "sh", "-c", f"echo from-b > {host_b.instances_path}/{marker}")
    assert written.returncode == 0, written.stderr
    assert on_host(host_c, "cat", f"{host_c.instances_path}/{marker}").stdout == "from-b\n"
    assert on_host(host_a, "cat", f"{host_a.instances_path}/{marker}").returncode != 0
    assert (host_c.local_instances / marker).read_text() == "from-b\n"
    assert not (host_a.local_instances / marker).exists()
    # Nor does the test process see any host's files at instances_path itself.
    assert not (shared_hosts.instances_path / marker).exists()


def test_live_migration_on_shared_storage(shared_hosts: NamespaceHosts, tiny_image_path: Path) -> None:
    """host-b to host-c, no disk copied: the guest goes on with the very same files. libvirt sees the
    bind mount as local storage, so it takes VIR_MIGRATE_UNSAFE (COMPUTE_MIGRATION_UNSAFE's reason)."""
    _host_a, source, dest = shared_hosts.hosts
    instance_uuid = str(uuid.uuid4())
    (source.local_instances / instance_uuid).mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(tiny_image_path),
                    str(source.local_instances / instance_uuid / "disk")], check=True)
    directory = source.instances_path / instance_uuid
    console = dest.local_instances / instance_uuid / "console.log"  # the same file as the source's
    src, dst = libvirt.open(source.uri), libvirt.open(dest.uri)
    try:
        domain = src.defineXML(domain_xml(f"mh-{instance_uuid}", instance_uuid, directory / "disk",
                                          directory / "console.log"))
        domain.create()  # migrated while it boots: the boot ends on the destination
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        params = {libvirt.VIR_MIGRATE_PARAM_URI: dest.migrate_uri}
        with pytest.raises(libvirt.libvirtError, match="Unsafe migration"):
            domain.migrateToURI3(dest.peer_uri, params, flags)
        started = time.monotonic()
        domain.migrateToURI3(dest.peer_uri, params, flags | libvirt.VIR_MIGRATE_UNSAFE)
        print(f"\nlive migration on shared storage: {time.monotonic() - started:.2f} s")
        assert src.listAllDomains() == []
        migrated = dst.lookupByUUIDString(instance_uuid)
        assert migrated.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        wait_for(lambda: READY in read(console), 120, lambda: read(console)[-2000:])
        migrated.shutdown()
        wait_for(lambda: POWEROFF in read(console), 60, lambda: read(console)[-2000:])
        wait_for(lambda: migrated.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, 30, lambda: str(migrated.state()))
    finally:
        for conn in (src, dst):
            remove_domains(conn, lambda domain: domain.UUIDString() == instance_uuid)
            conn.close()


def test_a_process_on_a_host_gets_signals_and_dies_with_the_host() -> None:
    """What start_worker relies on: the process it starts gets SIGTERM through to the command and
    exits as the command did; a command outlives neither that process nor its host."""
    with running_hosts(1) as harness:
        host = harness.hosts[0]
        trapping = subprocess.Popen(host.command("sh", "-c", "trap 'exit 3' TERM; echo up; "
                                                 "while :; do sleep 0.05; done"), stdout=subprocess.PIPE)
        assert trapping.stdout is not None and trapping.stdout.readline() == b"up\n"
        trapping.terminate()
        assert trapping.wait(10) == 3
        trapping.stdout.close()
        orphan = subprocess.Popen(host.command("sleep", "600"))
        command = command_pid(orphan)
        orphan.kill()  # the stand-in dies: the command with it
        orphan.wait(10)
        wait_for(lambda: _state(command) in ("Z", "gone"), 10, lambda: f"pid {command} still runs")
        sleeper = subprocess.Popen(host.command("sleep", "600"))
        command_pid(sleeper)
    assert sleeper.wait(10) == -signal.SIGKILL  # the host went: so did what ran on it


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_shared_storage_group_names_known_hosts() -> None:
    with pytest.raises(ValueError, match="no host host-z"):
        NamespaceHosts(2, shared=(("host-a", "host-z"),))
    with pytest.raises(ValueError, match="more than one shared storage group"):
        NamespaceHosts(3, shared=(("host-a", "host-b"), ("host-b", "host-c")))


BROKER = redis_url(5)  # Redis DBs of this module alone (other suites use others at once)
BACKEND = redis_url(4)
POWEROFF = "cloudctl-guest: poweroff (clean)"
ACTIVE = {"vm_state": "active", "task_state": None, "power_state": "running"}


@pytest.fixture
def conductor() -> Iterator[ConductorQueue]:
    for url in (BROKER, BACKEND):
        redis.Redis.from_url(url).flushdb()
    queue = ConductorQueue(BROKER)
    try:
        yield queue
    finally:
        queue.close()


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPUTE_", "CELERY_"))}
    return {**env, "CELERY_BROKER_URL": BROKER, "CELERY_RPC_BACKEND": BACKEND,
            "CLOUDCTL_SERVICE_TOKEN": TOKEN, "CLOUDCTL_API_URL": image_api_url(),
            "COMPUTE_HEARTBEAT_INTERVAL": "1",
            "PYTHONUNBUFFERED": "1"}


def namespace(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def domain_on(host: NamespaceHost, name: str) -> int | None:
    """The state of domain ``name`` on ``host``'s daemon (asked over its unix socket), None if absent."""
    conn = libvirt.open(host.uri)
    try:
        return conn.lookupByName(name).state()[0]
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def test_a_real_worker_on_a_harness_host(shared_hosts: NamespaceHosts, conductor: ConductorQueue,
                                         tiny_image_path: Path, tmp_path: Path) -> None:
    """The worker of host-a, in host-a's namespaces but the root network namespace: it spawns the demo
    guest on host-a's daemon (nowhere else), survives a SIGKILL and restart (finding its guest again),
    terminates the guest, and stops cleanly on SIGTERM."""
    host_a, host_b, host_c = shared_hosts.hosts
    started = time.monotonic()
    worker = shared_hosts.start_worker(host_a, worker_env(), tmp_path / "worker-a.log")
    init = conductor.wait_for(contract.CONDUCTOR_HOST_INIT, timeout=60, host="host-a")
    print(f"\nworker of host-a: host_init after {time.monotonic() - started:.2f} s")
    assert init["resources"]["virt_type"] == "qemu" and init["resources"]["instances"] == {}
    assert namespace(worker.pid, "pid") == namespace(host_a.init_pid, "pid")
    assert namespace(worker.pid, "mnt") == namespace(host_a.init_pid, "mnt")
    assert namespace(worker.pid, "net") == namespace(os.getpid(), "net") != namespace(host_a.init_pid, "net")

    client = Celery("multihost-test", broker=BROKER, backend=BACKEND, fixups=[])
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    queue = contract.compute_queue(host_a.name)
    with serve_images(TOKEN) as images:
        spec = new_spec(host=host_a.name, name="on host-a",
                        image=images.add("tiny", tiny_image_path.read_bytes()))
        instance_uuid = spec["instance_uuid"]
        name = contract.domain_name(instance_uuid)
        spawning = time.monotonic()
        client.send_task(contract.COMPUTE_SPAWN, kwargs={"spec": spec}, queue=queue)
        update = conductor.wait_for(contract.CONDUCTOR_INSTANCE_UPDATE, timeout=120,
                                    instance_uuid=instance_uuid, values=ACTIVE)
    assert update["host"] == host_a.name and update["expected_task_state"] == "spawning"
    assert domain_on(host_a, name) == libvirt.VIR_DOMAIN_RUNNING
    assert domain_on(host_b, name) is None and domain_on(host_c, name) is None
    console = host_a.local_instances / instance_uuid / "console.log"
    boot = wait_for(lambda: READY in read(console), 120, lambda: read(console)[-2000:])
    print(f"spawn on host-a: ACTIVE and guest ready after {time.monotonic() - spawning:.2f} s "
          f"(boot {boot:.1f} s)")
    assert not (host_b.local_instances / instance_uuid).exists()

    # A crash (SIGKILL) and a restart: the new worker finds the running guest on its host.
    worker.kill()
    assert worker.process is not None and worker.process.returncode == -signal.SIGKILL
    assert domain_on(host_a, name) == libvirt.VIR_DOMAIN_RUNNING
    worker.start()
    init = conductor.wait_for(contract.CONDUCTOR_HOST_INIT, timeout=60, host="host-a")
    assert init["resources"]["instances"] == {instance_uuid: "running"}

    client.send_task(contract.COMPUTE_TERMINATE, kwargs={"instance_uuid": instance_uuid}, queue=queue)
    conductor.wait_for(contract.CONDUCTOR_INSTANCE_DESTROYED, timeout=60, instance_uuid=instance_uuid)
    assert domain_on(host_a, name) is None
    assert not (host_a.local_instances / instance_uuid).exists()

    # SIGTERM to what start_worker started reaches the worker: a warm shutdown, host_stopping sent.
    stopping = time.monotonic()
    assert worker.stop() == 0, worker.log()[-3000:]
    print(f"worker of host-a: stopped on SIGTERM in {time.monotonic() - stopping:.2f} s")
    conductor.wait_for(contract.CONDUCTOR_HOST_STOPPING, timeout=10, host="host-a")
    assert "Warm shutdown" in worker.log()
