"""End to end: HTTP → scheduler → compute worker → a real QEMU guest, and back out again."""

from __future__ import annotations

import time

import libvirt
import pytest

from testbed.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

READY_MARKER = "cloudctl-guest: ready"


def test_boot_console_and_delete_a_real_guest(stack: Stack) -> None:
    started = time.monotonic()
    created = stack.api("POST", "/api/v1/servers/",
                        json={"name": "e2e-demo", "flavor": "m1.nano", "image": "tiny"})
    assert created.status_code == 202, created.text
    server = created.json()
    assert server["status"] == "BUILD"
    server_id = server["id"]

    def active() -> dict | None:
        body = stack.api("GET", f"/api/v1/servers/{server_id}/").json()
        assert body["status"] != "ERROR", f"build failed: {body['fault']}"
        return body if body["status"] == "ACTIVE" else None

    server = stack.wait_for("server ACTIVE", active, 180)
    to_active = time.monotonic() - started
    assert (server["vm_state"], server["task_state"], server["power_state"]) == (
        "active", None, "running")
    assert server["host"] == stack.host

    conn = libvirt.open("qemu:///system")
    try:
        domain = conn.lookupByName(f"instance-{server_id}")
        assert domain.isActive()
        assert domain.UUIDString() == server_id
        assert (stack.instances_path / server_id / "disk").exists()

        def console() -> str:
            answer = stack.api("GET", f"/api/v1/servers/{server_id}/console-output/?lines=50")
            assert answer.status_code == 200, answer.text
            output = answer.json()["output"]
            return output if READY_MARKER in output else ""

        stack.wait_for("guest ready marker in console-output", console, 120, interval=0.5)
        to_ready = time.monotonic() - started
        print(f"\nPOST -> ACTIVE {to_active:.1f} s; POST -> '{READY_MARKER}' {to_ready:.1f} s")

        [host] = [h for h in stack.api("GET", "/api/v1/hosts/").json() if h["name"] == stack.host]
        assert (host["vcpus_used"], host["memory_mb_used"], host["disk_gb_used"],
                host["instance_count"]) == (1, 128, 1, 1)

        deleted = stack.api("DELETE", f"/api/v1/servers/{server_id}/")
        assert deleted.status_code == 202, deleted.text
        stack.wait_for("server gone from the API",
                       lambda: stack.api("GET", f"/api/v1/servers/{server_id}/").status_code == 404,
                       60)
        assert server_id not in [s["id"] for s in stack.api("GET", "/api/v1/servers/").json()]
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(f"instance-{server_id}")
        assert not (stack.instances_path / server_id).exists()
        [host] = [h for h in stack.api("GET", "/api/v1/hosts/").json() if h["name"] == stack.host]
        assert (host["vcpus_used"], host["memory_mb_used"], host["instance_count"]) == (0, 0, 0)
    finally:
        conn.close()


def test_flower_sees_every_worker(stack: Stack) -> None:
    import requests

    def workers() -> set[str]:
        try:
            answer = requests.get(f"{stack.flower_url}/api/workers?refresh=1", timeout=10,
                                  auth=("flower", "e2e-flower"))
        except requests.ConnectionError:
            return set()
        if answer.status_code != 200:
            return set()
        return {name.split("@")[0] for name in answer.json()}

    seen = stack.wait_for("scheduler, conductor and compute workers in Flower",
                          lambda: (w := workers()) >= {"scheduler", "conductor", "compute"} and w,
                          60, interval=1)
    assert {"scheduler", "conductor", "compute"} <= seen


def test_a_corrupt_image_ends_in_error_with_a_fault_that_says_why(stack: Stack,
                                                                  tiny_image_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "manage.py", "bootstrap", "--image", str(tiny_image_path),
                    "--image-name", "corrupt"], cwd=repo, env=stack.env, check=True,
                   capture_output=True)
    [image] = [i for i in stack.api("GET", "/api/v1/images/").json() if i["name"] == "corrupt"]
    stored = Path(stack.env["CLOUDCTL_STATE_DIR"]) / "image-store" / image["id"]
    with open(stored, "r+b") as handle:  # flip bytes after registration: the sha256 no longer holds
        handle.seek(4096)
        handle.write(b"\xff" * 16)

    created = stack.api("POST", "/api/v1/servers/",
                        json={"name": "doomed", "flavor": "m1.nano", "image": image["id"]})
    assert created.status_code == 202, created.text
    server_id = created.json()["id"]

    def errored() -> dict | None:
        body = stack.api("GET", f"/api/v1/servers/{server_id}/").json()
        return body if body["status"] == "ERROR" else None

    server = stack.wait_for("server ERROR", errored, 90)
    assert server["task_state"] is None
    assert server["fault"]["message"].startswith(
        f"Image corrupt checksum mismatch: expected sha256 {image['sha256']}"), server["fault"]
    assert not (stack.instances_path / server_id).exists()
    [host] = [h for h in stack.api("GET", "/api/v1/hosts/").json() if h["name"] == stack.host]
    assert host["instance_count"] == 0
    assert stack.api("DELETE", f"/api/v1/servers/{server_id}/").status_code == 202
    stack.wait_for("errored server deleted",
                   lambda: stack.api("GET", f"/api/v1/servers/{server_id}/").status_code == 404, 60)
