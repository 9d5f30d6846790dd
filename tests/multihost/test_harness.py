"""The multi-host harness works: two independent libvirt hosts on this machine, and a running demo
guest live-migrated (block migration) from one to the other while it keeps running; a host whose power
is cut (by the test, or by ``python -m testbed.fence`` in another process) and brought back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from testbed import REPO
from testbed.domains import remove_domains
from testbed.hosts import ROOT, HostWorker, NamespaceHost, host_processes, remove_stale_runs

from .conftest import running_hosts
from .guests import READY, domain_xml, prepare_block_migration, read, wait_for

pytestmark = pytest.mark.libvirt

POWEROFF = "cloudctl-guest: poweroff (clean)"
FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
         | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


def test_two_independent_hosts(libvirt_hosts: list[NamespaceHost]) -> None:
    uuids = set()
    for host in libvirt_hosts:
        conn = libvirt.open(host.uri)
        try:
            assert conn.getHostname() == f"cloudctl-{host.name}"
            assert conn.getURI().startswith("qemu+unix:///system")
            host_uuid = ET.fromstring(conn.getCapabilities()).findtext("host/uuid")
            assert host_uuid == host.host_uuid
            uuids.add(host_uuid)
        finally:
            conn.close()
    assert len(uuids) == len(libvirt_hosts)
    # Each daemon reaches its peer over the namespaces' bridge (what peer-to-peer migration needs).
    source, dest = libvirt_hosts
    result = subprocess.run(["ip", "netns", "exec", source.netns, "virsh", "-c", dest.peer_uri, "hostname"],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == f"cloudctl-{dest.name}", result.stderr


def test_the_root_namespace_reaches_every_daemon_over_tcp(libvirt_hosts: list[NamespaceHost]) -> None:
    """What a compute worker in the root network namespace needs: every host's libvirtd at
    ``qemu+tcp://<host.ip>/system``, through the root's veth into the hosts' bridge."""
    for host in libvirt_hosts:
        result = subprocess.run(["virsh", "-c", host.peer_uri, "hostname"], capture_output=True, text=True,
                                timeout=30)
        assert result.stdout.strip() == f"cloudctl-{host.name}", result.stderr
        result = subprocess.run(["virsh", "-c", host.peer_uri, "list"], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, result.stderr


def test_live_block_migration_of_a_running_guest(libvirt_hosts: list[NamespaceHost],
                                                 tiny_image_path: Path) -> None:
    source, dest = libvirt_hosts
    instance_uuid = str(uuid.uuid4())
    disk, console = prepare_block_migration(source, dest, instance_uuid, tiny_image_path)
    source_console = source.local_instances / instance_uuid / "console.log"
    dest_console = dest.local_instances / instance_uuid / "console.log"

    src = libvirt.open(source.uri)
    dst = libvirt.open(dest.uri)
    try:
        domain = src.defineXML(domain_xml(f"mh-{instance_uuid}", instance_uuid, disk, console))
        domain.create()
        boot = wait_for(lambda: READY in read(source_console), 120, lambda: read(source_console)[-2000:])

        params = {libvirt.VIR_MIGRATE_PARAM_URI: dest.migrate_uri}
        started = time.monotonic()
        domain.migrateToURI3(dest.peer_uri, params, FLAGS | libvirt.VIR_MIGRATE_NON_SHARED_DISK)
        migration = time.monotonic() - started

        migrated = dst.lookupByUUIDString(instance_uuid)
        assert migrated.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert migrated.isPersistent()
        with pytest.raises(libvirt.libvirtError):
            src.lookupByUUIDString(instance_uuid)
        assert src.listAllDomains() == []
        downtime = None
        try:
            stats = migrated.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            downtime = stats.get("downtime")
        except libvirt.libvirtError:
            stats = {}
        print(f"\nlive block migration: {migration:.2f} s, downtime "
              f"{'n/a' if downtime is None else f'{downtime} ms'} (guest booted in {boot:.1f} s)")

        # The guest keeps running on the destination: it obeys an ACPI power-off there and says so in
        # its console, which the destination's QEMU writes (a different file from the source's).
        assert READY not in read(dest_console)
        migrated.shutdown()
        wait_for(lambda: POWEROFF in read(dest_console), 60, lambda: read(dest_console)[-2000:])
        wait_for(lambda: migrated.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, 30, lambda: str(migrated.state()))
        assert POWEROFF not in read(source_console)
    finally:
        for conn in (src, dst):
            remove_domains(conn, lambda domain: domain.UUIDString() == instance_uuid)
            conn.close()


def test_a_killed_test_run_leaves_nothing_the_next_run_does_not_remove(
        libvirt_hosts: list[NamespaceHost]) -> None:
    """A pytest killed mid-run never calls stop(): its hosts (daemons, namespaces, veth, files) stay
    until the next harness start finds their owner gone and removes them."""
    script = ("import sys, time; from testbed.hosts import NamespaceHosts; "
              "hosts = NamespaceHosts(1); hosts.start(); print(hosts.run_id, flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        run_id = process.stdout.readline().strip() if process.stdout else ""
        assert run_id, "the harness did not start in the child process"
    finally:
        process.kill()
        process.wait(10)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"cch-{run_id}-0" in namespaces and (ROOT / run_id).is_dir()  # left behind

    assert run_id in remove_stale_runs()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"cch-{run_id}-" not in namespaces
    assert not (ROOT / run_id).exists()
    links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert f"cch-{run_id}-r" not in links
    remove_stale_runs()
    assert all(host.directory.is_dir() for host in libvirt_hosts)  # a live run is left alone


class SleepingWorker(HostWorker):
    """Stands for a host's compute worker (run the same way, through nsexec in its namespaces), without
    the broker a real one needs: what a power cut must end too."""

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.host.command("sleep", "600"), env=self.env, cwd=REPO,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def qemu_pids(host: NamespaceHost) -> list[int]:
    return [pid for pid, name in host_processes(host.init_pid).items() if name.startswith("qemu")]


def answers(host: NamespaceHost) -> bool:
    try:
        libvirt.open(host.uri).close()
        return True
    except libvirt.libvirtError:
        return False


def test_a_host_powered_off_by_the_fence_command_and_back(tiny_image_path: Path, tmp_path: Path) -> None:
    """One host with a running guest and a worker: ``python -m testbed.fence`` (another process, which
    finds the run through its state file) kills them and the daemon at once, exits 0 once no QEMU is
    left, and again for a host already off; power_on brings the daemon back with the guest defined and
    shut off, never started; power_off from the test does the same as the command."""
    with running_hosts(1) as hosts:
        host = hosts.hosts[0]
        instance_uuid = str(uuid.uuid4())
        directory = host.local_instances / instance_uuid
        directory.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(tiny_image_path),
                        str(directory / "disk")], check=True)
        inside = hosts.instances_path / instance_uuid
        conn = libvirt.open(host.uri)
        conn.defineXML(domain_xml(f"mh-{instance_uuid}", instance_uuid, inside / "disk",
                                  inside / "console.log")).create()
        conn.close()
        assert len(qemu_pids(host)) == 1
        worker = SleepingWorker(host, {"PATH": os.environ["PATH"]}, tmp_path / "worker.log")
        worker.start()
        hosts.workers.append(worker)
        wait_for(lambda: any(name == "sleep" for name in host_processes(host.init_pid).values()), 10,
                 lambda: str(host_processes(host.init_pid)))

        fence = [sys.executable, "-m", "testbed.fence", host.name]
        env = {**os.environ, **hosts.fence_env()}
        started = time.monotonic()
        result = subprocess.run(fence, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        fenced = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert host_processes(host.init_pid) == {} and not answers(host)
        assert worker.wait(10) == -signal.SIGKILL  # its stand-in nsexec ends as the worker did
        again = subprocess.run(fence, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "0 process(es) killed" in again.stdout, again.stderr
        unknown = subprocess.run([*fence[:-1], "host-z"], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=60)
        assert unknown.returncode == 2 and "host-z" in unknown.stderr

        started = time.monotonic()
        hosts.power_on(host.name)
        back = time.monotonic() - started
        conn = libvirt.open(host.uri)
        try:
            domain = conn.lookupByUUIDString(instance_uuid)
            assert domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF and qemu_pids(host) == []
            domain.create()  # the host works again
            assert len(qemu_pids(host)) == 1
        finally:
            conn.close()
        killed = hosts.power_off(host.name)
        assert len(killed) >= 2 and host_processes(host.init_pid) == {}  # libvirtd and QEMU at least
        hosts.power_on(host.name)
        conn = libvirt.open(host.uri)
        try:
            assert conn.lookupByUUIDString(instance_uuid).state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
            remove_domains(conn, lambda domain: domain.UUIDString() == instance_uuid)
        finally:
            conn.close()
        print(f"\nfence: host off in {fenced:.2f} s; power on: libvirtd answers in {back:.2f} s")
