"""Lifecycle actions on the control plane: allowed pairs, 202/409, compute tasks, truthful endings."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from cloudctl.compute import conductor, recovery, sync
from cloudctl.compute.host_ids import host_id
from cloudctl.compute.models import Host, Instance, InstanceAction
from cloudctl.compute.scheduling import schedule_instance
from cloudctl.compute.states import TaskState, VmState
from compute_workers import contract
from tests.control.conftest import active_server, heartbeat

pytestmark = pytest.mark.django_db


@pytest.fixture
def server(api, flavors, image, outbox) -> Instance:
    return active_server(api, outbox)


def act(api, server: Instance, action: str, **body: Any):
    return api.post(f"/api/v1/servers/{server.uuid}/{action}/", body, format="json")


def set_state(server: Instance, vm_state: str, task_state: str | None = None,
              power_state: str = "running") -> None:
    Instance.objects.filter(uuid=server.uuid).update(vm_state=vm_state, task_state=task_state,
                                                     power_state=power_state)


@pytest.mark.parametrize(("action", "body", "start", "task_state", "task_name", "extra"), [
    ("reboot", {"type": "SOFT"}, "active", "rebooting", contract.COMPUTE_REBOOT,
     {"reboot_type": "SOFT"}),
    ("reboot", {}, "active", "rebooting", contract.COMPUTE_REBOOT, {"reboot_type": "SOFT"}),
    ("reboot", {"type": "HARD"}, "stopped", "rebooting_hard", contract.COMPUTE_REBOOT,
     {"reboot_type": "HARD"}),
    ("stop", {}, "active", "powering_off", contract.COMPUTE_POWER_OFF, {"timeout": 60}),
    ("start", {}, "stopped", "powering_on", contract.COMPUTE_POWER_ON, {}),
    ("pause", {}, "active", "pausing", contract.COMPUTE_PAUSE, {}),
    ("unpause", {}, "paused", "unpausing", contract.COMPUTE_UNPAUSE, {}),
    ("suspend", {}, "active", "suspending", contract.COMPUTE_SUSPEND, {}),
    ("resume", {}, "suspended", "resuming", contract.COMPUTE_RESUME, {}),
])
def test_each_action_answers_202_with_its_record_and_sends_its_task(
        api, server, outbox, django_capture_on_commit_callbacks, action, body, start, task_state,
        task_name, extra):
    set_state(server, start)
    with django_capture_on_commit_callbacks(execute=True):
        response = act(api, server, action, **body)
    assert response.status_code == 202, response.content
    record = response.json()
    assert record["action"] == action and record["result"] == "" and record["finish_time"] is None
    assert record["request_id"].startswith("req-") and record["user"] == "alice"
    server.refresh_from_db()
    assert server.task_state == task_state
    [(host, name, kwargs)] = outbox.compute
    assert (host, name) == ("hv1", task_name)
    assert kwargs["instance_uuid"] == str(server.uuid) and kwargs["action_id"] == record["id"]
    for key, value in extra.items():
        assert kwargs[key] == value
    if action in ("reboot", "start"):
        assert contract.validate_spec(kwargs["spec"])["instance_uuid"] == str(server.uuid)


@pytest.mark.parametrize(("action", "body", "vm_state", "task_state"), [
    ("reboot", {"type": "SOFT"}, "stopped", None),
    ("reboot", {"type": "SOFT"}, "active", "rebooting"),
    ("reboot", {"type": "HARD"}, "active", "powering_off"),
    ("reboot", {"type": "HARD"}, "building", "spawning"),
    ("stop", {}, "stopped", None),
    ("stop", {}, "active", "rebooting"),
    ("start", {}, "active", None),
    ("pause", {}, "paused", None),
    ("pause", {}, "stopped", None),
    ("unpause", {}, "active", None),
    ("suspend", {}, "suspended", None),
    ("resume", {}, "active", None),
    ("resume", {}, "suspended", "rebooting_hard"),
])
def test_disallowed_pairs_are_409_with_the_state(api, server, outbox, action, body, vm_state,
                                                 task_state):
    set_state(server, vm_state, task_state)
    response = act(api, server, action, **body)
    assert response.status_code == 409, response.content
    answer = response.json()
    assert (answer["vm_state"], answer["task_state"]) == (vm_state, task_state)
    assert f"cannot {action}" in answer["detail"]
    assert outbox.compute == [] and not InstanceAction.objects.filter(action=action).exists()


@pytest.mark.parametrize("stuck", ["rebooting", "rebooting_hard", "pausing", "unpausing",
                                   "suspending", "resuming"])
def test_hard_reboot_is_the_escape_hatch(api, server, stuck):
    set_state(server, "active", stuck)
    assert act(api, server, "reboot", type="HARD").status_code == 202


def test_bad_reboot_type_is_400(api, server):
    response = act(api, server, "reboot", type="GENTLE")
    assert response.status_code == 400 and "type" in response.json()


def test_actions_on_a_server_whose_host_is_down_are_409(api, server, outbox):
    Host.objects.filter(name="hv1").update(last_heartbeat=timezone.now() - timedelta(hours=1))
    shown = api.get(f"/api/v1/servers/{server.uuid}/").json()
    assert shown["host_status"] == "DOWN"
    response = act(api, server, "stop")
    assert response.status_code == 409
    assert f"its host {host_id(server.project_id, 'hv1')} is down" in response.json()["detail"]
    assert response.json()["code"] == "host_unavailable"
    # Delete still works: a local delete, the domain is reaped when the host returns.
    assert api.delete(f"/api/v1/servers/{server.uuid}/").status_code == 204
    server.refresh_from_db()
    assert server.vm_state == VmState.DELETED
    delete = InstanceAction.objects.get(instance=server, action="delete")
    assert [e.event for e in delete.events.all()] == ["local_delete"]
    heartbeat("hv1", instances={str(server.uuid): "running"})
    assert outbox.compute[-1] == ("hv1", contract.COMPUTE_TERMINATE,
                                  {"instance_uuid": str(server.uuid)})


def test_host_status_values(api, server):
    assert api.get(f"/api/v1/servers/{server.uuid}/").json()["host_status"] == "UP"
    Host.objects.filter(name="hv1").update(enabled=False)
    assert api.get(f"/api/v1/servers/{server.uuid}/").json()["host_status"] == "MAINTENANCE"


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_actions_give_one_202_and_one_409(member, project, flavors, image,
                                                         outbox):
    from rest_framework.test import APIClient

    from tests.control.conftest import client_for

    heartbeat("hv1")
    first = client_for(member)
    body = first.post("/api/v1/servers/", {"name": "s", "flavor": "m1.nano", "image": "tiny"},
                      format="json").json()
    schedule_instance(body["id"])
    Instance.objects.filter(uuid=body["id"]).update(vm_state="active", task_state=None)
    clients: list[APIClient] = [first, client_for(member)]
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def run(client: APIClient, action: str) -> None:
        barrier.wait()
        try:
            codes.append(client.post(f"/api/v1/servers/{body['id']}/{action}/", {},
                                     format="json").status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(c, a))
               for c, a in zip(clients, ["stop", "reboot"], strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(codes) == [202, 409]
    assert InstanceAction.objects.filter(instance_id=body["id"]).exclude(
        action="create").count() == 1


def test_reports_finish_the_action_with_events(api, admin_api, server):
    action_id = act(api, server, "reboot", type="SOFT").json()["id"]
    report = dict(instance_uuid=str(server.uuid), host="hv1", expected_task_state="rebooting",
                  action_id=action_id)
    conductor.instance_update(**report, values={}, event={
        "name": "compute_reboot_instance", "result": "start", "message": "soft reboot"})
    conductor.instance_update(**report, values={}, event={
        "name": "fallback_to_hard_reboot", "result": "success",
        "message": "guest did not shut down within 60 s; hard rebooting"})
    conductor.instance_update(**report, values={"vm_state": "active", "task_state": None,
                                                "power_state": "running"},
                              event={"name": "compute_reboot_instance", "result": "success",
                                     "message": "rebooted in 61.2 s"})
    server.refresh_from_db()
    assert server.status == "ACTIVE"
    [reboot, create] = api.get(f"/api/v1/servers/{server.uuid}/actions/").json()
    assert (reboot["action"], reboot["result"], reboot["user"]) == ("reboot", "Success", "alice")
    assert reboot["finish_time"] is not None
    assert [(e["event"], e["result"]) for e in reboot["events"]] == [
        ("compute_reboot_instance", "Success"), ("fallback_to_hard_reboot", "Success")]
    assert create["action"] == "create"


def test_a_failed_action_says_why_and_shows_the_traceback_to_admins(api, admin_api, server):
    action_id = act(api, server, "stop").json()["id"]
    fault = {"message": "libvirt refused to stop the domain: permission denied", "code": 500,
             "details": "Traceback (most recent call last): ..."}
    conductor.instance_update(instance_uuid=str(server.uuid), host="hv1",
                              expected_task_state="powering_off", action_id=action_id,
                              values={"vm_state": "active", "task_state": None,
                                      "power_state": "running"},
                              event={"name": "compute_stop_instance", "result": "error",
                                     "message": fault["message"]}, fault=fault)
    shown = api.get(f"/api/v1/servers/{server.uuid}/").json()
    assert shown["status"] == "ACTIVE" and shown["fault"] is None  # truthful: it still runs
    [stop, _] = api.get(f"/api/v1/servers/{server.uuid}/actions/").json()
    assert stop["result"] == "Error" and stop["message"] == fault["message"]
    assert stop["events"][0]["traceback"] == ""
    [stop_admin, _] = admin_api.get(f"/api/v1/servers/{server.uuid}/actions/").json()
    assert stop_admin["events"][0]["traceback"] == fault["details"]


def later() -> float:
    return (timezone.now() + timedelta(seconds=1)).timestamp()


def test_a_guest_that_powers_itself_off_becomes_shutoff(api, server):
    assert sync.power_state_update(host="hv1", instance_uuid=str(server.uuid),
                                   power_state="shutdown", observed_at=later())
    shown = api.get(f"/api/v1/servers/{server.uuid}/").json()
    assert (shown["status"], shown["power_state"]) == ("SHUTOFF", "shutdown")
    [sync_action, _] = api.get(f"/api/v1/servers/{server.uuid}/actions/").json()
    assert sync_action["action"] == "sync_power_state" and sync_action["user"] is None
    assert "reports the domain shutdown while the server was active" in sync_action["message"]


def test_stale_or_busy_observations_are_ignored(api, server):
    old = (timezone.now() - timedelta(seconds=30)).timestamp()
    assert not sync.power_state_update(host="hv1", instance_uuid=str(server.uuid),
                                       power_state="shutdown", observed_at=old)
    set_state(server, "active", "rebooting")
    assert not sync.power_state_update(host="hv1", instance_uuid=str(server.uuid),
                                       power_state="shutdown", observed_at=later())
    server.refresh_from_db()
    assert (server.vm_state, server.power_state) == ("active", "running")


def test_a_stopped_server_whose_domain_runs_is_stopped_again(api, server, outbox,
                                                             django_capture_on_commit_callbacks):
    set_state(server, "stopped", None, "shutdown")
    with django_capture_on_commit_callbacks(execute=True):
        sync.power_state_update(host="hv1", instance_uuid=str(server.uuid),
                                power_state="running", observed_at=later())
    server.refresh_from_db()
    assert server.task_state == "powering_off"
    [(host, name, kwargs)] = outbox.compute
    assert (host, name, kwargs["instance_uuid"]) == ("hv1", contract.COMPUTE_POWER_OFF,
                                                     str(server.uuid))


def test_periodic_sync_finds_a_vanished_domain(api, server):
    host = Host.objects.get(name="hv1")
    Instance.objects.filter(uuid=server.uuid).update(updated=timezone.now() - timedelta(minutes=1))
    assert sync.sync_host(host, {}, timezone.now()) == 1
    shown = api.get(f"/api/v1/servers/{server.uuid}/").json()
    assert shown["status"] == "ERROR"
    assert shown["fault"]["message"] == ("the domain of this server no longer exists on host "
                                         f"{host_id(server.project_id, 'hv1')}")


def test_worker_restart_table(api, server, member, project, flavors, image, outbox,
                              django_capture_on_commit_callbacks):
    from cloudctl.compute.services import server_create

    def placed(name: str, task_state: str | None, vm_state: str = "active") -> Instance:
        other = server_create(user=member, project=project, name=name, flavor=flavors["m1.nano"],
                              image=image)
        schedule_instance(str(other.uuid))
        Instance.objects.filter(uuid=other.uuid).update(vm_state=vm_state, task_state=task_state)
        return other

    building = placed("b", "spawning", "building")
    deleting = placed("d", "deleting")
    rebooting = placed("r", "rebooting")
    pausing = placed("p", "pausing")
    outbox.compute.clear()
    # The building server's domain is not there (the spawn died before it started): spawned again.
    # One whose domain runs finished its spawn: test_build_from_heartbeat's restart tests.
    reported = {str(s.uuid): "running" for s in (server, deleting, rebooting, pausing)}
    with django_capture_on_commit_callbacks(execute=True):
        recovery.host_init(host="hv1", reported=reported)
    states = {s.name: (s.vm_state, s.task_state)
              for s in Instance.objects.filter(uuid__in=[*reported, building.uuid])}
    assert states["b"] == ("building", "spawning")
    assert states["d"] == ("active", "deleting")
    assert states["r"] == ("active", "rebooting_hard")
    assert states["p"] == ("active", None)
    assert states["s"] == ("active", None)
    sent = {(name, kwargs.get("instance_uuid") or kwargs["spec"]["instance_uuid"])
            for _, name, kwargs in outbox.compute}
    assert sent == {(contract.COMPUTE_TERMINATE, str(deleting.uuid)),
                    (contract.COMPUTE_REBOOT, str(rebooting.uuid)),
                    (contract.COMPUTE_SPAWN, str(building.uuid))}
    [reboot_task] = outbox.compute_tasks(contract.COMPUTE_REBOOT)
    assert reboot_task["reboot_type"] == "HARD"


def test_reaper_ends_an_expired_task_truthfully(api, server):
    act(api, server, "reboot", type="SOFT")
    Instance.objects.filter(uuid=server.uuid).update(
        task_state_since=timezone.now() - timedelta(seconds=301))
    heartbeat("hv1", instances={str(server.uuid): "running"})
    assert recovery.reap_expired_tasks() == 1
    shown = api.get(f"/api/v1/servers/{server.uuid}/").json()
    assert (shown["status"], shown["task_state"]) == ("ACTIVE", None)
    [reboot, _] = api.get(f"/api/v1/servers/{server.uuid}/actions/").json()
    assert reboot["result"] == "Error"
    assert reboot["message"] == (f"rebooting did not finish within 300 s on host "
                                 f"{host_id(server.project_id, 'hv1')}; the host "
                                 "last reported the domain running, so the server is active")
    assert reboot["events"][-1]["event"] == "task_deadline_exceeded"


def test_reaper_with_the_host_down_ends_in_error(api, server):
    act(api, server, "stop")
    Instance.objects.filter(uuid=server.uuid).update(
        task_state_since=timezone.now() - timedelta(seconds=181))
    Host.objects.filter(name="hv1").update(last_heartbeat=timezone.now() - timedelta(hours=1))
    assert recovery.reap_expired_tasks() == 1
    server.refresh_from_db()
    assert server.vm_state == VmState.ERROR and server.task_state is None
    assert server.fault["message"] == ("powering_off did not finish within 180 s on host hv1 and "
                                       "the host is down")
    assert TaskState.POWERING_OFF not in Instance.objects.values_list("task_state", flat=True)


def test_a_report_about_a_finished_action_is_dropped(api, server):
    first = act(api, server, "stop").json()["id"]
    done = dict(instance_uuid=str(server.uuid), host="hv1", expected_task_state="powering_off",
                values={"vm_state": "stopped", "task_state": None, "power_state": "shutdown"})
    assert conductor.instance_update(**done, action_id=first)
    act(api, server, "start")
    Instance.objects.filter(uuid=server.uuid).update(vm_state="active", task_state=None)
    act(api, server, "stop")
    # A late redelivery of the first stop's report must not end the second stop.
    assert not conductor.instance_update(**done, action_id=first)
    server.refresh_from_db()
    assert server.task_state == "powering_off"


def test_reaper_falls_back_to_the_last_known_state(api, server, settings):
    settings.TASK_DEADLINES = {**settings.TASK_DEADLINES, "pausing": 5}
    act(api, server, "pause")
    now = timezone.now()
    Instance.objects.filter(uuid=server.uuid).update(task_state_since=now - timedelta(seconds=10))
    # The host is up, but its last heartbeat predates the task and the domain (a wedged worker).
    Host.objects.filter(name="hv1").update(last_heartbeat=now - timedelta(seconds=20),
                                           reported_at=now - timedelta(seconds=20), reported_instances={})
    assert recovery.reap_expired_tasks() == 1
    server.refresh_from_db()
    assert (server.vm_state, server.task_state) == ("active", None)
    pause = InstanceAction.objects.get(instance=server, action="pause")
    assert pause.message == ("pausing did not finish within 5 s on host hv1; the domain was last "
                             "known running, so the server is active")


def test_reaper_does_not_trust_a_report_read_before_the_task_started(api, server, settings):
    """The host's last list was read while the spawn still had the domain paused at its start, and
    its worker wedged right after reporting the server ACTIVE: the stale 'paused' must not win over
    the server's own, later state (an e2e run caught this)."""
    settings.TASK_DEADLINES = {**settings.TASK_DEADLINES, "pausing": 5}
    act(api, server, "pause")
    now = timezone.now()
    Instance.objects.filter(uuid=server.uuid).update(task_state_since=now - timedelta(seconds=10))
    Host.objects.filter(name="hv1").update(reported_at=now - timedelta(seconds=12),
                                           reported_instances={str(server.uuid): "paused"})
    assert recovery.reap_expired_tasks() == 1
    server.refresh_from_db()
    assert (server.vm_state, server.power_state, server.task_state) == ("active", "running", None)
    pause = InstanceAction.objects.get(instance=server, action="pause")
    assert pause.message == ("pausing did not finish within 5 s on host hv1; the domain was last "
                             "known running, so the server is active")


def test_snapshot_makes_a_queued_private_image_and_asks_the_host(
        api, server, outbox, django_capture_on_commit_callbacks, settings):
    from cloudctl.images.models import Image

    with django_capture_on_commit_callbacks(execute=True):
        response = act(api, server, "snapshot", name="before-upgrade")
    assert response.status_code == 202, response.content
    record = response.json()
    image = Image.objects.get(pk=record["image_id"])
    assert (image.name, image.status, image.visibility, image.owner.name) == (
        "before-upgrade", "queued", "private", "blue")
    assert image.properties["instance_uuid"] == str(server.uuid)
    assert image.properties["base_image"] == str(server.image_id)
    assert image.min_disk == server.root_gb
    server.refresh_from_db()
    assert server.task_state == "image_snapshot"
    [(host, name, kwargs)] = outbox.compute
    assert (host, name) == ("hv1", contract.COMPUTE_SNAPSHOT)
    assert kwargs == {"instance_uuid": str(server.uuid), "action_id": record["id"],
                      "image_id": str(image.id), "image_name": "before-upgrade",
                      "upload_url": f"{settings.CLOUDCTL_API_URL}/api/v1/images/{image.id}/file"}
    assert act(api, server, "snapshot", name="again").status_code == 409
    assert act(api, server, "snapshot", name="").status_code == 400


def test_snapshot_progress_success_and_failure(api, server, small_qcow2):
    from cloudctl.images.models import Image
    from cloudctl.images.services import image_upload

    record = act(api, server, "snapshot", name="snap").json()
    report = dict(instance_uuid=str(server.uuid), host="hv1", action_id=record["id"])
    conductor.instance_update(**report, expected_task_state="image_snapshot", values={},
                              event={"name": "compute_snapshot_instance", "result": "start"})
    conductor.instance_update(**report, expected_task_state="image_snapshot", values={},
                              event={"name": "compute_snapshot_instance", "result": "progress",
                                     "message": "copied 12.0 of 33.0 MiB"})
    [snap, _] = api.get(f"/api/v1/servers/{server.uuid}/actions/").json()
    assert snap["events"][0]["message"] == "copied 12.0 of 33.0 MiB"
    assert snap["events"][0]["finish_time"] is None
    conductor.instance_update(**report, expected_task_state="image_snapshot",
                              values={"task_state": "image_uploading"},
                              event={"name": "compute_snapshot_instance", "result": "success",
                                     "message": "copied 33.0 MiB in 1.2 s"})
    assert api.get(f"/api/v1/servers/{server.uuid}/").json()["task_state"] == "image_uploading"
    with open(small_qcow2, "rb") as handle:
        image_upload(image=Image.objects.get(pk=record["image_id"]), stream=handle,
                     expected_size=small_qcow2.stat().st_size)
    conductor.instance_update(**report, expected_task_state="image_uploading",
                              values={"task_state": None, "vm_state": "active",
                                      "power_state": "running"})
    [snap, _] = api.get(f"/api/v1/servers/{server.uuid}/actions/").json()
    assert snap["result"] == "Success"
    assert api.get(f"/api/v1/images/{record['image_id']}/").json()["status"] == "active"

    failed = act(api, server, "snapshot", name="doomed").json()
    conductor.instance_update(instance_uuid=str(server.uuid), host="hv1", action_id=failed["id"],
                              expected_task_state="image_snapshot",
                              values={"task_state": None, "vm_state": "active",
                                      "power_state": "running"},
                              event={"name": "compute_snapshot_instance", "result": "error",
                                     "message": "block copy failed: no space left on device"},
                              fault={"message": "block copy failed: no space left on device",
                                     "code": 500, "details": "Traceback ..."})
    shown = api.get(f"/api/v1/servers/{server.uuid}/").json()
    assert (shown["status"], shown["fault"]) == ("ACTIVE", None)
    doomed = Image.objects.get(pk=failed["image_id"])
    assert doomed.status == "killed"
    assert doomed.properties["failure"] == "block copy failed: no space left on device"


def test_a_cleanly_stopped_worker_makes_its_host_down_at_once(api, server):
    conductor.host_stopping(host="hv1")
    assert api.get(f"/api/v1/servers/{server.uuid}/").json()["host_status"] == "DOWN"
    assert act(api, server, "reboot").status_code == 409
    # The last heartbeat the worker sent before stopping, handled after the stop, does not revive it.
    heartbeat("hv1", vcpus=6)
    assert api.get(f"/api/v1/servers/{server.uuid}/").json()["host_status"] == "DOWN"
    assert Host.objects.get(name="hv1").vcpus == 6  # its resources are recorded all the same
    heartbeat("hv1", starting=True)  # the worker's next start (conductor.host_init)
    assert api.get(f"/api/v1/servers/{server.uuid}/").json()["host_status"] == "UP"
    heartbeat("hv1")
    assert api.get(f"/api/v1/servers/{server.uuid}/").json()["host_status"] == "UP"
