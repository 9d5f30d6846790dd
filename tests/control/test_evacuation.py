"""A dead host in the control plane: force-down, fencing (HOST_FENCE_COMMAND, real small scripts),
evacuation (Nova's evacuate) through the API and the destination's reports as the conductor applies
them, auto-evacuation, and the dead host coming back.

The hosts are played by the test (the ``outbox`` captures what is sent to them); the compute side of
rebuild_instance and destroy_evacuated is tested in tests/compute, the whole in tests/multihost.
"""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from cloudctl.compute import conductor, evacuation, migration_reports, quota_usage, recovery, tasks
from cloudctl.compute.models import Allocation, Flavor, Host, Instance, InstanceAction, Migration
from cloudctl.images.models import ImageStatus
from compute_workers import contract

from .conftest import Outbox, active_server, heartbeat

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("send_on_commit")]

SHARED = "0123456789abcdef0123456789abcdef"
LOCAL_1, LOCAL_2 = "1" * 32, "2" * 32


def allocations(instance: Instance) -> list[tuple[str, bool]]:
    """(host, held by a migration) of every allocation of the instance."""
    return sorted((a.host.name, a.migration_id is not None)
                  for a in Allocation.objects.filter(instance=instance).select_related("host"))


def report(migration: Migration | int, host: str, status: str, **kw: Any) -> bool:
    pk = migration if isinstance(migration, int) else migration.pk
    return migration_reports.migration_update(migration_id=pk, host=host, status=status, **kw)


def die(name: str) -> None:
    """The host's heartbeats stopped SERVICE_DOWN_TIME ago (its worker did not stop cleanly)."""
    Host.objects.filter(name=name).update(
        last_heartbeat=timezone.now() - timedelta(seconds=settings.SERVICE_DOWN_TIME + 1))


def force_down(admin_api: APIClient, name: str, forced_down: bool = True) -> Any:
    answer = admin_api.post(f"/api/v1/hosts/{name}/force-down/", {"forced_down": forced_down}, format="json")
    assert answer.status_code == 200, answer.json()
    return answer.json()


def evacuate(admin_api: APIClient, server: Instance, **body: Any) -> Any:
    return admin_api.post(f"/api/v1/servers/{server.uuid}/evacuate/", body, format="json")


def two_hosts(storage: tuple[str, str] = (SHARED, SHARED)) -> None:
    heartbeat("hv1", storage_id=storage[0])
    heartbeat("hv2", storage_id=storage[1])


@pytest.fixture
def dead_hv1(api: APIClient, admin_api: APIClient, outbox: Outbox, flavors: dict[str, Flavor],
             image: Any) -> Instance:
    """A running server on hv1, which shares its instance storage with hv2; hv1 died and is fenced."""
    server = active_server(api, outbox)
    two_hosts()
    die("hv1")
    force_down(admin_api, "hv1")
    outbox.compute.clear()
    return server


def test_heartbeats_report_the_storage_id_and_old_workers_none(db: None) -> None:
    assert heartbeat("hv1", storage_id=SHARED).storage_id == SHARED
    older_worker = {key: value for key, value in _resources().items() if key != "storage_id"}
    assert conductor.host_heartbeat(host="hv1", resources=older_worker).storage_id == ""
    assert tasks._resources({})["storage_id"] == ""
    with pytest.raises(contract.ReportError, match="storage_id"):
        tasks._resources({"storage_id": "../shared"})


def test_force_down_keeps_a_host_down_until_an_admin_clears_it(
        api: APIClient, admin_api: APIClient, outbox: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, outbox)
    url = "/api/v1/hosts/hv1/force-down/"
    assert api.post(url, {"forced_down": True}, format="json").status_code == 403
    assert admin_api.post("/api/v1/hosts/nope/force-down/", {"forced_down": True},
                          format="json").status_code == 404
    bad = admin_api.post(url, {"forced_down": "yes"}, format="json")
    assert bad.status_code == 400 and "forced_down" in bad.json()
    assert admin_api.post(url, {}, format="json").status_code == 400
    body = admin_api.post(url, {"forced_down": True, "reason": "PSU dead"}, format="json").json()
    assert (body["state"], body["forced_down"], body["forced_down_reason"]) == ("down", True, "PSU dead")
    assert body["forced_down_at"] is not None
    assert admin_api.get(f"/api/v1/servers/{server.uuid}/").json()["host_status"] == "DOWN"
    heartbeat("hv1")  # its heartbeats do not bring it back
    assert admin_api.get("/api/v1/hosts/hv1/").json()["state"] == "down"
    assert not Host.objects.get(name="hv1").is_up
    body = force_down(admin_api, "hv1", False)
    assert (body["state"], body["forced_down"], body["forced_down_reason"]) == ("up", False, "")
    assert admin_api.get(f"/api/v1/servers/{server.uuid}/").json()["host_status"] == "UP"


def test_evacuate_is_refused_with_the_reason(
        api: APIClient, admin_api: APIClient, outbox: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, outbox)
    two_hosts()
    assert evacuate(api, server).status_code == 403
    assert admin_api.post("/api/v1/servers/00000000-0000-0000-0000-000000000000/evacuate/", {},
                          format="json").status_code == 404
    bad = evacuate(admin_api, server, allow_data_loss="yes")
    assert bad.status_code == 400 and "allow_data_loss" in bad.json()

    up = evacuate(admin_api, server)
    assert up.status_code == 409 and "hv1 is up" in up.json()["detail"], up.json()
    die("hv1")
    unfenced = evacuate(admin_api, server)
    assert unfenced.status_code == 409
    detail = unfenced.json()["detail"]
    assert "not fenced" in detail and "/api/v1/hosts/hv1/force-down/" in detail, detail
    force_down(admin_api, "hv1")
    heartbeat("hv1", storage_id=SHARED)  # forced down, but its worker heartbeats after that
    alive = evacuate(admin_api, server)
    assert alive.status_code == 409 and "still heartbeats" in alive.json()["detail"]
    die("hv1")

    assert evacuate(admin_api, server, host="hv1").status_code == 400
    unknown = evacuate(admin_api, server, host="hv9")
    assert unknown.status_code == 400 and "host" in unknown.json()

    Host.objects.filter(name="hv2").update(storage_id=LOCAL_2)
    private = evacuate(admin_api, server)
    assert private.status_code == 409
    detail = private.json()["detail"]
    assert "the root disk is on hv1's private storage" in detail and "allow_data_loss" in detail, detail
    Host.objects.filter(name="hv2").update(storage_id=SHARED)

    Host.objects.filter(name="hv2").update(enabled=False)
    none = evacuate(admin_api, server)
    assert none.status_code == 409 and "no host can take server" in none.json()["detail"]
    assert "ComputeFilter" in none.json()["detail"], none.json()  # the NoValidHost breakdown
    Host.objects.filter(name="hv2").update(enabled=True)

    Host.objects.filter(name="hv2").update(storage_id=LOCAL_2)
    image.status = ImageStatus.DELETED
    image.save(update_fields=["status"])
    gone = evacuate(admin_api, server, allow_data_loss=True)
    assert gone.status_code == 409 and "is deleted: its root disk cannot be rebuilt" in gone.json()["detail"]

    Host.objects.filter(name="hv2").update(storage_id=SHARED)
    Migration.objects.create(instance=server, migration_type="live-migration", status="running",
                             source_host=server.host, old_flavor=server.flavor, new_flavor=server.flavor)
    moving = evacuate(admin_api, server)
    assert moving.status_code == 409 and "live-migration in progress" in moving.json()["detail"]

    server.refresh_from_db()
    assert (server.task_state, server.host.name) == (None, "hv1"), "a refusal changed nothing"
    assert allocations(server) == [("hv1", False)]
    assert not Migration.objects.filter(migration_type="evacuation").exists()
    assert outbox.compute == []


def test_a_host_powered_off_and_forced_down_is_evacuated_without_waiting_for_service_down_time(
        api: APIClient, admin_api: APIClient, outbox: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    """Its last heartbeat is seconds old, but none came after the force-down: fenced, evacuated now."""
    server = active_server(api, outbox)
    two_hosts()
    force_down(admin_api, "hv1")
    accepted = evacuate(admin_api, server)
    assert accepted.status_code == 202, accepted.json()
    assert accepted.json()["dest_host"] == "hv2"


def test_evacuation_on_shared_storage_keeps_the_disk_and_the_dead_host_cleans_up_when_back(
        api: APIClient, admin_api: APIClient, dead_hv1: Instance, outbox: Outbox) -> None:
    server = dead_hv1
    # A reboot was in flight when the host died.
    Instance.objects.filter(uuid=server.uuid).update(task_state="rebooting")
    reboot = InstanceAction.objects.create(instance=server, action="reboot", request_id="req-1")
    reboot.events.create(event="compute_reboot_instance", host="hv1")
    usage = quota_usage.count_compute(server.project_id)

    answer = evacuate(admin_api, server)
    assert answer.status_code == 202, answer.json()
    body = answer.json()
    assert (body["migration_type"], body["status"], body["source_host"], body["dest_host"]) == (
        "evacuation", "rebuilding", "hv1", "hv2")
    assert body["shared_storage"] is True
    server.refresh_from_db()
    assert (server.status, server.task_state, server.host.name) == ("REBUILD", "rebuilding", "hv1")
    assert allocations(server) == [("hv1", True), ("hv2", False)]
    reboot.refresh_from_db()
    assert reboot.result == "Error" and "interrupted: host hv1 died during rebooting" in reboot.message
    assert reboot.events.get().result == "Error"
    [(host, name, sent)] = outbox.compute
    assert (host, name) == ("hv2", contract.COMPUTE_REBUILD_INSTANCE)
    assert sent["on_shared_storage"] is True and sent["power_on"] is True
    assert sent["spec"]["host"] == "hv2" and sent["migration_id"] == body["id"]
    assert evacuate(admin_api, server).status_code == 409, "being evacuated already"

    migration = Migration.objects.get(pk=body["id"])
    assert not report(migration, "hv1", contract.MIGRATION_REBUILT)  # the wrong host: dropped
    assert report(migration, "hv2", contract.MIGRATION_REBUILT, values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.host.name, server.task_state) == ("ACTIVE", "hv2", None)
    assert allocations(server) == [("hv2", False)]
    migration.refresh_from_db()
    assert migration.status == "done" and migration.finished_at is not None
    action = InstanceAction.objects.get(pk=migration.action_id)
    assert (action.action, action.result) == ("evacuate", "Success")
    assert not report(migration, "hv2", contract.MIGRATION_REBUILT), "a redelivery changes nothing"
    assert allocations(server) == [("hv2", False)]
    assert quota_usage.count_compute(server.project_id) == usage
    assert quota_usage.placement_drift() == []

    # hv1 comes back (still forced down): its stale copy goes, and nothing else happens to the server.
    outbox.compute.clear()
    tasks.host_init("hv1", {**_resources(), "instances": {str(server.uuid): "running"}})
    assert [(h, n) for h, n, _ in outbox.compute] == [("hv1", contract.COMPUTE_DESTROY_EVACUATED)]
    assert outbox.compute[0][2] == {"instance_uuid": str(server.uuid), "migration_id": migration.pk,
                                    "keep_disks": True}
    assert not Host.objects.get(name="hv1").is_up, "a forced-down host stays down until an admin clears it"
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("ACTIVE", "hv2")
    assert not report(migration, "hv2", contract.MIGRATION_SOURCE_CLEANED)  # not the dead host
    assert report(migration, "hv1", contract.MIGRATION_SOURCE_CLEANED)
    migration.refresh_from_db()
    assert migration.status == "completed"
    assert not report(migration, "hv1", contract.MIGRATION_SOURCE_CLEANED)
    outbox.compute.clear()
    tasks.host_init("hv1", _resources())
    assert outbox.compute_tasks(contract.COMPUTE_DESTROY_EVACUATED) == [], "cleaned once"


def _resources() -> dict[str, Any]:
    return {"libvirt_uri": "test:///default", "vcpus": 4, "memory_mb": 8192, "disk_gb": 100,
            "instances": {}, "tunnel_ip": "", "busy": [], "storage_id": SHARED}


def test_private_storage_rebuilds_from_the_image_only_when_data_loss_is_allowed(
        api: APIClient, admin_api: APIClient, outbox: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, outbox)
    Instance.objects.filter(uuid=server.uuid).update(vm_state="stopped", power_state="shutdown")
    two_hosts((LOCAL_1, LOCAL_2))
    die("hv1")
    force_down(admin_api, "hv1")
    assert evacuate(admin_api, server).status_code == 409
    answer = evacuate(admin_api, server, host="hv2", allow_data_loss=True)
    assert answer.status_code == 202, answer.json()
    assert answer.json()["shared_storage"] is False
    [sent] = outbox.compute_tasks(contract.COMPUTE_REBUILD_INSTANCE)
    assert sent["on_shared_storage"] is False and sent["power_on"] is False
    assert report(answer.json()["id"], "hv2", contract.MIGRATION_REBUILT, values={"power_state": "shutdown"})
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("SHUTOFF", "hv2")
    assert allocations(server) == [("hv2", False)]


def test_a_failed_rebuild_leaves_the_server_in_error_on_the_dead_host_to_evacuate_again(
        api: APIClient, admin_api: APIClient, dead_hv1: Instance, outbox: Outbox) -> None:
    server = dead_hv1
    first = evacuate(admin_api, server).json()["id"]
    assert report(first, "hv2", contract.MIGRATION_ERROR, error="the base image could not be fetched")
    server.refresh_from_db()
    assert (server.status, server.host.name, server.task_state) == ("ERROR", "hv1", None)
    fault = server.fault["message"]
    assert "evacuate it again" in fault and "could not be fetched" in fault, fault
    assert allocations(server) == [("hv1", False)], "the destination's claim went, the dead host's is back"
    migration = Migration.objects.get(pk=first)
    assert migration.status == "error"
    assert InstanceAction.objects.get(pk=migration.action_id).result == "Error"
    assert not report(first, "hv2", contract.MIGRATION_ERROR, error="again")
    assert quota_usage.placement_drift() == []

    # A late "rebuilt" of the failed attempt: the domain it left on hv2 is removed (disk kept: shared).
    outbox.compute.clear()
    assert not report(first, "hv2", contract.MIGRATION_REBUILT, values={"power_state": "running"})
    cleanup = {"instance_uuid": str(server.uuid), "migration_id": first, "keep_disks": True}
    assert outbox.compute == [("hv2", contract.COMPUTE_DESTROY_EVACUATED, cleanup)]
    server.refresh_from_db()
    assert (server.host.name, server.status) == ("hv1", "ERROR")
    assert allocations(server) == [("hv1", False)]

    second = evacuate(admin_api, server)
    assert second.status_code == 202, second.json()
    outbox.compute.clear()
    assert not report(first, "hv2", contract.MIGRATION_REBUILT, values={"power_state": "running"})
    assert outbox.compute == [], "never removes what the new attempt builds there"
    assert report(second.json()["id"], "hv2", contract.MIGRATION_REBUILT, values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.host.name, server.fault) == ("ACTIVE", "hv2", None)
    assert allocations(server) == [("hv2", False)]


def test_a_silent_rebuild_is_reaped_from_what_the_destination_reports(
        api: APIClient, admin_api: APIClient, outbox: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, outbox)
    other = active_server(api, outbox, name="other")
    two_hosts()
    die("hv1")
    force_down(admin_api, "hv1")
    silent = evacuate(admin_api, server).json()["id"]
    answer = evacuate(admin_api, other)
    assert answer.status_code == 202, answer.json()
    seen = answer.json()["id"]
    late = timezone.now() - timedelta(seconds=settings.MIGRATION_STEP_TIMEOUT + 1)
    Migration.objects.filter(pk__in=[silent, seen]).update(updated=late)
    heartbeat("hv2", storage_id=SHARED, instances={str(other.uuid): "running"})
    outbox.compute.clear()
    assert recovery.reap_stuck_migrations() == 2
    server.refresh_from_db()
    other.refresh_from_db()
    assert (server.status, server.host.name) == ("ERROR", "hv1")
    assert "got no report" in server.fault["message"]
    assert allocations(server) == [("hv1", False)]
    assert outbox.compute_tasks(contract.COMPUTE_DESTROY_EVACUATED) == [
        {"instance_uuid": str(server.uuid), "migration_id": silent, "keep_disks": True}]
    assert (other.status, other.host.name) == ("ACTIVE", "hv2")
    assert allocations(other) == [("hv2", False)]
    assert Migration.objects.get(pk=seen).status == "done"
    assert quota_usage.placement_drift() == []


def test_a_host_is_evacuated_server_by_server(
        api: APIClient, admin_api: APIClient, outbox: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    web = active_server(api, outbox, name="web")
    db = active_server(api, outbox, name="db")
    building = active_server(api, outbox, name="half")
    Instance.objects.filter(uuid=building.uuid).update(vm_state="building", task_state="spawning")
    two_hosts()
    url = "/api/v1/hosts/hv1/evacuate/"
    assert api.post(url, {}, format="json").status_code == 403
    up = admin_api.post(url, {}, format="json")
    assert up.status_code == 409 and "is up" in up.json()["detail"]
    die("hv1")
    assert admin_api.post(url, {}, format="json").status_code == 409
    force_down(admin_api, "hv1")
    assert admin_api.post(url, {"allow_data_loss": 1}, format="json").status_code == 400
    answer = admin_api.post(url, {}, format="json")
    assert answer.status_code == 202, answer.json()
    by_name = {row["name"]: row for row in answer.json()["servers"]}
    assert by_name["web"]["accepted"] and by_name["db"]["accepted"]
    assert by_name["web"]["dest_host"] == "hv2"
    assert not by_name["half"]["accepted"] and "vm_state=building" in by_name["half"]["refused"]
    assert {Migration.objects.get(pk=by_name[n]["migration_id"]).instance_id for n in ("web", "db")} == {
        web.uuid, db.uuid}
    assert len(outbox.compute_tasks(contract.COMPUTE_REBUILD_INSTANCE)) == 2


# --- Fencing ---------------------------------------------------------------------------------------

def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def silent_hv1(api: APIClient, outbox: Outbox, flavors: dict[str, Flavor], image: Any) -> Instance:
    server = active_server(api, outbox)
    two_hosts()
    die("hv1")
    return server


def test_the_fencing_command_forces_a_dead_host_down_once_per_attempt(
        settings: Any, tmp_path: Path, silent_hv1: Instance, admin_api: APIClient) -> None:
    calls = tmp_path / "calls"
    fence = script(tmp_path, "fence", f'echo "$@" >> {calls}')
    settings.HOST_FENCE_COMMAND = f"{fence} --host '{{host}}' off"
    heartbeat("empty")
    Host.objects.filter(name="empty").update(last_heartbeat=timezone.now() - timedelta(hours=1))
    assert evacuation.hosts_fence_and_evacuate() == {"fenced": 1, "evacuated": 0}
    assert calls.read_text() == "--host hv1 off\n", "only the dead host holding servers, argv as given"
    host = admin_api.get("/api/v1/hosts/hv1/").json()
    assert (host["forced_down"], host["forced_down_reason"]) == (True, evacuation.FENCED_REASON)
    assert "exited 0" in host["fence_message"]
    assert evacuation.hosts_fence_and_evacuate() == {"fenced": 0, "evacuated": 0}
    assert calls.read_text() == "--host hv1 off\n", "a fenced host is not fenced again"
    assert evacuate(admin_api, silent_hv1).status_code == 202


def test_a_failed_or_hung_fencing_command_is_said_on_the_host_and_retried_later(
        settings: Any, tmp_path: Path, silent_hv1: Instance, admin_api: APIClient) -> None:
    settings.HOST_FENCE_COMMAND = script(tmp_path, "fail", "echo 'BMC unreachable' >&2; exit 3")
    assert evacuation.hosts_fence_and_evacuate()["fenced"] == 0
    host = Host.objects.get(name="hv1")
    assert not host.forced_down
    assert "exited 3: BMC unreachable" in host.fence_message and "retried" in host.fence_message
    assert admin_api.get("/api/v1/hosts/hv1/").json()["fence_message"] == host.fence_message
    attempted = host.fence_attempted_at
    assert evacuation.hosts_fence_and_evacuate()["fenced"] == 0
    assert Host.objects.get(name="hv1").fence_attempted_at == attempted, "not before the retry interval"

    settings.HOST_FENCE_TIMEOUT = 0.3
    settings.HOST_FENCE_COMMAND = script(tmp_path, "hang", "sleep 5")
    Host.objects.filter(name="hv1").update(
        fence_attempted_at=timezone.now() - timedelta(seconds=settings.HOST_FENCE_RETRY_INTERVAL + 1))
    assert evacuation.hosts_fence_and_evacuate()["fenced"] == 0
    host = Host.objects.get(name="hv1")
    assert not host.forced_down and "did not finish within 0.3 s" in host.fence_message
    assert evacuate(admin_api, silent_hv1).status_code == 409


def test_an_admin_fences_a_dead_host_now(
        settings: Any, tmp_path: Path, silent_hv1: Instance, admin_api: APIClient, api: APIClient) -> None:
    settings.HOST_FENCE_COMMAND = ""
    none = admin_api.post("/api/v1/hosts/hv1/fence/", format="json")
    assert none.status_code == 409 and "HOST_FENCE_COMMAND is not set" in none.json()["detail"]
    settings.HOST_FENCE_COMMAND = script(tmp_path, "fail", "exit 1")
    failed = admin_api.post("/api/v1/hosts/hv1/fence/", format="json")
    assert failed.status_code == 409 and "exited 1" in failed.json()["detail"]
    settings.HOST_FENCE_COMMAND = script(tmp_path, "ok", "exit 0")
    assert api.post("/api/v1/hosts/hv1/fence/", format="json").status_code == 403
    up = admin_api.post("/api/v1/hosts/hv2/fence/", format="json")
    assert up.status_code == 409 and "is up" in up.json()["detail"]
    assert not Host.objects.get(name="hv2").forced_down
    done = admin_api.post("/api/v1/hosts/hv1/fence/", format="json")
    assert done.status_code == 200 and done.json()["forced_down"] is True


# --- Auto-evacuation -------------------------------------------------------------------------------

def test_auto_evacuation_moves_the_servers_of_a_fenced_host_as_the_system(
        settings: Any, api: APIClient, admin_api: APIClient, outbox: Outbox, flavors: dict[str, Flavor],
        image: Any) -> None:
    settings.AUTO_EVACUATE = True
    web = active_server(api, outbox, name="web")
    db = active_server(api, outbox, name="db")
    two_hosts((LOCAL_1, LOCAL_2))
    die("hv1")
    assert evacuation.hosts_fence_and_evacuate()["evacuated"] == 0, "not fenced: nothing moves"
    assert not InstanceAction.objects.filter(action="evacuate").exists()
    force_down(admin_api, "hv1")
    for _tick in range(3):
        assert evacuation.hosts_fence_and_evacuate()["evacuated"] == 0
    # Private storage and AUTO_EVACUATE_ALLOW_DATA_LOSS false: one event per server saying why.
    refusals = InstanceAction.objects.filter(action="evacuate", request_id="system", result="Error")
    assert sorted(refusals.values_list("instance__name", flat=True)) == ["db", "web"]
    assert "allow_data_loss" in refusals.first().message
    assert refusals.first().events.get().event == "auto_evacuate"

    settings.AUTO_EVACUATE_ALLOW_DATA_LOSS = True
    assert evacuation.hosts_fence_and_evacuate()["evacuated"] == 2
    assert evacuation.hosts_fence_and_evacuate()["evacuated"] == 0, "each once"
    for server in (web, db):
        migration = Migration.objects.get(instance=server, migration_type="evacuation")
        assert migration.status == "rebuilding" and migration.user is None
        assert InstanceAction.objects.get(pk=migration.action_id).request_id == "system"
    # A rebuild that fails is left to an admin, not retried every tick.
    failed = Migration.objects.get(instance=web, migration_type="evacuation")
    assert report(failed, "hv2", contract.MIGRATION_ERROR, error="disk full")
    assert evacuation.hosts_fence_and_evacuate()["evacuated"] == 0
    assert Migration.objects.filter(instance=web, migration_type="evacuation").count() == 1


def test_a_server_deleted_after_its_evacuation_is_cleaned_up_once_when_its_old_host_is_back(
        api: APIClient, admin_api: APIClient, dead_hv1: Instance, outbox: Outbox) -> None:
    """The host that comes back lists two stale domains: one of a server evacuated then deleted on its
    new host (destroy_evacuated, not a terminate as well), one of a server deleted while it was down
    (the terminate of a deleted server's domain)."""
    evacuated = dead_hv1
    migration = evacuate(admin_api, evacuated).json()["id"]
    assert report(migration, "hv2", contract.MIGRATION_REBUILT, values={"power_state": "running"})
    assert api.delete(f"/api/v1/servers/{evacuated.uuid}/").status_code == 202  # hv2 is up: it destroys it
    conductor.instance_destroyed(instance_uuid=str(evacuated.uuid), host="hv2")
    gone = Instance.objects.create(name="gone", project=evacuated.project, flavor=evacuated.flavor, vcpus=1,
                                   memory_mb=64, root_gb=1, host=Host.objects.get(name="hv1"),
                                   vm_state="deleted", task_state=None)
    outbox.compute.clear()
    tasks.host_init("hv1", {**_resources(), "instances": {str(evacuated.uuid): "shutdown",
                                                          str(gone.uuid): "running"}})
    assert sorted((n, kw["instance_uuid"]) for _, n, kw in outbox.compute) == sorted([
        (contract.COMPUTE_DESTROY_EVACUATED, str(evacuated.uuid)),
        (contract.COMPUTE_TERMINATE, str(gone.uuid))])
    assert {h for h, _, _ in outbox.compute} == {"hv1"}
    assert Allocation.objects.filter(instance=evacuated).count() == 0
    assert quota_usage.placement_drift() == []


def test_hosts_are_forced_down_fenced_and_evacuated_from_the_admin(
        settings: Any, tmp_path: Path, silent_hv1: Instance, admin: Any) -> None:
    from django.test import Client
    from django.urls import reverse

    staff = Client()
    staff.force_login(admin)
    url = reverse("admin:compute_host_changelist")
    hv1 = Host.objects.get(name="hv1")
    settings.HOST_FENCE_COMMAND = script(tmp_path, "ok", "exit 0")
    staff.post(url, {"action": "fence_hosts", "_selected_action": [hv1.pk]})
    hv1.refresh_from_db()
    assert hv1.forced_down and hv1.forced_down_reason == evacuation.FENCED_REASON
    page = staff.post(url, {"action": "evacuate_hosts", "_selected_action": [hv1.pk]}, follow=True)
    assert "accepted" in page.content.decode()
    assert Migration.objects.get(instance=silent_hv1).migration_type == "evacuation"
    staff.post(url, {"action": "clear_forced_down", "_selected_action": [hv1.pk]})
    hv1.refresh_from_db()
    assert not hv1.forced_down and hv1.fence_message == ""
    staff.post(url, {"action": "force_down_hosts", "_selected_action": [hv1.pk]})
    hv1.refresh_from_db()
    assert hv1.forced_down and "from the admin" in hv1.forced_down_reason
    assert staff.get(url).status_code == 200


def test_the_destination_is_claimed_so_a_full_host_takes_no_more(
        api: APIClient, admin_api: APIClient, outbox: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    """hv2 has room for one 128 MiB server (150 MiB x RAM ratio 1.5): the first evacuation claims it, the
    second is refused by the scheduler's RAM filter, not placed on top."""
    web = active_server(api, outbox, name="web")
    db = active_server(api, outbox, name="db")
    heartbeat("hv1", storage_id=SHARED)
    heartbeat("hv2", storage_id=SHARED, memory_mb=150)
    die("hv1")
    force_down(admin_api, "hv1")
    assert evacuate(admin_api, web).status_code == 202
    full = evacuate(admin_api, db)
    assert full.status_code == 409 and "RamFilter" in full.json()["detail"], full.json()
    assert allocations(web) == [("hv1", True), ("hv2", False)]
    assert allocations(db) == [("hv1", False)]
    assert Host.objects.get(name="hv2").allocations.count() == 1
