"""Migration through the REST API between real libvirt hosts: the whole cloudctl (``cloud``) on
three harness hosts, host-a with private storage, host-b and host-c sharing theirs.

Each test boots the demo guest, moves it, and checks what libvirt on each host says, what the guest
says on its console (a soft reboot after the move shows it runs and its disk kept its boot counter),
and the claims the API shows on both hosts at every step.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from compute_workers import contract
from testbed.cloud import Cloud

from .test_cloud import active, domains

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

READY = "cloudctl-guest: ready"


def api(cloud: Cloud, method: str, path: str, **kwargs: Any) -> Any:
    return cloud.stack.api(method, f"/api/v1{path}", **kwargs)


def console(cloud: Cloud, host: str, server_id: str) -> str:
    try:
        return (cloud.host(host).local_instances / server_id / "console.log").read_text(errors="replace")
    except OSError:
        return ""


def booted(cloud: Cloud, host: str, server_id: str, count: int, timeout: float = 120) -> None:
    def ready() -> bool:
        tail = console(cloud, host, server_id).split(f"boot-count {count}", 1)
        return len(tail) == 2 and READY in tail[1]

    cloud.stack.wait_for(f"boot {count} of {server_id} on {host} reaches '{READY}'", ready, timeout, 0.3)


def boot_counts(cloud: Cloud, host: str, server_id: str) -> list[int]:
    return [int(n) for n in re.findall(r"boot-count (\d+)", console(cloud, host, server_id))]


def server(cloud: Cloud, server_id: str) -> dict[str, Any]:
    return dict(api(cloud, "GET", f"/servers/{server_id}/").json())


def settle(cloud: Cloud, server_id: str, status: str, timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = server(cloud, server_id)
        return body if body["status"] == status and body["task_state"] is None else None

    return dict(cloud.stack.wait_for(f"server {server_id} {status}", reached, timeout, 0.2))


def migration_of(cloud: Cloud, server_id: str, migration_id: int) -> dict[str, Any]:
    return dict(api(cloud, "GET", f"/servers/{server_id}/migrations/{migration_id}/").json())


def migration_ends(cloud: Cloud, server_id: str, migration_id: int, timeout: float = 120) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        body = migration_of(cloud, server_id, migration_id)
        return body if body["status"] in ("completed", "confirmed", "finished", "reverted", "cancelled",
                                          "failed", "error", "refused") else None

    return dict(cloud.stack.wait_for(f"migration {migration_id} ends", ended, timeout, 0.1))


# Statuses of a migration still under way once its pre-flight checks passed.
UNDER_WAY = ("preparing", "queued", "running", "running (post-copy)", "cancelling", "migrating",
             "post-migrating", "confirming", "reverting")


def checked(cloud: Cloud, server_id: str, answer: Any, timeout: float = 60) -> dict[str, Any]:
    """A migration request's 202 (status ``checking``: the pre-flight checks run next, on the
    scheduler's worker), then the migration once they are over: with its destination and what the
    checks found (or ``refused`` with the reason)."""
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert accepted["status"] == "checking", accepted
    migration_id = accepted["id"]

    def decided() -> dict[str, Any] | None:
        body = migration_of(cloud, server_id, migration_id)
        return body if body["status"] not in ("accepted", "checking") else None

    return dict(cloud.stack.wait_for(f"migration {migration_id} checked", decided, timeout, 0.05))


def claims(cloud: Cloud) -> dict[str, int]:
    """memory_mb claimed per host, as the API shows it."""
    return {h["name"]: h["memory_mb_used"] for h in api(cloud, "GET", "/hosts/").json()}


def on_daemon(cloud: Cloud, host: str, server_id: str) -> int | None:
    return domains(cloud.host(host)).get(contract.domain_name(server_id))


@pytest.fixture
def guest(cloud: Cloud) -> Iterator[list[str]]:
    """Servers a test creates (append their ids); deleted afterwards, whatever happened."""
    created: list[str] = []
    yield created
    for server_id in created:
        answer = api(cloud, "DELETE", f"/servers/{server_id}/")  # allowed from any state
        assert answer.status_code in (202, 204, 404), answer.text
    for server_id in created:
        cloud.stack.wait_for(f"server {server_id} gone", lambda server_id=server_id: api(
            cloud, "GET", f"/servers/{server_id}/").status_code == 404, 90)


def boot(cloud: Cloud, guest: list[str], name: str, host: str, flavor: str = "m1.nano") -> str:
    body = {"name": name, "flavor": flavor, "image": "tiny", "host": host}
    created = api(cloud, "POST", "/servers/", json=body)
    assert created.status_code == 202, created.text
    server_id = str(created.json()["id"])
    guest.append(server_id)
    active(cloud, server_id)
    booted(cloud, host, server_id, 1)
    return server_id


def soft_reboot_shows_the_same_disk(cloud: Cloud, host: str, server_id: str, count: int) -> None:
    """The guest runs (it answers the ACPI button) and boots from the disk it had (its counter goes on)."""
    answer = api(cloud, "POST", f"/servers/{server_id}/reboot/", json={"type": "SOFT"})
    assert answer.status_code == 202, answer.text
    booted(cloud, host, server_id, count)
    settle(cloud, server_id, "ACTIVE")


def live_migrate(cloud: Cloud, server_id: str, **body: Any) -> Any:
    return api(cloud, "POST", f"/servers/{server_id}/live-migrate/", json=body)


def throttle(cloud: Cloud, host: str, server_id: str, mib_per_s: int = 1) -> None:
    """Make the next migration of the guest slow (libvirt keeps the speed for it)."""
    conn = libvirt.open(cloud.host(host).uri)
    try:
        conn.lookupByName(contract.domain_name(server_id)).migrateSetMaxSpeed(mib_per_s)
    finally:
        conn.close()


def test_live_block_migration_moves_the_running_guest(cloud: Cloud, guest: list[str]) -> None:
    server_id = boot(cloud, guest, "live-block", "host-a")
    before = claims(cloud)
    started = time.monotonic()
    answer = live_migrate(cloud, server_id, host="host-b", block_migration="auto")
    assert server(cloud, server_id)["status"] == "MIGRATING"  # at once, before the checks
    migration = checked(cloud, server_id, answer)
    assert (migration["block_migration"], migration["shared_storage"]) == (True, False), migration
    during = claims(cloud)
    # Claims on both hosts while it runs (read before the status: if it still runs after, it ran then).
    if migration_of(cloud, server_id, migration["id"])["status"] in UNDER_WAY:
        assert during["host-a"] == before["host-a"] and during["host-b"] == before["host-b"] + 128
    done = migration_ends(cloud, server_id, migration["id"])
    seconds = time.monotonic() - started
    assert done["status"] == "completed", done
    moved = settle(cloud, server_id, "ACTIVE")
    assert moved["host"] == "host-b"
    assert on_daemon(cloud, "host-b", server_id) == libvirt.VIR_DOMAIN_RUNNING
    assert on_daemon(cloud, "host-a", server_id) is None
    assert not (cloud.host("host-a").local_instances / server_id).exists(), "source files removed"
    after = claims(cloud)
    assert after["host-a"] == before["host-a"] - 128 and after["host-b"] == before["host-b"] + 128
    # The destination's final figures, even when the migration (well under a second for the demo guest)
    # ended before the first progress report: all memory copied, and the switch-over's pause.
    assert done["memory_total"] >= 64 << 20 and done["memory_remaining"] == 0, done
    assert done["disk_remaining"] == 0, done
    assert done["downtime_ms"] is not None and done["downtime_ms"] >= 0
    print(f"\nlive block migration: libvirt downtime {done['downtime_ms']} ms, "
          f"{done['memory_processed'] / 2**20:.1f} MiB of memory copied")
    print(f"\nlive block migration through the API: POST -> completed {seconds:.2f} s")
    soft_reboot_shows_the_same_disk(cloud, "host-b", server_id, 2)


def test_live_migration_on_shared_storage_copies_no_disk(cloud: Cloud, guest: list[str]) -> None:
    server_id = boot(cloud, guest, "live-shared", "host-b")
    answer = live_migrate(cloud, server_id, host="host-c")
    migration = checked(cloud, server_id, answer)
    assert (migration["block_migration"], migration["shared_storage"]) == (False, True), migration
    done = migration_ends(cloud, server_id, answer.json()["id"])
    assert done["status"] == "completed", done
    assert settle(cloud, server_id, "ACTIVE")["host"] == "host-c"
    assert on_daemon(cloud, "host-c", server_id) == libvirt.VIR_DOMAIN_RUNNING
    assert on_daemon(cloud, "host-b", server_id) is None
    assert (cloud.host("host-c").local_instances / server_id / "disk").exists(), "the shared disk stays"
    soft_reboot_shows_the_same_disk(cloud, "host-c", server_id, 2)


def test_the_scheduler_picks_a_destination_honouring_anti_affinity(cloud: Cloud, guest: list[str]) -> None:
    group = api(cloud, "POST", "/server-groups/", json={"name": "apart", "policy": "anti-affinity"})
    assert group.status_code == 201, group.text
    hints = {"group": group.json()["id"]}
    ids = []
    for name, host in (("apart-1", "host-a"), ("apart-2", "host-b")):
        created = api(cloud, "POST", "/servers/", json={"name": name, "flavor": "m1.nano", "image": "tiny",
                                                        "host": host, "scheduler_hints": hints})
        assert created.status_code == 202, created.text
        guest.append(str(created.json()["id"]))
        ids.append(str(created.json()["id"]))
        active(cloud, ids[-1])
    answer = live_migrate(cloud, ids[0])
    chosen = checked(cloud, ids[0], answer)["dest_host"]
    assert chosen == "host-c", "host-b runs the other member of the group"
    assert migration_ends(cloud, ids[0], answer.json()["id"])["status"] == "completed"
    assert settle(cloud, ids[0], "ACTIVE")["host"] == "host-c"


def test_a_host_is_emptied_for_maintenance(cloud: Cloud, guest: list[str]) -> None:
    """POST /hosts/host-c/live-migrate-servers/: host-c is disabled, its running guest moves to a host the
    scheduler picks (host-b shares host-c's storage, host-a does not: either works), a stopped one is
    refused and stays; host-c is enabled again afterwards for the other tests."""
    running = boot(cloud, guest, "evacuee", "host-c")
    stopped = boot(cloud, guest, "sleeper", "host-c")
    assert api(cloud, "POST", f"/servers/{stopped}/stop/").status_code == 202
    settle(cloud, stopped, "SHUTOFF")
    try:
        answer = api(cloud, "POST", "/hosts/host-c/live-migrate-servers/", json={})
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert body["host"]["enabled"] is False and "live-migrating its servers away" in \
            body["host"]["disabled_reason"]
        assert body["max_servers"] >= 1 and body["batch"]
        by_id = {entry["server"]: entry for entry in body["servers"]}
        assert by_id[running]["accepted"] is True and by_id[running]["dest_host"] is None  # checked next
        assert by_id[stopped]["accepted"] is False and "vm_state=stopped" in by_id[stopped]["refused"]
        done = migration_ends(cloud, running, by_id[running]["migration_id"])
        assert done["status"] == "completed", done
        dest = done["dest_host"]
        assert dest in ("host-a", "host-b"), done
        assert settle(cloud, running, "ACTIVE")["host"] == dest
        assert on_daemon(cloud, dest, running) == libvirt.VIR_DOMAIN_RUNNING
        assert on_daemon(cloud, "host-c", running) is None
        assert server(cloud, stopped)["host"] == "host-c"  # cold-migrate it, as the refusal says
        soft_reboot_shows_the_same_disk(cloud, dest, running, 2)
    finally:
        assert api(cloud, "POST", "/hosts/host-c/enable/").status_code == 200


def test_a_failed_preflight_check_leaves_the_server_untouched(cloud: Cloud, guest: list[str]) -> None:
    """The image the server was booted from is deleted: host-a has it cached, host-b cannot fetch it."""
    upload = api(cloud, "POST", "/images/", json={"name": "doomed", "disk_format": "qcow2"})
    assert upload.status_code == 201, upload.text
    image_id = upload.json()["id"]
    tiny = next(i for i in api(cloud, "GET", "/images/").json() if i["name"] == "tiny")
    data = api(cloud, "GET", f"/images/{tiny['id']}/file").content
    put = api(cloud, "PUT", f"/images/{image_id}/file", data=data,
              headers={"Content-Type": "application/octet-stream"})
    assert put.status_code in (200, 204), put.text
    created = api(cloud, "POST", "/servers/", json={"name": "orphan", "flavor": "m1.nano",
                                                    "image": image_id, "host": "host-a"})
    server_id = str(created.json()["id"])
    guest.append(server_id)
    active(cloud, server_id)
    assert api(cloud, "DELETE", f"/images/{image_id}/").status_code == 204
    before = (server(cloud, server_id), claims(cloud))
    answer = live_migrate(cloud, server_id, host="host-b")
    refused = checked(cloud, server_id, answer)
    assert refused["status"] == "refused" and refused["failed_check"] == "image", refused
    assert "host-b" in refused["error"]
    after = (server(cloud, server_id), claims(cloud))
    assert after[0]["status"] == "ACTIVE" and after[0]["host"] == "host-a" and after[0]["task_state"] is None
    assert after[1] == before[1]
    listed = api(cloud, "GET", f"/servers/{server_id}/migrations/").json()
    assert [(m["id"], m["status"]) for m in listed] == [(refused["id"], "refused")]
    [action] = [a for a in api(cloud, "GET", f"/servers/{server_id}/actions/").json()
                if a["action"] == "live-migration"]
    assert action["result"] == "Error" and "host-b" in action["message"], action
    assert on_daemon(cloud, "host-a", server_id) == libvirt.VIR_DOMAIN_RUNNING


def progressing(cloud: Cloud, server_id: str, migration_id: int) -> dict[str, Any]:
    """The migration once it runs and libvirt's counters moved."""
    def moving() -> dict[str, Any] | None:
        body = migration_of(cloud, server_id, migration_id)
        return body if body["status"] == "running" and body["memory_processed"] else None

    return cloud.stack.wait_for("progress reported", moving, 30, 0.1)


def test_abort_mid_migration_keeps_the_guest_on_its_source(cloud: Cloud, guest: list[str]) -> None:
    server_id = boot(cloud, guest, "abort-me", "host-a")
    throttle(cloud, "host-a", server_id)
    answer = live_migrate(cloud, server_id, host="host-b")
    assert answer.status_code == 202, answer.text
    migration_id = answer.json()["id"]

    seen = progressing(cloud, server_id, migration_id)
    print(f"\nprogress: {seen['memory_processed']} of {seen['memory_total']} bytes")
    aborted = api(cloud, "POST", f"/servers/{server_id}/migrations/{migration_id}/abort/")
    assert aborted.status_code == 202, aborted.text
    done = migration_ends(cloud, server_id, migration_id, 60)
    assert done["status"] == "cancelled", done
    body = settle(cloud, server_id, "ACTIVE")
    assert body["host"] == "host-a"
    assert on_daemon(cloud, "host-a", server_id) == libvirt.VIR_DOMAIN_RUNNING
    assert on_daemon(cloud, "host-b", server_id) is None
    assert claims(cloud)["host-b"] == 0
    soft_reboot_shows_the_same_disk(cloud, "host-a", server_id, 2)


def test_force_complete_switches_a_crawling_migration_to_post_copy(cloud: Cloud, guest: list[str]) -> None:
    """At 1 MiB/s the demo guest's 128 MiB would take two minutes; force-complete switches to post-copy
    (the cloud's hosts permit it): the guest runs on host-b at once and the migration ends in seconds."""
    server_id = boot(cloud, guest, "crawler", "host-a")
    throttle(cloud, "host-a", server_id)
    answer = live_migrate(cloud, server_id, host="host-b")
    assert answer.status_code == 202, answer.text
    migration_id = answer.json()["id"]
    progressing(cloud, server_id, migration_id)
    sent = time.monotonic()
    forced = api(cloud, "POST", f"/servers/{server_id}/migrations/{migration_id}/force-complete/")
    assert forced.status_code == 202, forced.text
    done = migration_ends(cloud, server_id, migration_id, 60)
    took = time.monotonic() - sent
    assert done["status"] == "completed", done
    print(f"\nforce-complete (post-copy) of a migration throttled to 1 MiB/s: POST -> completed {took:.2f} s")
    body = settle(cloud, server_id, "ACTIVE")
    assert body["host"] == "host-b"
    assert on_daemon(cloud, "host-b", server_id) == libvirt.VIR_DOMAIN_RUNNING
    assert on_daemon(cloud, "host-a", server_id) is None
    assert claims(cloud)["host-a"] == 0
    [action] = [a for a in api(cloud, "GET", f"/servers/{server_id}/actions/").json()
                if a["action"] == "live-migration"]
    [event] = [e for e in action["events"] if e["event"] == "compute_live_migration_force_complete"]
    assert event["result"] == "Success" and "post-copy" in event["message"], event
    soft_reboot_shows_the_same_disk(cloud, "host-b", server_id, 2)


def test_a_migration_past_its_deadline_is_aborted(cloud: Cloud, guest: list[str]) -> None:
    server_id = boot(cloud, guest, "too-slow", "host-a")
    throttle(cloud, "host-a", server_id)
    answer = live_migrate(cloud, server_id, host="host-b")
    deadline = checked(cloud, server_id, answer)["completion_timeout"]
    assert deadline, "set once the checks found what the migration copies"
    done = migration_ends(cloud, server_id, answer.json()["id"], deadline + 60)
    assert done["status"] == "failed" and str(deadline) in done["error"], done
    assert settle(cloud, server_id, "ACTIVE")["host"] == "host-a"
    assert on_daemon(cloud, "host-a", server_id) == libvirt.VIR_DOMAIN_RUNNING
    actions = api(cloud, "GET", f"/servers/{server_id}/actions/").json()
    assert actions[0]["action"] == "live-migration" and actions[0]["result"] == "Error"


def test_worker_killed_mid_migration_ends_truthfully(cloud: Cloud, guest: list[str]) -> None:
    server_id = boot(cloud, guest, "orphaned", "host-a")
    throttle(cloud, "host-a", server_id)
    answer = live_migrate(cloud, server_id, host="host-b")
    assert answer.status_code == 202, answer.text
    migration_id = answer.json()["id"]
    cloud.stack.wait_for("migration running", lambda: migration_of(
        cloud, server_id, migration_id)["status"] == "running", 30, 0.1)
    worker = cloud.workers["host-a"]
    worker.kill()
    worker.start()
    done = migration_ends(cloud, server_id, migration_id, 90)
    body = settle(cloud, server_id, "ACTIVE", 90)
    # Wherever the domain is, the record says so, and the claims follow it (the destination may still
    # be undoing the incoming domain for a moment).
    def running_on() -> list[str]:
        where = {host: on_daemon(cloud, host, server_id) for host in ("host-a", "host-b")}
        return [host for host, state in where.items() if state is not None]

    cloud.stack.wait_for("one domain left", lambda: len(running_on()) == 1, 30, 0.2)
    assert running_on() == [body["host"]], (body, done)
    assert on_daemon(cloud, body["host"], server_id) == libvirt.VIR_DOMAIN_RUNNING
    print(f"\nworker killed mid-migration: migration {done['status']}, server on {body['host']}: "
          f"{done['error']}")
    assert claims(cloud)[{"host-a": "host-b", "host-b": "host-a"}[body["host"]]] == 0


def test_cold_migration_moves_the_disk_and_starts_the_guest_there(cloud: Cloud, guest: list[str]) -> None:
    server_id = boot(cloud, guest, "cold", "host-b")
    started = time.monotonic()
    answer = api(cloud, "POST", f"/servers/{server_id}/migrate/", json={"host": "host-a"})
    assert answer.status_code == 202, answer.text
    done = migration_ends(cloud, server_id, answer.json()["id"])
    assert done["status"] in ("confirmed", "finished"), done
    body = settle(cloud, server_id, "ACTIVE")
    print(f"\ncold migration through the API: POST -> ACTIVE on the destination "
          f"{time.monotonic() - started:.2f} s")
    assert body["host"] == "host-a"
    cloud.stack.wait_for("source copy removed", lambda: migration_of(
        cloud, server_id, answer.json()["id"])["status"] == "confirmed", 60)
    assert on_daemon(cloud, "host-a", server_id) == libvirt.VIR_DOMAIN_RUNNING
    assert on_daemon(cloud, "host-b", server_id) is None
    assert not (cloud.host("host-b").local_instances / f"{server_id}_resize").exists()
    booted(cloud, "host-a", server_id, 2)  # the same disk: its boot counter went on
    assert claims(cloud)["host-b"] == 0


def resize_to(cloud: Cloud, server_id: str, flavor: str) -> dict[str, Any]:
    """The resize once its pre-flight checks chose the destination (``dest_host``)."""
    answer = api(cloud, "POST", f"/servers/{server_id}/resize/", json={"flavor": flavor})
    migration = checked(cloud, server_id, answer)
    assert migration["dest_host"], migration
    return migration


def test_resize_then_confirm(cloud: Cloud, guest: list[str]) -> None:
    server_id = boot(cloud, guest, "grow", "host-a")
    migration = resize_to(cloud, server_id, "m1.tiny")
    host = migration["dest_host"]
    done = migration_ends(cloud, server_id, migration["id"])
    assert done["status"] == "finished", done
    body = settle(cloud, server_id, "VERIFY_RESIZE")
    assert body["flavor"]["name"] == "m1.tiny" and body["host"] == host
    held = claims(cloud)
    if host == "host-a":
        assert held["host-a"] == 128 + 512
    else:
        assert (held["host-a"], held[host]) == (128, 512)
    booted(cloud, host, server_id, 2)
    assert api(cloud, "POST", f"/servers/{server_id}/confirm-resize/").status_code == 202
    settle(cloud, server_id, "ACTIVE")
    assert claims(cloud)[host] == 512 and sum(claims(cloud).values()) == 512
    assert not (cloud.host("host-a").local_instances / f"{server_id}_resize").exists()
    conn = libvirt.open(cloud.host(host).uri)
    try:
        assert conn.lookupByName(contract.domain_name(server_id)).maxMemory() == 512 * 1024
    finally:
        conn.close()


def test_resize_then_revert(cloud: Cloud, guest: list[str]) -> None:
    server_id = boot(cloud, guest, "shrink-back", "host-b")
    migration = resize_to(cloud, server_id, "m1.tiny")
    assert migration_ends(cloud, server_id, migration["id"])["status"] == "finished"
    settle(cloud, server_id, "VERIFY_RESIZE")
    assert api(cloud, "POST", f"/servers/{server_id}/revert-resize/").status_code == 202
    body = settle(cloud, server_id, "ACTIVE")
    assert (body["host"], body["flavor"]["name"]) == ("host-b", "m1.nano")
    assert migration_of(cloud, server_id, migration["id"])["status"] == "reverted"
    assert claims(cloud)["host-b"] == 128 and sum(claims(cloud).values()) == 128
    assert on_daemon(cloud, "host-b", server_id) == libvirt.VIR_DOMAIN_RUNNING
    # The copy booted with the new flavor (its counter became 2) and was discarded; the original disk
    # (counter 1) boots again, with its own console log: 1, then 2 once more, never 3.
    booted(cloud, "host-b", server_id, 2)
    assert boot_counts(cloud, "host-b", server_id) == [1, 2]
