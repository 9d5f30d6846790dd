"""The whole cloudctl on harness hosts: servers created through the REST API, pinned to a host, run
on that host's libvirtd and nowhere else, and go away when deleted."""

from __future__ import annotations

import time
from typing import Any

import libvirt
import pytest

from compute_workers import contract
from testbed.cloud import Cloud
from testbed.hosts import NamespaceHost

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]


def domains(host: NamespaceHost) -> dict[str, int]:
    """Domain name -> state on ``host``'s daemon, asked over its unix socket."""
    conn = libvirt.open(host.uri)
    try:
        found = {}
        for domain in conn.listAllDomains():
            try:
                found[domain.name()] = domain.state()[0]
            except libvirt.libvirtError as exc:  # went away while listed (an incoming migration undone)
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return found
    finally:
        conn.close()


def create(cloud: Cloud, name: str, host: str) -> str:
    created = cloud.stack.api("POST", "/api/v1/servers/",
                              json={"name": name, "flavor": "m1.nano", "image": "tiny", "host": host})
    assert created.status_code == 202, created.text
    return str(created.json()["id"])


def active(cloud: Cloud, server_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = cloud.stack.api("GET", f"/api/v1/servers/{server_id}/").json()
        assert body["status"] != "ERROR", f"build failed: {body['fault']}"
        return body if body["status"] == "ACTIVE" else None

    return dict(cloud.stack.wait_for(f"server {server_id} ACTIVE", check, 180))


def test_every_harness_host_is_up(cloud: Cloud) -> None:
    hosts = {h["name"]: h for h in cloud.stack.api("GET", "/api/v1/hosts/").json()}
    assert {name for name, host in hosts.items() if host["state"] == "up"} == {"host-a", "host-b", "host-c"}


def test_servers_pinned_to_hosts_run_there(cloud: Cloud) -> None:
    started = time.monotonic()
    placed = {"host-a": create(cloud, "pinned-a", "host-a"), "host-b": create(cloud, "pinned-b", "host-b")}
    try:
        for host_name, server_id in placed.items():
            server = active(cloud, server_id)
            assert server["host"] == host_name
            assert (server["vm_state"], server["task_state"], server["power_state"]) == (
                "active", None, "running")
        print(f"\ntwo pinned servers ACTIVE in {time.monotonic() - started:.2f} s")
        for host in cloud.hosts:
            expected = {contract.domain_name(server_id): libvirt.VIR_DOMAIN_RUNNING
                        for host_name, server_id in placed.items() if host_name == host.name}
            assert domains(host) == expected, host.name
        # The API reads a console from the worker of the server's host (a synchronous call).
        console = cloud.stack.api("GET", f"/api/v1/servers/{placed['host-b']}/console-output/?lines=5")
        assert console.status_code == 200, console.text
        # host-b's disk is in the directory host-b and host-c share, not in host-a's.
        disk = f"{placed['host-b']}/disk"
        assert (cloud.host("host-c").local_instances / disk).exists()
        assert not (cloud.host("host-a").local_instances / disk).exists()
    finally:
        for server_id in placed.values():
            answer = cloud.stack.api("DELETE", f"/api/v1/servers/{server_id}/")
            assert answer.status_code in (202, 204, 404), answer.text
    for server_id in placed.values():
        cloud.stack.wait_for(f"server {server_id} gone", lambda server_id=server_id: cloud.stack.api(
            "GET", f"/api/v1/servers/{server_id}/").status_code == 404, 60)
    for host in cloud.hosts:
        assert domains(host) == {}, host.name
    print(f"created, checked and deleted in {time.monotonic() - started:.2f} s")
