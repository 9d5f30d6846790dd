"""Placement, claims, and what the conductor does with compute workers' reports."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from cloudctl.compute import conductor, recovery
from cloudctl.compute.models import Allocation, Host, Instance, InstanceAction
from cloudctl.compute.placement import claim, request_spec_of
from cloudctl.compute.scheduling import schedule_instance
from cloudctl.compute.services import server_create
from cloudctl.compute.states import TaskState, VmState
from compute_workers import contract
from tests.control.conftest import heartbeat, run_concurrently

pytestmark = pytest.mark.django_db


@pytest.fixture
def new_server(member, project, flavors, image):
    def make(name: str = "s", flavor: str = "m1.nano") -> Instance:
        return server_create(user=member, project=project, name=name, flavor=flavors[flavor],
                             image=image)
    return make


def test_schedule_claims_and_sends_a_complete_spec(new_server, outbox, settings):
    heartbeat("small", memory_mb=1024)
    heartbeat("big", memory_mb=8192)
    server = new_server()
    assert schedule_instance(str(server.uuid)) == "big"  # RAM weigher spreads
    server.refresh_from_db()
    assert (server.vm_state, server.task_state, server.host.name, server.attempts) == (
        VmState.BUILDING, TaskState.SPAWNING, "big", 1)
    allocation = Allocation.objects.get(instance=server)
    assert (allocation.host.name, allocation.vcpus, allocation.memory_mb, allocation.disk_gb) == (
        "big", 1, 128, 1)
    [(host, task, kwargs)] = outbox.compute
    assert (host, task) == ("big", contract.COMPUTE_SPAWN)
    spec = contract.validate_spec(kwargs["spec"])
    assert spec["instance_uuid"] == str(server.uuid)
    assert spec["flavor"] == {"name": "m1.nano", "vcpus": 1, "memory_mb": 128, "root_gb": 1}
    assert spec["image"]["url"] == (f"{settings.CLOUDCTL_API_URL}/api/v1/images/"
                                    f"{server.image_id}/file")
    assert spec["image"]["sha256"] == server.image.sha256
    assert spec["request_id"].startswith("req-")


def test_no_valid_host_says_which_filter_and_why(new_server, outbox):
    heartbeat("hv1", memory_mb=4096)
    heartbeat("hv2", memory_mb=6144)
    Host.objects.filter(name="hv1").update(last_heartbeat=timezone.now() - timedelta(hours=1))
    server = new_server(flavor="m1.xlarge")
    assert schedule_instance(str(server.uuid)) is None
    server.refresh_from_db()
    assert server.vm_state == VmState.ERROR and server.task_state is None
    assert server.fault["message"] == (
        "No valid host was found: RamFilter left 0 of 1 host(s): 1 host(s) lack 16384 MiB RAM "
        "free; the most free is 9216 MiB on hv2.")
    steps = {s["name"]: (s["hosts_in"], s["hosts_out"]) for s in server.fault["details"]["filters"]}
    assert steps["ComputeFilter"] == (2, 1)
    assert steps["RamFilter"] == (1, 0)
    action = InstanceAction.objects.get(instance=server)
    assert action.result == "Error" and action.finish_time is not None
    assert not Allocation.objects.exists() and outbox.compute == []


def test_claim_never_overcommits(new_server):
    heartbeat("hv1", memory_mb=200, vcpus=1)  # 200 * 1.5 = 300 MiB usable: two m1.nano fit
    servers = [new_server(name=f"s{i}") for i in range(3)]
    results = [claim(str(s.uuid), "hv1", request_spec_of(s)) for s in servers]
    assert results == [True, True, False]
    assert Allocation.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_schedulers_never_overcommit(new_server, project, outbox, settings):
    settings.QUOTA_INSTANCES = settings.QUOTA_CORES = -1  # twelve servers: over the default quotas
    heartbeat("hv1", memory_mb=512, vcpus=1)  # 768 MiB usable: six m1.nano
    servers = [new_server(name=f"s{i}") for i in range(12)]
    placed = run_concurrently(lambda server: schedule_instance(str(server.uuid)), servers)
    assert placed.count("hv1") == 6 and placed.count(None) == 6
    assert Allocation.objects.count() == 6
    assert Instance.objects.filter(vm_state=VmState.ERROR).count() == 6


def _placed(new_server, outbox) -> Instance:
    heartbeat("hv1")
    heartbeat("hv2")
    server = new_server()
    schedule_instance(str(server.uuid))
    server.refresh_from_db()
    return server


def test_spawn_success_report(new_server, outbox):
    server = _placed(new_server, outbox)
    applied = conductor.instance_update(
        instance_uuid=str(server.uuid), host=server.host.name, expected_task_state="spawning",
        values={"vm_state": "active", "task_state": None, "power_state": "running"},
        event={"name": "compute_spawn", "result": "Success"})
    assert applied
    server.refresh_from_db()
    assert (server.status, server.power_state) == ("ACTIVE", "running")
    assert server.launched_at is not None
    action = InstanceAction.objects.get(instance=server)
    assert action.result == "Success"
    assert [e.event for e in action.events.all()] == ["schedule", "compute_spawn"]


def test_stale_reports_are_dropped(new_server, outbox, django_capture_on_commit_callbacks):
    server = _placed(new_server, outbox)
    other = "hv2" if server.host.name == "hv1" else "hv1"
    assert not conductor.instance_update(
        instance_uuid=str(server.uuid), host=other, expected_task_state="spawning",
        values={"vm_state": "active", "task_state": None})
    assert not conductor.instance_update(
        instance_uuid=str(server.uuid), host=server.host.name, expected_task_state="rebooting",
        values={"vm_state": "active", "task_state": None})
    server.refresh_from_db()
    assert server.vm_state == VmState.BUILDING
    # The report from the wrong host claimed a running domain there: that host is told to remove it.
    assert outbox.compute[-1] == (other, contract.COMPUTE_TERMINATE,
                                  {"instance_uuid": str(server.uuid)})


def test_build_failure_reschedules_then_errors(new_server, outbox, settings,
                                               django_capture_on_commit_callbacks):
    settings.SCHEDULER_MAX_ATTEMPTS = 2
    server = _placed(new_server, outbox)
    first = server.host.name
    fault = {"message": "libvirt: boom", "code": 500, "details": "Traceback ..."}
    with django_capture_on_commit_callbacks(execute=True):
        conductor.build_failed(instance_uuid=str(server.uuid), host=first, fault=fault,
                               reschedule=True)
    server.refresh_from_db()
    assert (server.task_state, server.host, server.retry_hosts) == ("scheduling", None, [first])
    assert outbox.scheduler[-1] == (contract.SCHEDULE_INSTANCE, {"instance_uuid": str(server.uuid)})
    assert not Allocation.objects.filter(instance=server).exists()

    second = schedule_instance(str(server.uuid))
    assert second != first  # RetryFilter
    conductor.build_failed(instance_uuid=str(server.uuid), host=second, fault=fault,
                           reschedule=True)
    server.refresh_from_db()
    assert server.vm_state == VmState.ERROR and server.task_state is None
    assert server.fault["message"] == (f"libvirt: boom (tried 2 of 2 allowed attempts, on "
                                       f"{first}, {second})")
    assert not Allocation.objects.filter(instance=server).exists()
    events = InstanceAction.objects.get(instance=server).events.values_list("event", "result")
    assert list(events) == [("schedule", "Success"), ("compute_spawn", "Error"),
                            ("schedule", "Success"), ("compute_spawn", "Error")]


def test_build_failure_without_reschedule_errors_at_once(new_server, outbox):
    server = _placed(new_server, outbox)
    conductor.build_failed(instance_uuid=str(server.uuid), host=server.host.name,
                           fault={"message": "image tiny checksum mismatch", "code": 400,
                                  "details": ""}, reschedule=False)
    server.refresh_from_db()
    assert server.status == "ERROR"
    assert server.fault == {"message": "image tiny checksum mismatch", "code": 400, "details": ""}


def test_destroyed_report_finishes_the_delete(new_server, outbox, member):
    from cloudctl.compute.services import server_delete

    server = _placed(new_server, outbox)
    assert server_delete(instance=server, user=member) is False
    conductor.instance_destroyed(instance_uuid=str(server.uuid), host=server.host.name)
    server.refresh_from_db()
    assert server.vm_state == VmState.DELETED and server.deleted_at is not None
    assert not Allocation.objects.exists()
    delete = InstanceAction.objects.get(instance=server, action="delete")
    assert delete.result == "Success"


def test_heartbeat_registers_and_reaps_deleted_domains(new_server, outbox):
    server = _placed(new_server, outbox)
    Instance.objects.filter(uuid=server.uuid).update(vm_state=VmState.DELETED, task_state=None)
    outbox.compute.clear()
    host = heartbeat("hv1", instances={str(server.uuid): "running"})
    assert host.is_up and host.vcpus == 4 and host.hypervisor_type == "QEMU"
    if server.host.name == "hv1":
        assert outbox.compute == [("hv1", contract.COMPUTE_TERMINATE,
                                   {"instance_uuid": str(server.uuid)})]


def test_reaper_errors_builds_past_their_deadline(new_server, outbox, settings):
    server = _placed(new_server, outbox)
    fresh = new_server(name="fresh")
    Instance.objects.filter(uuid=server.uuid).update(
        task_state_since=timezone.now() - timedelta(seconds=settings.INSTANCE_BUILD_TIMEOUT + 5))
    assert recovery.reap_expired_tasks() == 1
    server.refresh_from_db()
    assert server.status == "ERROR"
    assert server.fault["message"] == (
        f"build timed out: spawning did not finish within {settings.INSTANCE_BUILD_TIMEOUT} s "
        f"on host {server.host.name}")
    assert not Allocation.objects.filter(instance=server).exists()
    fresh.refresh_from_db()
    assert fresh.status == "BUILD"


def test_a_step_reported_at_start_and_end_is_one_event(new_server, outbox):
    server = _placed(new_server, outbox)
    report = dict(instance_uuid=str(server.uuid), host=server.host.name,
                  expected_task_state="spawning", values={})
    conductor.instance_update(**report, event={"name": "compute_prep_image", "result": "start",
                                               "message": "preparing image tiny"})
    conductor.instance_update(**report, event={"name": "compute_prep_image", "result": "success",
                                               "message": "image tiny downloaded"})
    action = InstanceAction.objects.get(instance=server)
    [step] = action.events.filter(event="compute_prep_image")
    assert (step.result, step.message, step.host) == ("Success", "image tiny downloaded",
                                                     server.host.name)
    assert step.finish_time >= step.start_time
    assert server.availability_zone == "nova"  # the placed host's zone, as Nova records it


def test_a_step_whose_end_is_applied_before_its_start_is_one_event(new_server, outbox):
    """The conductor's two processes may take a host's consecutive reports in either order (an image
    already cached: its start and end are sent a millisecond apart)."""
    server = _placed(new_server, outbox)
    report = dict(instance_uuid=str(server.uuid), host=server.host.name,
                  expected_task_state="spawning", values={})
    conductor.instance_update(**report, event={"name": "compute_prep_image", "result": "success",
                                               "message": "image tiny already cached"})
    conductor.instance_update(**report, event={"name": "compute_prep_image", "result": "start",
                                               "message": "preparing image tiny"})
    action = InstanceAction.objects.get(instance=server)
    [step] = action.events.filter(event="compute_prep_image")
    assert (step.result, step.message) == ("Success", "image tiny already cached")
    assert step.finish_time is not None
    # A step of the same name started again later, in order, is a step of its own.
    conductor.instance_update(**report, event={"name": "compute_prep_image", "result": "start",
                                               "message": "preparing image tiny again"})
    conductor.instance_update(**report, event={"name": "compute_prep_image", "result": "success",
                                               "message": "image tiny cached"})
    steps = list(action.events.filter(event="compute_prep_image").order_by("id"))
    assert [(e.result, e.message) for e in steps] == [("Success", "image tiny already cached"),
                                                      ("Success", "image tiny cached")]


@pytest.mark.django_db(transaction=True)
def test_concurrent_anti_affinity_members_never_share_a_host(member, project, flavors, image,
                                                             outbox):
    from cloudctl.compute.models import ServerGroup

    for name in ("hv1", "hv2", "hv3"):
        heartbeat(name)
    group = ServerGroup.objects.create(name="g", policy="anti-affinity", project=project)
    servers = [server_create(user=member, project=project, name=f"g{i}",
                             flavor=flavors["m1.nano"], image=image, server_group=group)
               for i in range(6)]
    placed = run_concurrently(lambda server: schedule_instance(str(server.uuid)), servers)
    hosts = [p for p in placed if p]
    assert sorted(hosts) == ["hv1", "hv2", "hv3"]
    assert Instance.objects.filter(vm_state=VmState.ERROR).count() == 3


def test_a_malformed_report_is_refused_at_the_boundary_and_changes_nothing(new_server, outbox):
    from cloudctl.compute import tasks

    server = _placed(new_server, outbox)
    report = {"instance_uuid": str(server.uuid), "host": server.host.name, "expected_task_state": "spawning"}
    with pytest.raises(contract.ReportError, match="vm_state 'running' is not one of"):
        tasks.instance_update(**report, values={"vm_state": "running", "task_state": None})
    with pytest.raises(contract.ReportError, match="event result 'ok' is not one of"):
        tasks.instance_update(**report, values={"vm_state": "active", "task_state": None},
                              event={"name": "compute_spawn", "result": "ok"})
    server.refresh_from_db()
    assert (server.vm_state, server.task_state) == (VmState.BUILDING, TaskState.SPAWNING)
    # The same report, well formed, goes through the task and is applied.
    assert tasks.instance_update(**report, values={"vm_state": "active", "task_state": None,
                                                   "power_state": "running"},
                                 event={"name": "compute_spawn", "result": "success"})
    server.refresh_from_db()
    assert server.status == "ACTIVE"
    assert InstanceAction.objects.get(instance=server).result == contract.ActionResult.SUCCESS
