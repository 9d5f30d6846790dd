"""What tests of migrations need from the harness beyond the daemons: storage shared by some hosts
(as NFS would give) and private to others."""

from __future__ import annotations

import secrets
import subprocess

import pytest

from .hosts import NamespaceHost, NamespaceHosts

pytestmark = pytest.mark.libvirt


def in_mount_namespace(host: NamespaceHost, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "--target", str(host.init_pid), "--mount", "--", *command],
                          capture_output=True, text=True, timeout=30)


def test_shared_storage_groups(shared_hosts: NamespaceHosts) -> None:
    host_a, host_b, host_c = shared_hosts.hosts
    assert host_b.local_instances == host_c.local_instances != host_a.local_instances
    assert len({host.instances_path for host in shared_hosts.hosts}) == 1
    marker = f"marker-{secrets.token_hex(4)}"
    # Written where host-b's daemon sees its instances; host-c sees it, host-a does not.
    written = in_mount_namespace(host_b, "sh", "-c", f"echo from-b > {host_b.instances_path}/{marker}")
    assert written.returncode == 0, written.stderr
    assert in_mount_namespace(host_c, "cat", f"{host_c.instances_path}/{marker}").stdout == "from-b\n"
    assert in_mount_namespace(host_a, "cat", f"{host_a.instances_path}/{marker}").returncode != 0
    assert (host_c.local_instances / marker).read_text() == "from-b\n"
    assert not (host_a.local_instances / marker).exists()
    # Nor does the test process see any host's files at instances_path itself.
    assert not (shared_hosts.instances_path / marker).exists()


def test_a_shared_storage_group_names_known_hosts() -> None:
    with pytest.raises(ValueError, match="no host host-z"):
        NamespaceHosts(2, shared=(("host-a", "host-z"),))
    with pytest.raises(ValueError, match="more than one shared storage group"):
        NamespaceHosts(3, shared=(("host-a", "host-b"), ("host-b", "host-c")))
