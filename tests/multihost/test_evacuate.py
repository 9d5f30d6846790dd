"""A host dies (its power cut: libvirtd, QEMU and its compute worker SIGKILLed), is fenced by the admin
(force-down), and its servers are evacuated through the REST API: rebuilt on another host — on the
storage host-b and host-c share with the very same disk, from host-a's private storage only when the
data loss is allowed. When the dead host comes back its stale domains are removed, never started.

The servers run on the real path: the ``cloud`` fixture's control plane, real compute workers, libvirtd
and TCG guests on the harness hosts. Each test brings its host back (powered on, worker started,
force-down cleared), so the session's other tests find three hosts up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from compute_workers import contract
from testbed.cloud import Cloud
from testbed.hosts import host_processes
from tests.multihost.test_cloud import active, create, domains

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]


def server(cloud: Cloud, server_id: str) -> dict[str, Any]:
    answer = cloud.stack.api("GET", f"/api/v1/servers/{server_id}/")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def force_down(cloud: Cloud, host: str, down: bool) -> None:
    answer = cloud.stack.api("POST", f"/api/v1/hosts/{host}/force-down/", json={"forced_down": down})
    assert answer.status_code == 200, answer.text
    assert answer.json()["forced_down"] is down


def evacuate(cloud: Cloud, server_id: str, **body: Any) -> Any:
    return cloud.stack.api("POST", f"/api/v1/servers/{server_id}/evacuate/", json=body)


def migration_of(cloud: Cloud, server_id: str) -> dict[str, Any]:
    answer = cloud.stack.api("GET", f"/api/v1/servers/{server_id}/migrations/")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    rows = body["results"] if isinstance(body, dict) else body
    evacuations = [row for row in rows if row["migration_type"] == "evacuation"]
    assert evacuations, rows
    return dict(evacuations[0])


@pytest.fixture
def dead_host(cloud: Cloud) -> Iterator[list[str]]:
    """A list to put the name of the host a test powers off into; afterwards that host is powered on,
    its worker started and its force-down cleared, and the test waits until it is up again."""
    dead: list[str] = []
    yield dead
    for name in dead:
        if cloud.workers[name].running:
            cloud.workers[name].kill()
        if not host_processes(cloud.host(name).init_pid):  # still powered off
            cloud.harness.power_on(name)
        if not cloud.workers[name].running:
            cloud.workers[name].start()
        force_down(cloud, name, False)
        cloud.stack.wait_for(f"{name} up", lambda name=name: any(
            host["name"] == name and host["state"] == "up"
            for host in cloud.stack.api("GET", "/api/v1/hosts/").json()), 60)


def delete_and_wait(cloud: Cloud, server_id: str) -> None:
    answer = cloud.stack.api("DELETE", f"/api/v1/servers/{server_id}/")
    assert answer.status_code in (202, 204, 404), answer.text
    cloud.stack.wait_for(f"server {server_id} gone", lambda: cloud.stack.api(
        "GET", f"/api/v1/servers/{server_id}/").status_code == 404, 90)


def test_a_dead_host_on_shared_storage_is_evacuated_with_its_disk(cloud: Cloud, dead_host: list[str]) -> None:
    server_id = create(cloud, "evac-shared", "host-b")
    active(cloud, server_id)
    disk = cloud.host("host-b").local_instances / server_id / "disk"
    inode = disk.stat().st_ino
    name = contract.domain_name(server_id)

    dead_host.append("host-b")
    failed = time.monotonic()
    cloud.harness.power_off("host-b")
    # Not fenced yet: refused, whatever the heartbeats say, and nothing changes.
    refused = evacuate(cloud, server_id)
    assert refused.status_code == 409, refused.text
    assert "host-b" in refused.json()["detail"]
    force_down(cloud, "host-b", True)
    assert server(cloud, server_id)["host_status"] == "DOWN"

    accepted = evacuate(cloud, server_id)
    assert accepted.status_code == 202, accepted.text
    body = active(cloud, server_id)
    took = time.monotonic() - failed
    assert body["host"] == "host-c"  # the only host that shares host-b's storage
    assert domains(cloud.host("host-c")) == {name: libvirt.VIR_DOMAIN_RUNNING}
    assert disk.stat().st_ino == inode  # the same disk, not a new one from the image
    migration = migration_of(cloud, server_id)
    assert (migration["source_host"], migration["dest_host"], migration["status"]) == (
        "host-b", "host-c", "done")
    print(f"\nhost-b powered off -> its server ACTIVE on host-c in {took:.1f} s (force-down by hand)")

    # host-b comes back: its libvirtd defines the stale domain again (shut off); the worker's restart
    # has it removed, never started, and the disk (host-c's now) stays.
    cloud.harness.power_on("host-b")
    cloud.workers["host-b"].start()
    cloud.stack.wait_for("stale domain removed from host-b",
                         lambda: name not in domains(cloud.host("host-b")), 90)
    cloud.stack.wait_for("evacuation completed",
                         lambda: migration_of(cloud, server_id)["status"] == "completed", 60)
    assert disk.stat().st_ino == inode
    assert domains(cloud.host("host-c")) == {name: libvirt.VIR_DOMAIN_RUNNING}
    delete_and_wait(cloud, server_id)


def test_private_storage_is_rebuilt_from_the_image_only_when_allowed(cloud: Cloud,
                                                                      dead_host: list[str]) -> None:
    server_id = create(cloud, "evac-private", "host-a")
    active(cloud, server_id)
    name = contract.domain_name(server_id)
    dead_host.append("host-a")
    cloud.harness.power_off("host-a")
    force_down(cloud, "host-a", True)

    refused = evacuate(cloud, server_id)
    assert refused.status_code == 409, refused.text
    assert "allow_data_loss" in refused.json()["detail"]
    assert server(cloud, server_id)["host"] == "host-a"

    accepted = evacuate(cloud, server_id, allow_data_loss=True)
    assert accepted.status_code == 202, accepted.text
    body = active(cloud, server_id)
    assert body["host"] in ("host-b", "host-c")
    assert domains(cloud.host(body["host"]))[name] == libvirt.VIR_DOMAIN_RUNNING

    cloud.harness.power_on("host-a")
    cloud.workers["host-a"].start()
    cloud.stack.wait_for("stale domain and files removed from host-a",
                         lambda: name not in domains(cloud.host("host-a"))
                         and not (cloud.host("host-a").local_instances / server_id).exists(), 90)
    delete_and_wait(cloud, server_id)
