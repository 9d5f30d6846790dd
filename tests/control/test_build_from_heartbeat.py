"""A spawn report lost on the way (broker down): the host's heartbeat says what is true, and after
BUILD_REPORT_GRACE the conductor completes the build as the report would have (sync.complete_builds).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from cloudctl.compute import conductor, recovery, tasks
from cloudctl.compute.models import Allocation, Instance, InstanceAction
from cloudctl.compute.recovery import BUILD_COMPLETED_AT_RESTART
from cloudctl.compute.scheduling import schedule_instance
from cloudctl.compute.services import server_create
from cloudctl.compute.states import TaskState, VmState
from cloudctl.compute.sync import BUILD_COMPLETED_FROM_HEARTBEAT, DELETE_COMPLETED_FROM_HEARTBEAT
from compute_workers import contract
from tests.control.conftest import heartbeat

pytestmark = pytest.mark.django_db


@pytest.fixture
def spawning(member, project, flavors, image, outbox) -> Instance:
    """A server placed on hv1 (the only host), spawning there, no report yet."""
    heartbeat("hv1")
    server = server_create(user=member, project=project, name="s", flavor=flavors["m1.nano"], image=image)
    schedule_instance(str(server.uuid))
    server.refresh_from_db()
    assert (server.host.name, server.task_state) == ("hv1", TaskState.SPAWNING)
    outbox.compute.clear()
    return server


def _beat(instances: dict[str, str], *, busy: list[str] | None = None,
          observed_at: float | None = None) -> None:
    """The heartbeat task of hv1, as the conductor runs it (called directly: no signature)."""
    resources: dict[str, Any] = {
        "libvirt_uri": "test:///default", "driver": "fake", "virt_type": "qemu", "hypervisor_type": "QEMU",
        "hypervisor_version": 7002000, "vcpus": 4, "memory_mb": 8192, "memory_mb_reserved": 0,
        "disk_gb": 100, "disk_gb_reserved": 0, "cpu_info": {"arch": "x86_64"}, "instances": instances,
        "observed_at": time.time() if observed_at is None else observed_at, "tunnel_ip": "",
        "busy": busy or []}
    tasks.host_heartbeat(host="hv1", resources=resources)


def _age(server: Instance, seconds: float) -> None:
    Instance.objects.filter(uuid=server.uuid).update(
        task_state_since=timezone.now() - timedelta(seconds=seconds))


def test_within_the_grace_the_build_waits_for_its_report(spawning, settings):
    settings.BUILD_REPORT_GRACE = 30
    _age(spawning, 20)
    _beat({str(spawning.uuid): contract.POWER_RUNNING})
    spawning.refresh_from_db()
    assert (spawning.status, spawning.task_state) == ("BUILD", TaskState.SPAWNING)


def test_after_the_grace_the_heartbeat_completes_the_build_and_the_late_report_is_harmless(
        spawning, settings, outbox):
    settings.BUILD_REPORT_GRACE = 30
    _age(spawning, 31)
    _beat({str(spawning.uuid): contract.POWER_RUNNING})
    spawning.refresh_from_db()
    assert (spawning.status, spawning.vm_state, spawning.task_state, spawning.power_state) == (
        "ACTIVE", VmState.ACTIVE, None, contract.POWER_RUNNING)
    assert spawning.launched_at is not None
    action = InstanceAction.objects.get(instance=spawning)
    assert action.finish_time is not None and action.result == "Success"
    spawn_events = list(action.events.filter(event="compute_spawn"))
    assert [(e.result, e.message, e.host) for e in spawn_events] == [
        ("Success", BUILD_COMPLETED_FROM_HEARTBEAT, "hv1")]

    # The real report, resent from the host's outbox later: dropped as stale, nothing changes, no
    # domain is removed (the server lives where the report says).
    updated = spawning.updated
    assert not tasks.instance_update(
        instance_uuid=str(spawning.uuid), host="hv1", expected_task_state="spawning",
        values={"vm_state": "active", "task_state": None, "power_state": "running"},
        event={"name": "compute_spawn", "result": "success", "message": "domain started"})
    spawning.refresh_from_db()
    assert (spawning.status, spawning.updated) == ("ACTIVE", updated)
    assert action.events.filter(event="compute_spawn").count() == 1
    assert outbox.compute == []
    # A second heartbeat changes nothing either.
    _beat({str(spawning.uuid): contract.POWER_RUNNING})
    spawning.refresh_from_db()
    assert spawning.updated == updated


@pytest.mark.parametrize("case", ["busy", "observed_before_the_build", "paused", "shutdown", "absent"])
def test_no_completion_without_the_hosts_word_that_the_spawn_is_done(spawning, settings, case):
    settings.BUILD_REPORT_GRACE = 30
    _age(spawning, 60)
    uuid = str(spawning.uuid)
    if case == "busy":  # the spawn still runs there (or fails and removes the domain)
        _beat({uuid: contract.POWER_RUNNING}, busy=[uuid])
    elif case == "observed_before_the_build":
        _beat({uuid: contract.POWER_RUNNING}, observed_at=time.time() - 120)
    elif case == "absent":
        _beat({})
    else:
        _beat({uuid: {"paused": contract.POWER_PAUSED, "shutdown": contract.POWER_SHUTDOWN}[case]})
    spawning.refresh_from_db()
    assert (spawning.status, spawning.task_state) == ("BUILD", TaskState.SPAWNING)


def test_a_build_that_failed_is_not_completed_by_the_old_hosts_heartbeat(spawning, settings, outbox):
    settings.BUILD_REPORT_GRACE = 0
    conductor.build_failed(instance_uuid=str(spawning.uuid), host="hv1",
                           fault={"message": "no", "code": 500, "details": ""}, reschedule=True)
    _age(spawning, 60)
    _beat({str(spawning.uuid): contract.POWER_RUNNING})
    spawning.refresh_from_db()
    assert (spawning.status, spawning.task_state, spawning.host) == ("BUILD", TaskState.SCHEDULING, None)


def test_a_malformed_busy_list_is_refused_at_the_boundary(spawning):
    with pytest.raises(contract.ReportError, match="busy must be a list"):
        _beat({}, busy="all")  # type: ignore[arg-type]


def test_a_worker_restarted_after_its_domain_started_completes_the_build(spawning, outbox):
    """kill -9 of the compute worker between the domain's start and the spawn report: host_init lists
    the domain running, so the build is completed by the report's code path (not ERROR), at once,
    whatever BUILD_REPORT_GRACE says, and the late report (from the outbox) is dropped."""
    recovery.host_init(host="hv1", reported={str(spawning.uuid): contract.POWER_RUNNING})
    spawning.refresh_from_db()
    assert (spawning.status, spawning.vm_state, spawning.task_state, spawning.power_state,
            spawning.fault) == (
        "ACTIVE", VmState.ACTIVE, None, contract.POWER_RUNNING, None)
    assert spawning.launched_at is not None
    action = InstanceAction.objects.get(instance=spawning)
    assert (action.finish_time is not None, action.result) == (True, "Success")
    assert [(e.result, e.message) for e in action.events.filter(event="compute_spawn")] == [
        ("Success", BUILD_COMPLETED_AT_RESTART)]
    assert not action.events.filter(event="init_instance").exists()
    assert not tasks.instance_update(
        instance_uuid=str(spawning.uuid), host="hv1", expected_task_state="spawning",
        values={"vm_state": "active", "task_state": None, "power_state": "running"})
    assert outbox.compute == []


@pytest.mark.parametrize("power_state", [None, contract.POWER_SHUTDOWN, contract.POWER_PAUSED])
def test_a_worker_restarted_without_a_running_domain_spawns_again(spawning, power_state, outbox):
    """The spawn was cut short or still waited in the host's queue: host_init sends it again (the
    worker's spawn is idempotent: it starts an existing domain) instead of failing the build, which
    then ran anyway for a server in ERROR (found by the kill -9 chaos test)."""
    reported = {} if power_state is None else {str(spawning.uuid): power_state}
    recovery.host_init(host="hv1", reported=reported)
    spawning.refresh_from_db()
    assert (spawning.vm_state, spawning.task_state, spawning.fault) == (VmState.BUILDING, TaskState.SPAWNING,
                                                                        None)
    [spec] = [kwargs["spec"] for _, name, kwargs in outbox.compute if name == contract.COMPUTE_SPAWN]
    assert (spec["instance_uuid"], spec["host"]) == (str(spawning.uuid), "hv1")
    action = InstanceAction.objects.get(instance=spawning)
    assert action.finish_time is None
    assert "spawning again" in action.events.get(event="init_instance").message


@pytest.fixture
def deleting(spawning, member) -> Instance:
    """The server ACTIVE on hv1, then deleted: deleting there, no instance_destroyed report yet."""
    from cloudctl.compute.services import server_delete

    conductor.instance_update(instance_uuid=str(spawning.uuid), host="hv1", expected_task_state="spawning",
                              values={"vm_state": "active", "task_state": None, "power_state": "running"})
    spawning.refresh_from_db()
    assert server_delete(instance=spawning, user=member) is False
    spawning.refresh_from_db()
    assert spawning.task_state == TaskState.DELETING
    return spawning


def test_a_delete_whose_domain_is_gone_is_finished_from_the_heartbeat(deleting, settings):
    """The instance_destroyed report was lost (a conductor killed while it handled it): after the grace,
    a heartbeat without the domain finishes the delete by the report's path, claim released."""
    settings.BUILD_REPORT_GRACE = 30
    _age(deleting, 31)
    _beat({})
    deleting.refresh_from_db()
    assert (deleting.vm_state, deleting.task_state) == (VmState.DELETED, None)
    assert not deleting.allocations.exists()
    action = InstanceAction.objects.get(instance=deleting, action="delete")
    assert action.result == "Success"
    assert [e.message for e in action.events.filter(event="compute_terminate_instance")] == [
        DELETE_COMPLETED_FROM_HEARTBEAT]
    # The late report is harmless.
    assert tasks.instance_destroyed(instance_uuid=str(deleting.uuid), host="hv1") is None
    assert action.events.filter(event="compute_terminate_instance").count() == 1


@pytest.mark.parametrize("case", ["within_grace", "listed", "busy", "observed_before_the_delete"])
def test_no_delete_finished_without_the_hosts_word_that_the_domain_is_gone(deleting, settings, case):
    settings.BUILD_REPORT_GRACE = 30
    uuid = str(deleting.uuid)
    _age(deleting, 20 if case == "within_grace" else 60)
    if case == "listed":
        _beat({uuid: contract.POWER_RUNNING})
    elif case == "busy":
        _beat({}, busy=[uuid])
    elif case == "observed_before_the_delete":
        _beat({}, observed_at=time.time() - 120)
    else:
        _beat({})
    deleting.refresh_from_db()
    assert deleting.task_state == TaskState.DELETING


# --- A build's message lost: sent once more (BUILD_RESEND_AFTER) -------------------------------------


def _resent(server: Instance, event: str) -> list[str]:
    return list(InstanceAction.objects.get(instance=server).events.filter(event=event)
                .values_list("message", flat=True))


def test_a_spawn_that_never_ran_is_sent_again_once(spawning, settings, outbox, send_on_commit):
    """A scheduler killed between its claim and the spawn's send: the host's heartbeats, read well
    after the placement, neither list the domain nor run anything for it."""
    settings.BUILD_RESEND_AFTER = 60
    _age(spawning, 61)
    _beat({})
    spawns = outbox.compute_tasks(contract.COMPUTE_SPAWN)
    assert [spec["spec"]["instance_uuid"] for spec in spawns] == [str(spawning.uuid)]
    assert [host for host, name, _ in outbox.compute if name == contract.COMPUTE_SPAWN] == ["hv1"]
    assert spawns[0]["spec"]["host"] == "hv1"
    [message] = _resent(spawning, "spawn_resent")
    assert "spawn sent again" in message
    _beat({})  # once per action, not at every heartbeat
    assert len(outbox.compute_tasks(contract.COMPUTE_SPAWN)) == 1
    spawning.refresh_from_db()
    assert (spawning.status, spawning.task_state) == ("BUILD", TaskState.SPAWNING)


@pytest.mark.parametrize("case", ["recent", "listed", "busy", "observed_before"])
def test_no_spawn_is_sent_again_without_the_hosts_word_that_none_ran(spawning, settings, outbox, case,
                                                                  send_on_commit):
    settings.BUILD_RESEND_AFTER = 60
    uuid = str(spawning.uuid)
    _age(spawning, 30 if case == "recent" else 90)
    if case == "listed":  # the domain is there (paused at its start, say): the spawn runs or ran
        _beat({uuid: contract.POWER_PAUSED})
    elif case == "busy":  # the spawn runs (a large image still downloading)
        _beat({}, busy=[uuid])
    elif case == "observed_before":  # the list was read before the build had been waiting that long
        _beat({}, observed_at=time.time() - 45)
    else:
        _beat({})
    assert outbox.compute_tasks(contract.COMPUTE_SPAWN) == []
    assert _resent(spawning, "spawn_resent") == []


def test_a_schedule_lost_with_its_scheduler_is_sent_again_once_and_places_the_server_once(
        member, project, flavors, image, outbox, settings, send_on_commit):
    heartbeat("hv1")
    settings.BUILD_RESEND_AFTER = 60
    server = server_create(user=member, project=project, name="s", flavor=flavors["m1.nano"], image=image)
    assert outbox.scheduler == [(contract.SCHEDULE_INSTANCE, {"instance_uuid": str(server.uuid)})]
    tasks.reap_expired_tasks()
    assert len(outbox.scheduler) == 1  # not yet: the scheduler may just be busy
    _age(server, 61)
    tasks.reap_expired_tasks()
    tasks.reap_expired_tasks()
    assert outbox.scheduler == [(contract.SCHEDULE_INSTANCE, {"instance_uuid": str(server.uuid)})] * 2
    assert "scheduling sent again" in _resent(server, "schedule_resent")[0]
    # Both copies run (the original was only late): the server is placed and its spawn sent once.
    assert schedule_instance(str(server.uuid)) == "hv1"
    assert schedule_instance(str(server.uuid)) is None
    assert len(outbox.compute_tasks(contract.COMPUTE_SPAWN)) == 1
    assert Allocation.objects.filter(instance_id=server.uuid).count() == 1
