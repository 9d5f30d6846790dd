"""Pre-flight checks off the request thread: a migration request answers 202 ``checking`` at once,
the scheduler's worker runs the checks (``scheduler.migration_preflight``) and starts the migration
or ends it ``refused``; abort while checking; the reaper of stuck checks; host evacuations throttled
to ``max_servers`` migrations at a time.

The hosts' answers are played by the test (the ``outbox`` captures casts, answers calls, and keeps
what was sent to the scheduler's queue; ``run_preflights`` runs it as the scheduler's worker would).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from cloudctl.compute import migration_reports, recovery
from cloudctl.compute.migration_preflight import migration_preflight
from cloudctl.compute.models import MIGRATION_IN_PROGRESS, Flavor, Instance, InstanceAction, Migration
from cloudctl.compute.models import MigrationStatus as S
from compute_workers import contract

from .conftest import Outbox, active_server, dest_answer, heartbeat, run_preflights, source_answer
from .test_migrations import allocations, live_migrate

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("send_on_commit")]


def preflights_sent(outbox: Outbox) -> list[int]:
    """The migrations whose pre-flight checks were sent to the scheduler's queue (and not run yet)."""
    return [kwargs["migration_id"] for name, kwargs in outbox.scheduler
            if name == contract.MIGRATION_PREFLIGHT]


def abort(admin_api: APIClient, migration: Migration | int) -> Any:
    pk = migration if isinstance(migration, int) else migration.pk
    server = Migration.objects.get(pk=pk).instance_id
    return admin_api.post(f"/api/v1/servers/{server}/migrations/{pk}/abort/")


def test_the_preflight_task_runs_on_the_scheduler_queue() -> None:
    """The entry point is the scheduler's thin task; nothing new on the conductor's queue."""
    from django.conf import settings

    from scheduler import tasks

    assert tasks.migration_preflight.name == contract.MIGRATION_PREFLIGHT
    assert contract.MIGRATION_PREFLIGHT.startswith("scheduler.")
    assert settings.CELERY_TASK_ROUTES["scheduler.*"] == {"queue": contract.SCHEDULER_QUEUE}


def test_a_call_from_the_preflight_task_may_wait_for_a_compute_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In a prefork worker Celery refuses result.get() inside a task unless told otherwise; the
    pre-flight task waits for a compute worker's queue (never its own), so rpc.call tells it."""
    from types import SimpleNamespace

    from celery import _state
    from celery.result import AsyncResult

    from cloudctl.compute import rpc

    seen: dict[str, Any] = {}

    def get(self: AsyncResult, **kwargs: Any) -> Any:
        seen.update(kwargs)
        if kwargs.get("disable_sync_subtasks", True):
            from celery.result import assert_will_not_block
            assert_will_not_block()
        return {"ok": True}

    monkeypatch.setattr(rpc.app, "send_task", lambda *args, **kwargs: SimpleNamespace(id="task-1"))
    monkeypatch.setattr(AsyncResult, "get", get)
    monkeypatch.setattr(AsyncResult, "forget", lambda self: None)
    monkeypatch.setattr(_state, "_task_join_will_block", True)  # as in the scheduler's prefork worker
    assert rpc.call("hv2", contract.COMPUTE_CHECK_MIGRATE_DESTINATION, timeout=1) == {"ok": True}
    assert seen["disable_sync_subtasks"] is False


def test_a_redelivered_preflight_task_does_nothing(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration_id = live_migrate(admin_api, server, host="hv2").json()["id"]
    assert migration_preflight(migration_id) == "preparing"
    sent = list(checks.compute)
    assert [task for _host, task, _kw in sent] == [contract.COMPUTE_PRE_LIVE_MIGRATION]
    assert migration_preflight(migration_id) == "", "the redelivery finds it no longer checking"
    assert checks.compute == sent and allocations(server) == [("hv1", 128, True), ("hv2", 128, False)]
    action = InstanceAction.objects.get(pk=Migration.objects.get(pk=migration_id).action_id)
    assert action.events.filter(event="preflight_checks").count() == 1
    assert migration_preflight(999999) == ""  # a migration that is gone


def test_abort_while_checking_cancels_at_once_and_the_checks_then_do_nothing(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration_id = live_migrate(admin_api, server).json()["id"]
    answer = abort(admin_api, migration_id)
    assert answer.status_code == 202 and answer.json()["status"] == "cancelled", answer.json()
    server.refresh_from_db()
    assert (server.status, server.vm_state, server.task_state) == ("ACTIVE", "active", None)
    action = InstanceAction.objects.get(pk=answer.json()["action_id"])
    assert action.result == "Error" and "aborted on request by root while checking" in action.message
    assert run_preflights(checks) == [""], "the task finds it cancelled"
    assert checks.compute == [] and allocations(server) == [("hv1", 128, False)]
    again = abort(admin_api, migration_id)
    assert again.status_code == 409 and again.json()["status"] == "cancelled"


def test_an_abort_during_the_checks_is_seen_by_their_last_transaction(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    """The abort lands while the hosts answer: the checks' final transaction re-reads the row under its
    lock, claims nothing and sends nothing."""
    server = active_server(api, checks)
    heartbeat("hv2")
    migration_id = live_migrate(admin_api, server, host="hv2").json()["id"]

    def source_answers_while_aborted(host: str, **kw: Any) -> dict[str, Any]:
        assert abort(admin_api, migration_id).status_code == 202
        return source_answer()(host, **kw)

    checks.calls[contract.COMPUTE_CHECK_MIGRATE_SOURCE] = source_answers_while_aborted
    assert run_preflights(checks) == [""]
    migration = Migration.objects.get(pk=migration_id)
    assert migration.status == "cancelled" and checks.compute == []
    assert allocations(server) == [("hv1", 128, False)], "nothing claimed"
    server.refresh_from_db()
    assert (server.status, server.task_state) == ("ACTIVE", None)


def test_a_cold_migration_being_checked_can_be_aborted_too(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration_id = admin_api.post(f"/api/v1/servers/{server.uuid}/migrate/", {}, format="json").json()["id"]
    server.refresh_from_db()
    assert (server.status, server.task_state) == ("RESIZE", "resize_prep")
    assert abort(admin_api, migration_id).json()["status"] == "cancelled"
    server.refresh_from_db()
    assert (server.status, server.task_state) == ("ACTIVE", None)
    assert run_preflights(checks) == [""]


def test_a_server_deleted_while_checking_ends_the_migration_without_touching_it(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration_id = live_migrate(admin_api, server, host="hv2").json()["id"]
    assert api.delete(f"/api/v1/servers/{server.uuid}/").status_code == 202
    assert run_preflights(checks) == ["error"]
    migration = Migration.objects.get(pk=migration_id)
    assert "left migrating" in migration.error and "deleting" in migration.error
    server.refresh_from_db()
    assert server.task_state == "deleting" and allocations(server) == [("hv1", 128, False)]


def test_the_reaper_ends_a_migration_whose_checks_never_ran(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any,
        settings: Any) -> None:
    """The scheduler's worker was down: after every candidate's two calls and a step's margin, the
    migration ends in error and the server is idle again, as it was."""
    settings.MIGRATION_PRECHECK_TIMEOUT, settings.MIGRATION_MAX_ATTEMPTS = 2.0, 3
    settings.MIGRATION_STEP_TIMEOUT = 10
    server = active_server(api, checks)
    heartbeat("hv2")
    migration_id = live_migrate(admin_api, server).json()["id"]
    assert recovery.checking_deadline() == 2 * 2 * 3 + 10
    Migration.objects.filter(pk=migration_id).update(updated=timezone.now() - timedelta(seconds=21))
    assert recovery.reap_stuck_migrations() == 0
    Migration.objects.filter(pk=migration_id).update(updated=timezone.now() - timedelta(seconds=23))
    assert recovery.reap_stuck_migrations() == 1
    migration = Migration.objects.get(pk=migration_id)
    assert migration.status == "error" and "pre-flight checks did not end within 22 s" in migration.error
    server.refresh_from_db()
    assert (server.status, server.vm_state, server.task_state) == ("ACTIVE", "active", None)
    assert InstanceAction.objects.get(pk=migration.action_id).result == "Error"
    assert run_preflights(checks) == [""], "a late task finds it ended"


def servers_on_hv1(api: APIClient, outbox: Outbox, count: int) -> list[Instance]:
    return [active_server(api, outbox, name=f"vm{n}") for n in range(count)]


def in_progress(batch: str) -> int:
    """The batch's migrations past 'accepted' and not ended."""
    return Migration.objects.filter(batch=batch, status__in=MIGRATION_IN_PROGRESS).exclude(
        status=S.ACCEPTED).count()


def test_a_host_evacuation_moves_max_servers_at_a_time(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    """Five servers, two at a time: only two pre-flights are sent; each migration that ends (whatever
    the way: completed, refused, failed, cancelled) starts the next waiting one; never more than two
    under way; all five sent in the end."""
    servers = servers_on_hv1(api, checks, 5)
    heartbeat("hv2", memory_mb=65536)
    checks.scheduler.clear()
    answer = admin_api.post("/api/v1/hosts/hv1/live-migrate-servers/", {"max_servers": 2}, format="json")
    assert answer.status_code == 202, answer.json()
    body = answer.json()
    batch = body["batch"]
    assert body["max_servers"] == 2 and [entry["accepted"] for entry in body["servers"]] == [True] * 5
    assert all(entry["dest_host"] is None for entry in body["servers"])
    ids = [entry["migration_id"] for entry in body["servers"]]
    assert preflights_sent(checks) == ids[:2], "the two oldest first"
    assert [Migration.objects.get(pk=pk).status for pk in ids] == ["checking"] * 2 + ["accepted"] * 3
    for server in servers:
        server.refresh_from_db()
        assert (server.status, server.task_state) == ("MIGRATING", "migrating"), "waiting or not"

    def one_ends(pk: int, how: str) -> None:
        migration = Migration.objects.get(pk=pk)
        if how == "completed":
            assert migration_reports.migration_update(migration_id=pk, host="hv2",
                                                      status=contract.MIGRATION_PREPARED)
            assert migration_reports.migration_update(migration_id=pk, host="hv1",
                                                      status=contract.MIGRATION_MIGRATED)
            assert migration_reports.migration_update(migration_id=pk, host="hv2",
                                                      status=contract.MIGRATION_COMPLETED,
                                                      values={"power_state": "running"})
        elif how == "failed":
            assert migration_reports.migration_update(migration_id=pk, host="hv2",
                                                      status=contract.MIGRATION_ERROR, error="cannot prepare")
        else:
            assert abort(admin_api, migration).status_code == 202
            assert migration_reports.migration_update(migration_id=pk, host="hv2",
                                                      status=contract.MIGRATION_PREPARED)
        assert Migration.objects.get(pk=pk).status in ("completed", "error", "cancelled")

    # The first check refuses its migration: the third starts at once.
    refuse_first = {"ok": False, "check": "cpu", "message": "lacks avx2"}
    checks.calls[contract.COMPUTE_CHECK_MIGRATE_DESTINATION] = lambda host, instance_uuid, **kw: (
        refuse_first if instance_uuid == str(servers[0].uuid) else dest_answer(host))
    checks.scheduler.clear()
    assert migration_preflight(ids[0]) == "refused"
    assert preflights_sent(checks) == [ids[2]] and in_progress(batch) == 2
    assert run_preflights(checks) == ["preparing"]
    assert migration_preflight(ids[1]) == "preparing"
    assert in_progress(batch) == 2 and Migration.objects.get(pk=ids[3]).status == "accepted"

    for pk, how, starts in ((ids[1], "completed", ids[3]), (ids[2], "failed", ids[4])):
        one_ends(pk, how)
        assert preflights_sent(checks) == [starts] and in_progress(batch) == 2
        assert run_preflights(checks) == ["preparing"]
    one_ends(ids[3], "cancelled")
    assert preflights_sent(checks) == [] and in_progress(batch) == 1, "nothing left to start"
    assert [Migration.objects.get(pk=pk).status for pk in ids] == [
        "refused", "completed", "error", "cancelled", "preparing"]
    assert InstanceAction.objects.filter(instance__in=servers, action="live-migration").count() == 5


def test_an_evacuation_reports_immediate_refusals_and_waiting_ones_can_be_aborted(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    servers = servers_on_hv1(api, checks, 4)
    Instance.objects.filter(uuid=servers[1].uuid).update(vm_state="stopped", power_state="shutdown")
    heartbeat("hv2", memory_mb=65536)
    checks.scheduler.clear()
    body = admin_api.post("/api/v1/hosts/hv1/live-migrate-servers/", {"max_servers": 1},
                          format="json").json()
    by_name = {entry["name"]: entry for entry in body["servers"]}
    assert by_name["vm1"]["accepted"] is False and "vm_state=stopped" in by_name["vm1"]["refused"]
    assert by_name["vm1"]["migration_id"] is None
    first, waiting, last = (by_name[name]["migration_id"] for name in ("vm0", "vm2", "vm3"))
    assert preflights_sent(checks) == [first]

    # A waiting migration aborted: cancelled, its server idle; the batch stays full.
    answer = abort(admin_api, waiting)
    assert answer.status_code == 202 and answer.json()["status"] == "cancelled"
    assert preflights_sent(checks) == [first], "nothing more started"
    server = Instance.objects.get(uuid=servers[2].uuid)
    assert (server.status, server.task_state) == ("ACTIVE", None)
    # Not reaped while its batch has a migration under way, however long it waits.
    Migration.objects.filter(pk=last).update(updated=timezone.now() - timedelta(days=1))
    assert recovery.reap_stuck_migrations() == 0
    assert Migration.objects.get(pk=last).status == "accepted" and preflights_sent(checks) == [first]
    # The one under way is refused: the last one starts.
    checks.calls[contract.COMPUTE_CHECK_MIGRATE_DESTINATION] = {"ok": False, "check": "image",
                                                                "message": "cannot fetch the image"}
    assert run_preflights(checks) == ["refused", "refused"]
    assert Migration.objects.get(pk=last).failed_check == "image"


def test_the_reaper_moves_a_batch_on_that_has_room_and_waiting_migrations(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    """Should an end ever fail to start the next (it is written in the same transaction: it cannot,
    short of a bug), the batch does not wait forever: the reaper starts it."""
    servers_on_hv1(api, checks, 2)
    heartbeat("hv2", memory_mb=65536)
    checks.scheduler.clear()
    body = admin_api.post("/api/v1/hosts/hv1/live-migrate-servers/", {"max_servers": 1},
                          format="json").json()
    first, second = (entry["migration_id"] for entry in body["servers"])
    Migration.objects.filter(pk=first).update(status=S.CANCELLED)  # behind the services' back
    checks.scheduler.clear()
    recovery.reap_stuck_migrations()
    assert preflights_sent(checks) == [second]


@pytest.mark.parametrize("max_servers", [0, -1, "two", 1.5, True])
def test_max_servers_must_be_a_positive_integer(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any,
        max_servers: Any) -> None:
    server = active_server(api, checks)
    answer = admin_api.post("/api/v1/hosts/hv1/live-migrate-servers/", {"max_servers": max_servers},
                            format="json")
    assert answer.status_code == 400 and "max_servers" in answer.json(), answer.json()
    server.refresh_from_db()
    assert server.host.enabled and server.task_state is None, "a rejected request changed nothing"
