"""Snapshots of a real guest: live (the guest keeps running) and cold, and a server booted from
the live snapshot sees what the first guest wrote on its disk."""

from __future__ import annotations

import threading
import time

import libvirt
import pytest

from testbed.stack import Stack
from tests.e2e.test_lifecycle import act, boot_count, create, settle, wait_booted

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]


def wait_image_active(stack: Stack, image_id: str) -> dict:
    def active() -> dict | None:
        body = stack.api("GET", f"/api/v1/images/{image_id}/").json()
        assert body["status"] != "killed", body
        return body if body["status"] == "active" else None

    return stack.wait_for(f"image {image_id} active", active, 120, interval=0.3)


def test_live_and_cold_snapshots(stack: Stack) -> None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("qemu:///system")
    try:
        first = create(stack, "snap-source")
        settle(stack, first, "ACTIVE")
        wait_booted(stack, first, 1)
        domain = conn.lookupByName(f"instance-{first}")

        states: list[tuple[float, int]] = []
        watching = threading.Event()
        watching.set()

        def watch() -> None:
            while watching.is_set():
                states.append((time.monotonic(), domain.state()[0]))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        try:
            record = act(stack, first, "snapshot", name="live-snap")
            image_id = record["image_id"]
            settle(stack, first, "ACTIVE", timeout=180)
            image = wait_image_active(stack, image_id)
        finally:
            watching.clear()
            watcher.join()
        took = time.monotonic() - started
        not_running = [s for _, s in states if s != libvirt.VIR_DOMAIN_RUNNING]
        paused_s = len(not_running) * 0.01
        print(f"\n  live snapshot: {took:.2f} s; guest seen not running in {len(not_running)} of "
              f"{len(states)} samples (~{paused_s:.2f} s)")
        assert all(s in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED)
                   for _, s in states), "the guest stopped during a live snapshot"
        assert paused_s < 2.0
        assert image["properties"]["instance_uuid"] == first
        assert image["properties"]["image_type"] == "snapshot"
        [snap, *_] = stack.api("GET", f"/api/v1/servers/{first}/actions/").json()
        assert snap["action"] == "snapshot" and snap["result"] == "Success"
        assert "compute_snapshot_instance" in [e["event"] for e in snap["events"]]

        second = stack.api("POST", "/api/v1/servers/",
                           json={"name": "from-snap", "flavor": "m1.nano", "image": image_id})
        assert second.status_code == 202, second.text
        second_id = second.json()["id"]
        settle(stack, second_id, "ACTIVE")
        wait_booted(stack, second_id, 2)  # the first guest's boot counter was in the snapshot
        assert boot_count(stack, second_id) == 2

        act(stack, first, "stop")
        settle(stack, first, "SHUTOFF")
        started = time.monotonic()
        cold = act(stack, first, "snapshot", name="cold-snap")
        body = settle(stack, first, "SHUTOFF", timeout=180)
        assert body["power_state"] == "shutdown"
        wait_image_active(stack, cold["image_id"])
        print(f"  cold snapshot: {time.monotonic() - started:.2f} s")
        for server_id in (first, second_id):
            stack.api("DELETE", f"/api/v1/servers/{server_id}/")
    finally:
        conn.close()
