"""Every lifecycle action on a real guest, checked against libvirt itself; recovery from a killed
worker; a stuck task reaped at its deadline."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from typing import Any

import libvirt
import pytest

from testbed import REPO
from testbed.stack import ExtraWorker, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

READY = "cloudctl-guest: ready"


def server(stack: Stack, server_id: str) -> dict[str, Any]:
    return stack.api("GET", f"/api/v1/servers/{server_id}/").json()


def settle(stack: Stack, server_id: str, status: str, timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = server(stack, server_id)
        if body["task_state"] is None and body["status"] == status:
            return body
        assert body["status"] != "ERROR" or status == "ERROR", f"server ERROR: {body['fault']}"
        return None

    return stack.wait_for(f"server {status}", reached, timeout, interval=0.1)


def console(stack: Stack, server_id: str) -> str:
    answer = stack.api("GET", f"/api/v1/servers/{server_id}/console-output/")
    return answer.json().get("output", "") if answer.status_code == 200 else ""


def boot_count(stack: Stack, server_id: str) -> int:
    counts = re.findall(r"cloudctl-guest: boot-count (\d+)", console(stack, server_id))
    return int(counts[-1]) if counts else 0


def wait_booted(stack: Stack, server_id: str, count: int, timeout: float = 90) -> None:
    def ready() -> bool:
        text = console(stack, server_id)
        tail = text.split(f"boot-count {count}", 1)
        return len(tail) == 2 and READY in tail[1]

    stack.wait_for(f"boot {count} of the guest reaches '{READY}'", ready, timeout, interval=0.3)


def create(stack: Stack, name: str) -> str:
    answer = stack.api("POST", "/api/v1/servers/",
                       json={"name": name, "flavor": "m1.nano", "image": "tiny"})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def act(stack: Stack, server_id: str, action: str, **body: Any) -> dict[str, Any]:
    answer = stack.api("POST", f"/api/v1/servers/{server_id}/{action}/", json=body)
    assert answer.status_code == 202, f"{action}: {answer.status_code} {answer.text}"
    return answer.json()


def test_every_action_on_a_real_guest(stack: Stack, conn: libvirt.virConnect) -> None:
    server_id = create(stack, "lifecycle")
    settle(stack, server_id, "ACTIVE")
    wait_booted(stack, server_id, 1)
    domain = conn.lookupByName(f"instance-{server_id}")
    timings: dict[str, float] = {}

    def timed(action: str, status: str, **body: Any) -> dict[str, Any]:
        started = time.monotonic()
        record = act(stack, server_id, action, **body)
        assert record["action"] == action
        settled = settle(stack, server_id, status)
        timings[f"{action} {body.get('type', '')}".strip()] = time.monotonic() - started
        return settled

    timed("reboot", "ACTIVE", type="SOFT")
    wait_booted(stack, server_id, 2)
    assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    timed("reboot", "ACTIVE", type="HARD")
    wait_booted(stack, server_id, 3)

    stopped = timed("stop", "SHUTOFF")
    assert stopped["power_state"] == "shutdown"
    assert domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF and domain.isPersistent()
    refused = stack.api("POST", f"/api/v1/servers/{server_id}/pause/", json={})
    assert refused.status_code == 409 and refused.json()["vm_state"] == "stopped"

    timed("start", "ACTIVE")
    wait_booted(stack, server_id, 4)

    paused = timed("pause", "PAUSED")
    assert paused["power_state"] == "paused"
    assert domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    timed("unpause", "ACTIVE")
    assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    suspended = timed("suspend", "SUSPENDED")
    assert suspended["power_state"] == "suspended"
    assert not domain.isActive() and domain.hasManagedSaveImage()
    timed("resume", "ACTIVE")
    assert domain.isActive() and not domain.hasManagedSaveImage()
    time.sleep(1)
    assert boot_count(stack, server_id) == 4  # RAM restored: no new boot

    history = stack.api("GET", f"/api/v1/servers/{server_id}/actions/").json()
    assert [a["action"] for a in reversed(history)] == [
        "create", "reboot", "reboot", "stop", "start", "pause", "unpause", "suspend", "resume"]
    assert all(a["result"] == "Success" and a["finish_time"] for a in history), history
    reboot_events = [e["event"] for e in history[-2]["events"]]
    assert "compute_reboot_instance" in reboot_events

    print("\n" + "\n".join(f"  {name:12s} {seconds:5.2f} s" for name, seconds in timings.items()))
    stack.api("DELETE", f"/api/v1/servers/{server_id}/")


def test_a_guest_powering_itself_off_becomes_shutoff(stack: Stack, conn: libvirt.virConnect):
    server_id = create(stack, "self-poweroff")
    settle(stack, server_id, "ACTIVE")
    wait_booted(stack, server_id, 1)
    # The ACPI power button pressed from outside cloudctl: the guest shuts itself down.
    conn.lookupByName(f"instance-{server_id}").shutdown()
    started = time.monotonic()
    settled = settle(stack, server_id, "SHUTOFF", timeout=30)
    print(f"\n  guest poweroff -> SHUTOFF in the API: {time.monotonic() - started:.2f} s")
    assert settled["power_state"] == "shutdown"
    [latest, *_] = stack.api("GET", f"/api/v1/servers/{server_id}/actions/").json()
    assert latest["action"] == "sync_power_state" and latest["user"] is None
    time.sleep(3)  # and nothing starts it again
    assert server(stack, server_id)["status"] == "SHUTOFF"
    assert not conn.lookupByName(f"instance-{server_id}").isActive()
    stack.api("DELETE", f"/api/v1/servers/{server_id}/")


def _set_host_enabled(stack: Stack, name: str, enabled: bool) -> None:
    code = ("from cloudctl.compute.models import Host; "
            f"Host.objects.filter(name={name!r}).update(enabled={enabled})")
    subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=REPO, env=stack.env,
                   check=True, capture_output=True)


def _placed_on(stack: Stack, worker: ExtraWorker, name: str) -> str:
    stack.wait_for(f"host {worker.name} up",
                   lambda: any(h["name"] == worker.name and h["state"] == "up"
                               for h in stack.api("GET", "/api/v1/hosts/").json()), 60)
    _set_host_enabled(stack, stack.host, False)
    try:
        server_id = create(stack, name)
        body = settle(stack, server_id, "ACTIVE")
    finally:
        _set_host_enabled(stack, stack.host, True)
    assert body["host"] == worker.name
    return server_id


def test_worker_killed_mid_reboot_recovers_truthfully(stack: Stack, extra_worker: ExtraWorker,
                                                      conn: libvirt.virConnect) -> None:
    server_id = _placed_on(stack, extra_worker, "killed-mid-reboot")
    # Right after ACTIVE the guest is still booting and ignores the ACPI request, so the soft
    # reboot waits: the worker is killed while it waits.
    record = act(stack, server_id, "reboot", type="SOFT")

    def reboot_started() -> bool:
        events = next(a for a in stack.api("GET", f"/api/v1/servers/{server_id}/actions/").json()
                  if a["id"] == record["id"])["events"]
        return any(e["event"] == "compute_reboot_instance" for e in events)

    stack.wait_for("the reboot to start on the worker", reboot_started, 30, interval=0.05)
    extra_worker.signal(signal.SIGKILL)
    assert server(stack, server_id)["task_state"] == "rebooting"
    extra_worker.start()
    body = settle(stack, server_id, "ACTIVE", timeout=120)
    assert body["power_state"] == "running"
    assert conn.lookupByName(f"instance-{server_id}").isActive()
    [reboot] = [a for a in stack.api("GET", f"/api/v1/servers/{server_id}/actions/").json()
                if a["id"] == record["id"]]
    assert reboot["result"] == "Success"
    restart = [e for e in reboot["events"] if e["event"] == "init_instance"]
    assert restart and "restarted during rebooting" in restart[0]["message"], reboot["events"]
    stack.api("DELETE", f"/api/v1/servers/{server_id}/")
    stack.wait_for("deleted", lambda: stack.api(
        "GET", f"/api/v1/servers/{server_id}/").status_code == 404, 60)


def test_a_stuck_task_is_reaped_at_its_deadline(stack: Stack, extra_worker: ExtraWorker,
                                                conn: libvirt.virConnect) -> None:
    server_id = _placed_on(stack, extra_worker, "stuck-pause")
    extra_worker.signal(signal.SIGSTOP)  # a wedged worker: the pause is never carried out
    try:
        record = act(stack, server_id, "pause")
        started = time.monotonic()
        body = settle(stack, server_id, "ACTIVE", timeout=60)  # TASK_DEADLINE_PAUSING=8 s
        print(f"\n  stuck pause reaped after {time.monotonic() - started:.1f} s")
        assert body["task_state"] is None
        [pause] = [a for a in stack.api("GET", f"/api/v1/servers/{server_id}/actions/").json()
                   if a["id"] == record["id"]]
        assert pause["result"] == "Error"
        assert pause["message"].startswith("pausing did not finish within 8 s on host")
        assert pause["events"][-1]["event"] == "task_deadline_exceeded"
    finally:
        extra_worker.signal(signal.SIGCONT)
    # The worker wakes up and pauses the domain after all: reality wins again.
    settled = settle(stack, server_id, "PAUSED", timeout=60)
    assert settled["power_state"] == "paused"
    assert conn.lookupByName(f"instance-{server_id}").state()[0] == libvirt.VIR_DOMAIN_PAUSED
    stack.api("DELETE", f"/api/v1/servers/{server_id}/")
