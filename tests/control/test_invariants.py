"""testbed.invariants: what the kill -9 tests and the chaos bench check after a fault. Each breach is
made on purpose here and must be reported, and a sound cloud reports none."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from cloudctl.compute.models import Allocation, Host, Instance, InstanceAction
from testbed.invariants import check
from tests.control.conftest import active_server, heartbeat

pytestmark = pytest.mark.django_db


@pytest.fixture
def server(api: Any, outbox: Any, image: Any, flavors: Any) -> Instance:
    """An ACTIVE server on hv1, its create action finished; hv2 is an empty host."""
    heartbeat("hv2")
    return active_server(api, outbox)


def running(server: Instance) -> dict[str, dict[str, str]]:
    return {"hv1": {str(server.uuid): "running"}, "hv2": {}}


def test_a_sound_cloud_has_no_breach(server):
    report = check(running(server))
    assert report.ok, report.describe()
    assert report.counts() == dict.fromkeys(report.counts(), 0)
    assert report.in_flight == 0


def test_the_heartbeats_stand_in_for_the_hypervisors(server):
    Host.objects.filter(name="hv1").update(reported_instances={str(server.uuid): "running"})
    assert check().ok
    Host.objects.filter(name="hv1").update(reported_instances={})
    assert len(check().missing_domains) == 1


def test_a_claim_where_the_server_is_not_is_leaked_and_two_are_doubled(server):
    hv2 = Host.objects.get(name="hv2")
    Allocation.objects.create(instance=server, host=hv2, vcpus=1, memory_mb=64, disk_gb=1)
    report = check(running(server))
    assert [len(report.leaked), len(report.doubled)] == [1, 1]
    assert "hv2: claim of" in report.leaked[0] and "which is not there" in report.leaked[0]


def test_a_deleted_servers_claim_is_leaked_and_its_domain_an_orphan(server):
    Instance.objects.filter(uuid=server.uuid).update(vm_state="deleted")
    report = check(running(server))
    assert len(report.leaked) == 1 and "deleted server" in report.leaked[0]
    assert len(report.orphan_domains) == 1


def test_a_server_on_a_host_without_its_claim_is_unclaimed(server):
    Allocation.objects.filter(instance=server).delete()
    assert len(check(running(server)).unclaimed) == 1
    # A build that failed or timed out frees its claim and keeps the host it failed on.
    Instance.objects.filter(uuid=server.uuid).update(vm_state="error")
    assert check(running(server)).ok


def test_orphan_and_missing_domains(server):
    stranger = "0b5a3f3e-8d1e-4b8e-9b7a-1c2d3e4f5a6b"
    report = check({"hv1": {}, "hv2": {stranger: "running", str(server.uuid): "running"}})
    assert len(report.missing_domains) == 1 and "hv1 runs no domain" in report.missing_domains[0]
    assert sorted(line.split(":")[0] for line in report.orphan_domains) == ["hv2", "hv2"]
    # A server in ERROR says what is wrong itself: its missing domain is no breach.
    Instance.objects.filter(uuid=server.uuid).update(vm_state="error")
    assert check({"hv1": {}}).ok


def test_a_task_past_its_deadline_is_stuck_within_it_in_flight(server, settings):
    settings.TASK_DEADLINES = {**settings.TASK_DEADLINES, "rebooting": 60}
    InstanceAction.objects.create(instance=server, action="reboot", request_id="r", project=server.project)
    Instance.objects.filter(uuid=server.uuid).update(task_state="rebooting",
                                                     task_state_since=timezone.now() - timedelta(seconds=50))
    report = check(running(server))
    assert (report.ok, report.in_flight) == (True, 1)
    assert not check(running(server), slack=0).stuck
    Instance.objects.filter(uuid=server.uuid).update(task_state_since=timezone.now() - timedelta(seconds=70))
    assert len(check(running(server)).stuck) == 1
    assert check(running(server), slack=15).ok  # within the reaper's period past the deadline


def test_an_action_without_a_result_on_an_idle_server_is_unfinished(server):
    InstanceAction.objects.create(instance=server, action="reboot", request_id="r", project=server.project)
    report = check(running(server))
    assert len(report.unfinished_actions) == 1 and "action reboot" in report.unfinished_actions[0]
