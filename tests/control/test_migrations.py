"""Live migration, cold migration and resize in the control plane: checks before anything moves (run
as the scheduler's worker runs them, after the 202), the steps driven by the hosts' reports, claims
on both hosts at every step, abort, confirm and revert.

The hosts' answers are played by the test (the ``outbox`` captures casts and answers calls); real
migrations between real libvirt hosts are in tests/multihost/.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from cloudctl.compute import migration_reports, recovery
from cloudctl.compute.models import Allocation, Flavor, Instance, InstanceAction, Migration, ServerGroup
from compute_workers import contract

from .conftest import GIB, Outbox, active_server, heartbeat, run_preflights, source_answer

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("send_on_commit")]


def allocations(instance: Instance) -> list[tuple[str, int, bool]]:
    """(host, memory_mb, held by a migration) of every allocation of the instance."""
    return sorted((a.host.name, a.memory_mb, a.migration_id is not None)
                  for a in Allocation.objects.filter(instance=instance).select_related("host"))


def report(migration: Migration | int, host: str, status: str, **kw: Any) -> bool:
    pk = migration if isinstance(migration, int) else migration.pk
    return migration_reports.migration_update(migration_id=pk, host=host, status=status, **kw)


def started(outbox: Outbox, answer: Any) -> Migration:
    """The migration a request accepted (202, ``checking``, nothing claimed or sent to a host yet),
    once its pre-flight checks passed on the scheduler's worker (``preparing``)."""
    assert answer.status_code == 202, answer.json()
    assert answer.json()["status"] == "checking", answer.json()
    assert run_preflights(outbox) == ["preparing"]
    return Migration.objects.get(pk=answer.json()["id"])


def refused(outbox: Outbox, answer: Any) -> Migration:
    """The migration a request accepted (202, ``checking``), once its pre-flight checks refused it."""
    assert answer.status_code == 202, answer.json()
    assert answer.json()["status"] == "checking", answer.json()
    assert run_preflights(outbox) == ["refused"]
    return Migration.objects.get(pk=answer.json()["id"])


def live_migrate(admin_api: APIClient, server: Instance, **body: Any) -> Any:
    return admin_api.post(f"/api/v1/servers/{server.uuid}/live-migrate/", body, format="json")


def test_live_migration_runs_step_by_step_and_moves_the_claim_last(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    answer = live_migrate(admin_api, server, host="hv2")
    assert answer.status_code == 202, answer.json()
    body = answer.json()
    # Accepted at once, no host asked: the checks run next on the scheduler's worker.
    assert (body["status"], body["dest_host"], body["block_migration"]) == ("checking", "hv2", None)
    assert checks.scheduler[-1] == (contract.MIGRATION_PREFLIGHT, {"migration_id": body["id"]})
    assert checks.compute == []
    server.refresh_from_db()
    assert (server.status, server.task_state) == ("MIGRATING", "migrating")
    assert allocations(server) == [("hv1", 128, False)], "nothing claimed before the checks"
    assert run_preflights(checks) == ["preparing"]
    assert run_preflights(checks) == [], "sent once"
    body = admin_api.get(f"/api/v1/servers/{server.uuid}/migrations/{body['id']}/").json()
    assert body["status"] == "preparing" and body["migration_type"] == "live-migration"
    assert (body["source_host"], body["dest_host"], body["block_migration"]) == ("hv1", "hv2", True)
    # 128 MiB of RAM and 20 MiB of disk at 800 s per GiB
    assert body["completion_timeout"] == round(800 * (128 / 1024 + 20 / 1024))
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("MIGRATING", "hv1")
    assert allocations(server) == [("hv1", 128, True), ("hv2", 128, False)]
    [prepare] = checks.compute_tasks(contract.COMPUTE_PRE_LIVE_MIGRATION)
    assert prepare["block_migration"] is True and prepare["shared_storage"] is False
    assert prepare["spec"]["host"] == "hv2" and prepare["shared_marker"] == ".shared-abc"
    migration = Migration.objects.get(pk=body["id"])

    assert not report(migration, "hv1", contract.MIGRATION_PREPARED)  # the wrong host: dropped
    assert report(migration, "hv2", contract.MIGRATION_PREPARED)
    [start] = checks.compute_tasks(contract.COMPUTE_LIVE_MIGRATION)
    assert checks.compute[-1][0] == "hv1"
    assert start["migration_uri"] == "qemu+tcp://10.0.0.2/system"
    assert start["migration_data_uri"] == "tcp://10.0.0.2" and start["dest_host"] == "hv2"
    assert report(migration, "hv1", contract.MIGRATION_RUNNING)
    assert migration_reports.migration_progress(migration_id=migration.pk, host="hv1", progress={
        "memory_total": 134217728, "memory_processed": 1000, "memory_remaining": 134216728,
        "disk_total": 0, "disk_processed": 0, "disk_remaining": 0, "observed_at": 1.0})
    shown = admin_api.get(f"/api/v1/servers/{server.uuid}/migrations/{migration.pk}/").json()
    assert (shown["status"], shown["memory_remaining"]) == ("running", 134216728)

    assert not report(migration, "hv2", contract.MIGRATION_COMPLETED)  # not before libvirt finished
    assert report(migration, "hv1", contract.MIGRATION_MIGRATED)
    [post] = checks.compute_tasks(contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST)
    assert checks.compute[-1][0] == "hv2" and post["spec"]["host"] == "hv2"
    server.refresh_from_db()
    assert server.host.name == "hv1", "the record moves only when the destination says the domain runs"
    assert allocations(server) == [("hv1", 128, True), ("hv2", 128, False)]

    assert report(migration, "hv2", contract.MIGRATION_COMPLETED, values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.host.name, server.task_state) == ("ACTIVE", "hv2", None)
    assert allocations(server) == [("hv2", 128, False)]
    migration.refresh_from_db()
    assert migration.status == "completed" and migration.finished_at is not None
    action = InstanceAction.objects.get(pk=migration.action_id)
    assert (action.action, action.result) == ("live-migration", "Success")
    assert not report(migration, "hv2", contract.MIGRATION_COMPLETED)  # a redelivery changes nothing


def test_a_host_is_emptied_for_maintenance_server_by_server(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    """Nova's host-evacuate-live: the host is disabled first, each server that can move live goes (the
    scheduler picks hv2), a stopped one is refused with the reason, and nothing stops at the first."""
    web = active_server(api, checks, name="web")
    db = active_server(api, checks, name="db")
    stopped = active_server(api, checks, name="batch")
    Instance.objects.filter(uuid=stopped.uuid).update(vm_state="stopped", power_state="shutdown")
    heartbeat("hv2")
    url = "/api/v1/hosts/hv1/live-migrate-servers/"
    assert api.post(url, {}, format="json").status_code == 403
    bad = admin_api.post(url, {"block_migration": "sometimes"}, format="json")
    assert bad.status_code == 400 and "block_migration" in bad.json()
    assert Instance.objects.get(uuid=web.uuid).status == "ACTIVE"  # a rejected request changed nothing

    answer = admin_api.post(url, {}, format="json")
    assert answer.status_code == 202, answer.json()
    body = answer.json()
    assert body["host"]["enabled"] is False
    assert body["host"]["disabled_reason"] == "live-migrating its servers away (requested by root)"
    assert body["max_servers"] == 2 and body["batch"]  # EVACUATION_MAX_SERVERS
    by_name = {entry["name"]: entry for entry in body["servers"]}
    assert set(by_name) == {"web", "db", "batch"}
    for name in ("web", "db"):
        assert by_name[name]["accepted"] is True and by_name[name]["dest_host"] is None, by_name[name]
        migration = Migration.objects.get(pk=by_name[name]["migration_id"])
        assert (migration.migration_type, migration.status, migration.batch) == (
            "live-migration", "checking", body["batch"])
    assert run_preflights(checks) == ["preparing", "preparing"]
    for name in ("web", "db"):
        assert Migration.objects.get(pk=by_name[name]["migration_id"]).dest_host.name == "hv2"
    assert by_name["batch"]["accepted"] is False and by_name["batch"]["migration_id"] is None
    assert f"cannot live-migrate server {stopped.uuid} while vm_state=stopped" in by_name["batch"]["refused"]
    statuses = {s.name: s.status for s in Instance.objects.filter(uuid__in=[web.uuid, db.uuid, stopped.uuid])}
    assert statuses == {"web": "MIGRATING", "db": "MIGRATING", "batch": "SHUTOFF"}
    # Again while they migrate: each is refused (a task runs), the operator's reason is kept.
    again = admin_api.post(url, {}, format="json").json()
    assert [entry["accepted"] for entry in again["servers"]] == [False, False, False]
    assert again["host"]["disabled_reason"] == body["host"]["disabled_reason"]
    assert admin_api.post("/api/v1/hosts/nowhere/live-migrate-servers/", {}, format="json").status_code == 404


def test_a_failed_preflight_check_leaves_the_server_untouched(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    checks.calls[contract.COMPUTE_CHECK_MIGRATE_DESTINATION] = {
        "ok": False, "check": "cpu", "message": "the CPU of hv1 is incompatible with this host: lacks avx2"}
    before = Instance.objects.get(uuid=server.uuid)
    answer = live_migrate(admin_api, server, host="hv2")
    assert answer.status_code == 202 and answer.json()["status"] == "checking", answer.json()
    migration = refused(checks, answer)
    assert (migration.status, migration.failed_check) == ("refused", "cpu")
    assert "avx2" in migration.error and "hv2" in migration.error and migration.finished_at is not None
    shown = admin_api.get(f"/api/v1/servers/{server.uuid}/migrations/{migration.pk}/").json()
    assert (shown["status"], shown["failed_check"], shown["error"]) == ("refused", "cpu", migration.error)
    server.refresh_from_db()
    assert (server.status, server.vm_state, server.task_state, server.host.name) == (
        "ACTIVE", before.vm_state, None, "hv1")
    assert server.power_state == before.power_state and server.fault is None
    assert allocations(server) == [("hv1", 128, False)]
    assert checks.compute == [], "nothing was sent to a host"
    action = InstanceAction.objects.get(pk=migration.action_id)
    assert (action.action, action.result, action.message) == ("live-migration", "Error", migration.error)
    [event] = action.events.filter(event="preflight_checks")
    assert (event.result, event.message) == ("Error", migration.error)
    # The server is idle again: a new request is accepted.
    assert live_migrate(admin_api, server, host="hv2").status_code == 202


def test_the_disk_space_check_and_the_block_migration_choice(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")

    def untouched() -> None:
        server.refresh_from_db()
        assert (server.status, server.task_state) == ("ACTIVE", None)
        assert allocations(server) == [("hv1", 128, False)]

    checks.calls[contract.COMPUTE_CHECK_MIGRATE_SOURCE] = source_answer(disk_bytes=80 * GIB)
    migration = refused(checks, live_migrate(admin_api, server, host="hv2"))
    assert migration.failed_check == "disk" and "hv2 has 50.00 GiB free" in migration.error
    untouched()

    checks.calls[contract.COMPUTE_CHECK_MIGRATE_SOURCE] = source_answer()
    migration = refused(checks, live_migrate(admin_api, server, host="hv2", block_migration=False))
    assert migration.failed_check == "shared_storage" and migration.block_migration is False
    untouched()

    checks.calls[contract.COMPUTE_CHECK_MIGRATE_SOURCE] = source_answer(shared=True)
    # Whether the hosts share the storage is known only once they answered: a refusal, no longer a 400.
    migration = refused(checks, live_migrate(admin_api, server, host="hv2", block_migration=True))
    assert migration.failed_check == "block_migration" and "share the instance storage" in migration.error
    untouched()
    migration = started(checks, live_migrate(admin_api, server, host="hv2"))
    assert (migration.block_migration, migration.shared_storage) == (False, True)
    # memory only: 128 MiB at 800 s per GiB
    assert migration.completion_timeout == 100


@pytest.mark.parametrize(("body", "field"), [
    ({"host": "hv1"}, "host"), ({"host": "nowhere"}, "host"), ({"block_migration": "yes"}, "block_migration"),
    ({"host": 7}, "host")])
def test_bad_live_migration_requests_name_the_field(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any,
        body: dict[str, Any], field: str) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    answer = live_migrate(admin_api, server, **body)
    assert answer.status_code == 400 and field in answer.json(), answer.json()


def test_only_admins_migrate_and_members_see_their_servers_migrations(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    assert api.post(f"/api/v1/servers/{server.uuid}/live-migrate/", {}, format="json").status_code == 403
    assert api.post(f"/api/v1/servers/{server.uuid}/migrate/", {}, format="json").status_code == 403
    started(checks, live_migrate(admin_api, server))  # the scheduler picks hv2
    assert Migration.objects.get().dest_host.name == "hv2"
    mine = api.get(f"/api/v1/servers/{server.uuid}/migrations/").json()
    assert [m["dest_host"] for m in mine] == [None], "host names are for administrators"
    theirs = admin_api.get(f"/api/v1/servers/{server.uuid}/migrations/").json()
    assert [m["dest_host"] for m in theirs] == ["hv2"]
    assert api.get("/api/v1/migrations/").status_code == 403
    listed = admin_api.get("/api/v1/migrations/?in_progress=true&host=hv2").json()
    assert [m["server"] for m in listed] == [str(server.uuid)]
    assert admin_api.get("/api/v1/migrations/?status=bogus").status_code == 400
    assert admin_api.get("/api/v1/migrations/?status=completed").json() == []


def test_the_scheduler_picks_a_destination_that_honours_anti_affinity(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any,
        member: Any, project: Any) -> None:
    group = ServerGroup.objects.create(name="apart", policy="anti-affinity", project=project)
    first = active_server(api, checks, name="first")
    for name in ("hv2", "hv3"):
        heartbeat(name, memory_mb=65536 if name == "hv2" else 8192)  # the weigher prefers hv2
    second = active_server(api, checks, name="second")
    Instance.objects.filter(uuid=second.uuid).update(host=second.host.__class__.objects.get(name="hv2"))
    Instance.objects.filter(uuid__in=[first.uuid, second.uuid]).update(server_group=group)
    migration = started(checks, live_migrate(admin_api, first))
    assert migration.dest_host.name == "hv3", "hv2 runs another member of the anti-affinity group"
    # with hv3 gone too, no host is left: refused by the checks, the server as it was
    Instance.objects.filter(uuid=first.uuid).update(task_state=None)
    Migration.objects.all().delete()
    Allocation.objects.filter(instance=first).delete()
    Allocation.objects.create(instance=first, host=first.host, vcpus=1, memory_mb=128, disk_gb=1)
    heartbeat("hv3")
    from cloudctl.compute.services import host_set_enabled
    host_set_enabled(host=first.host.__class__.objects.get(name="hv3"), enabled=False, reason="maintenance")
    migration = refused(checks, live_migrate(admin_api, first))
    assert migration.failed_check == "scheduler" and "No valid host" in migration.error
    assert migration.dest_host is None
    first.refresh_from_db()
    assert (first.status, first.task_state, first.host.name) == ("ACTIVE", None, "hv1")


def started_live_migration(api: APIClient, admin_api: APIClient,
                           checks: Outbox) -> tuple[Instance, Migration]:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration = started(checks, live_migrate(admin_api, server, host="hv2"))
    report(migration, "hv2", contract.MIGRATION_PREPARED)
    report(migration, "hv1", contract.MIGRATION_RUNNING)
    checks.compute.clear()
    return server, migration


def test_a_completed_live_migration_records_the_destinations_final_figures(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    """A migration that ended before its first progress report still shows what was copied and how long
    the guest was paused: the destination's completed-job figures come with its report."""
    server, migration = started_live_migration(api, admin_api, checks)
    assert report(migration, "hv1", contract.MIGRATION_MIGRATED)
    final = {"memory_total": 134217728, "memory_processed": 3 << 20, "memory_remaining": 0, "disk_total": 0,
             "disk_processed": 0, "disk_remaining": 0, "not_a_counter": 5, "memory_processed_ms": "x"}
    assert report(migration, "hv2", contract.MIGRATION_COMPLETED,
                  values={"power_state": "running", "progress": final, "downtime_ms": 42})
    shown = admin_api.get(f"/api/v1/servers/{server.uuid}/migrations/{migration.pk}/").json()
    assert shown["status"] == "completed"
    assert (shown["memory_total"], shown["memory_processed"], shown["memory_remaining"]) == (134217728,
                                                                                           3 << 20, 0)
    assert shown["downtime_ms"] == 42
    assert Migration.objects.get(pk=migration.pk).progress == "100% (0.0 MiB left)"


def test_a_completed_report_without_figures_keeps_the_last_progress(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    _server, migration = started_live_migration(api, admin_api, checks)
    assert migration_reports.migration_progress(migration_id=migration.pk, host="hv1", progress={
        "memory_total": 1000, "memory_processed": 900, "memory_remaining": 100})
    assert report(migration, "hv1", contract.MIGRATION_MIGRATED)
    assert report(migration, "hv2", contract.MIGRATION_COMPLETED,
                  values={"power_state": "running", "progress": "garbage", "downtime_ms": True})
    migration.refresh_from_db()
    assert (migration.memory_total, migration.memory_processed, migration.memory_remaining) == (1000, 900, 0)
    assert migration.downtime_ms is None


def test_abort_keeps_the_server_on_its_source(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server, migration = started_live_migration(api, admin_api, checks)
    url = f"/api/v1/servers/{server.uuid}/migrations/{migration.pk}/abort/"
    assert api.post(url).status_code == 403
    answer = admin_api.post(url)
    assert answer.status_code == 202 and answer.json()["status"] == "cancelling"
    assert checks.compute == [("hv1", contract.COMPUTE_ABORT_LIVE_MIGRATION,
                               {"instance_uuid": str(server.uuid), "migration_id": migration.pk})]
    assert report(migration, "hv1", contract.MIGRATION_CANCELLED, error="aborted on request",
                  values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("ACTIVE", "hv1")
    assert allocations(server) == [("hv1", 128, False)]
    migration.refresh_from_db()
    assert migration.status == "cancelled"
    [rollback] = checks.compute_tasks(contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST)
    assert rollback["shared_storage"] is False
    again = admin_api.post(url)
    assert again.status_code == 409 and again.json()["status"] == "cancelled"


def test_abort_before_the_job_starts_is_not_lost(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration = started(checks, live_migrate(admin_api, server, host="hv2"))
    abort = admin_api.post(f"/api/v1/servers/{server.uuid}/migrations/{migration.pk}/abort/")
    assert abort.status_code == 202
    checks.compute.clear()
    assert report(migration, "hv2", contract.MIGRATION_PREPARED)
    assert checks.compute_tasks(contract.COMPUTE_LIVE_MIGRATION) == [], "never started"
    migration.refresh_from_db()
    server.refresh_from_db()
    assert migration.status == "cancelled" and server.status == "ACTIVE"
    assert allocations(server) == [("hv1", 128, False)]


def force_complete(client: APIClient, server: Instance, migration: Migration) -> Any:
    return client.post(f"/api/v1/servers/{server.uuid}/migrations/{migration.pk}/force-complete/")


def test_force_complete_switches_to_post_copy_which_cannot_be_aborted(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server, migration = started_live_migration(api, admin_api, checks)
    assert force_complete(api, server, migration).status_code == 403
    answer = force_complete(admin_api, server, migration)
    assert answer.status_code == 202 and answer.json()["status"] == "running"
    assert checks.compute == [("hv1", contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE,
                               {"instance_uuid": str(server.uuid), "migration_id": migration.pk})]
    switched = {"name": "compute_live_migration_force_complete", "result": "success",
                "message": "switched to post-copy on hv1 after 3.2 s"}
    assert report(migration, "hv1", contract.MIGRATION_RUNNING_POSTCOPY, event=switched)
    shown = admin_api.get(f"/api/v1/servers/{server.uuid}/migrations/{migration.pk}/").json()
    assert shown["status"] == "running (post-copy)"
    assert migration_reports.migration_progress(migration_id=migration.pk, host="hv1", progress={
        "memory_total": 100, "memory_processed": 90, "memory_remaining": 10, "disk_total": 0,
        "disk_processed": 0, "disk_remaining": 0, "observed_at": 2.0}), "progress goes on in post-copy"
    report(migration, "hv1", contract.MIGRATION_RUNNING)  # a late report: no way back
    migration.refresh_from_db()
    assert migration.status == "running (post-copy)"

    abort = admin_api.post(f"/api/v1/servers/{server.uuid}/migrations/{migration.pk}/abort/")
    assert abort.status_code == 409 and abort.json()["status"] == "running (post-copy)"
    assert "can no longer be aborted" in abort.json()["detail"]
    again = force_complete(admin_api, server, migration)
    assert again.status_code == 409 and "only while running" in again.json()["detail"]

    assert report(migration, "hv1", contract.MIGRATION_MIGRATED)
    assert report(migration, "hv2", contract.MIGRATION_COMPLETED, values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("ACTIVE", "hv2")
    assert allocations(server) == [("hv2", 128, False)]
    [event] = InstanceAction.objects.get(pk=migration.action_id).events.filter(
        event="compute_live_migration_force_complete")  # opened by the request, closed by the report
    assert (event.result, event.message) == ("Success", switched["message"])
    assert event.finish_time is not None and event.start_time <= event.finish_time


def test_force_complete_by_pausing_is_an_event_of_the_running_migration(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server, migration = started_live_migration(api, admin_api, checks)
    assert force_complete(admin_api, server, migration).status_code == 202
    paused = {"name": "compute_live_migration_force_complete", "result": "success",
              "message": "paused the guest on hv1 so that the migration converges"}
    assert report(migration, "hv1", contract.MIGRATION_RUNNING, event=paused)
    migration.refresh_from_db()
    assert migration.status == "running" and migration.started_at is not None
    action = InstanceAction.objects.get(pk=migration.action_id)
    assert action.events.filter(event="compute_live_migration_force_complete", result="Success").exists()
    checks.compute.clear()
    again = force_complete(admin_api, server, migration)  # the guest is paused already: nothing to do
    assert again.status_code == 409 and again.json()["status"] == "running", again.json()
    assert f"migration {migration.pk} is switched over" in again.json()["detail"]
    assert "paused the guest on hv1" in again.json()["detail"] and checks.compute == []
    assert report(migration, "hv1", contract.MIGRATION_MIGRATED)
    assert report(migration, "hv2", contract.MIGRATION_COMPLETED, values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("ACTIVE", "hv2")


@pytest.mark.parametrize(("end", "result", "outcome"), [
    (contract.MIGRATION_MIGRATED, "Success", "not switched over: the migration completed first"),
    (contract.MIGRATION_CANCELLED, "Error", "not switched over: the migration cancelled"),
    (contract.MIGRATION_FAILED, "Error", "not switched over: the migration failed"),
])
def test_a_force_complete_still_waiting_ends_with_the_migration(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any,
        end: str, result: str, outcome: str) -> None:
    """libvirt refused the switch-over so far (the source retries it): the request's event stays open
    with the reason, and the migration's end closes it; nothing is left open."""
    server, migration = started_live_migration(api, admin_api, checks)
    assert force_complete(admin_api, server, migration).status_code == 202
    refused = {"name": contract.FORCE_COMPLETE_EVENT, "result": "progress",
               "message": "cannot switch to post-copy on hv1 yet after 0.2 s (as requested): post-copy can "
                          "only be started while outgoing migration is in progress; the migration goes on"}
    assert report(migration, "hv1", contract.MIGRATION_RUNNING, event=refused)
    action = InstanceAction.objects.get(pk=migration.action_id)
    [waiting] = action.events.filter(event=contract.FORCE_COMPLETE_EVENT)
    assert waiting.finish_time is None and waiting.message == refused["message"]
    checks.compute.clear()
    again = force_complete(admin_api, server, migration)  # the source retries the first one already
    assert again.status_code == 409 and "already waiting for libvirt" in again.json()["detail"]
    assert refused["message"] in again.json()["detail"] and checks.compute == []

    assert report(migration, "hv1", end, error=None if end == contract.MIGRATION_MIGRATED else "aborted")
    waiting.refresh_from_db()
    assert waiting.finish_time is not None and waiting.result == result
    assert waiting.message == f"{refused['message']}; {outcome}"
    server.refresh_from_db()
    assert server.status == ("MIGRATING" if end == contract.MIGRATION_MIGRATED else "ACTIVE")


def test_force_complete_is_refused_unless_a_live_migration_runs(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration = started(checks, live_migrate(admin_api, server, host="hv2"))
    checks.compute.clear()
    answer = force_complete(admin_api, server, migration)  # still preparing
    assert answer.status_code == 409 and answer.json()["status"] == "preparing"
    assert checks.compute == []
    report(migration, "hv2", contract.MIGRATION_ERROR, error="cannot prepare")
    Instance.objects.filter(uuid=server.uuid).update(task_state=None)
    moved = cold(admin_api, server, host="hv2")
    assert moved.status_code == 202, moved.json()
    cold_migration = Migration.objects.get(pk=moved.json()["id"])
    answer = force_complete(admin_api, server, cold_migration)
    assert answer.status_code == 409 and "only live migrations" in answer.json()["detail"]
    missing = admin_api.post(f"/api/v1/servers/{server.uuid}/migrations/999999/force-complete/")
    assert missing.status_code == 404


def test_a_failure_in_post_copy_leaves_the_server_in_error_with_what_to_do(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server, migration = started_live_migration(api, admin_api, checks)
    assert report(migration, "hv1", contract.MIGRATION_RUNNING_POSTCOPY)
    error = "live migration of ... failed in post-copy: Unable to read from socket"
    assert report(migration, "hv1", contract.MIGRATION_FAILED, error=error, values={"power_state": "paused"})
    server.refresh_from_db()
    migration.refresh_from_db()
    assert (server.status, server.host.name, server.task_state) == ("ERROR", "hv1", None)
    assert "failed in post-copy" in server.fault["message"] and "hard reboot" in server.fault["message"]
    assert migration.status == "failed" and allocations(server) == [("hv1", 128, False)]
    [rollback] = checks.compute_tasks(contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST)
    assert checks.compute[-1][0] == "hv2" and rollback["migration_id"] == migration.pk


def test_a_source_restart_in_post_copy_does_not_abort(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:

    server, migration = started_live_migration(api, admin_api, checks)
    assert report(migration, "hv1", contract.MIGRATION_RUNNING_POSTCOPY)
    recovery.host_init(host="hv1", reported={str(server.uuid): "paused"})
    assert checks.compute_tasks(contract.COMPUTE_ABORT_LIVE_MIGRATION) == []
    migration.refresh_from_db()
    assert migration.status == "running (post-copy)"
    recovery.host_init(host="hv1", reported={})  # libvirt finished it meanwhile: ask the destination
    assert checks.compute[-1][:2] == ("hv2", contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST)
    assert report(migration, "hv2", contract.MIGRATION_COMPLETED, values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("ACTIVE", "hv2")


def test_a_migration_past_its_deadline_fails_truthfully(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server, migration = started_live_migration(api, admin_api, checks)
    error = "live migration exceeded its completion timeout of 100 s and was aborted"
    assert report(migration, "hv1", contract.MIGRATION_FAILED, error=error, values={"power_state": "running"})
    server.refresh_from_db()
    migration.refresh_from_db()
    assert (server.status, server.host.name, migration.status, migration.error) == (
        "ACTIVE", "hv1", "failed", error)
    action = InstanceAction.objects.get(pk=migration.action_id)
    assert action.result == "Error" and "completion timeout" in action.message


def test_a_destination_that_cannot_prepare_ends_the_migration(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration = started(checks, live_migrate(admin_api, server, host="hv2"))
    assert report(migration, "hv2", contract.MIGRATION_ERROR, error="cannot download image tiny: HTTP 404")
    server.refresh_from_db()
    migration.refresh_from_db()
    assert (server.status, migration.status) == ("ACTIVE", "error")
    assert "HTTP 404" in migration.error and allocations(server) == [("hv1", 128, False)]


def cold(admin_api: APIClient, server: Instance, **body: Any) -> Any:
    return admin_api.post(f"/api/v1/servers/{server.uuid}/migrate/", body, format="json")


def test_cold_migration_moves_the_server_and_confirms_itself(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    answer = cold(admin_api, server)
    server.refresh_from_db()
    assert (server.status, server.task_state) == ("RESIZE", "resize_prep"), "at once, before the checks"
    migration = started(checks, answer)
    assert migration.dest_host.name == "hv2" and migration.power_on
    assert checks.compute[-1][:2] == ("hv2", contract.COMPUTE_PREP_RESIZE)
    server.refresh_from_db()
    assert (server.status, server.task_state) == ("RESIZE", "resize_prep")
    assert report(migration, "hv2", contract.MIGRATION_PREPARED)
    assert checks.compute[-1][:2] == ("hv1", contract.COMPUTE_RESIZE_INSTANCE)
    assert checks.compute[-1][2]["migration_uri"] == "qemu+tcp://10.0.0.2/system"
    assert report(migration, "hv1", contract.MIGRATION_MIGRATED)
    host, name, finish = checks.compute[-1]
    assert (host, name, finish["power_on"], finish["spec"]["flavor"]["name"]) == (
        "hv2", contract.COMPUTE_FINISH_RESIZE, True, "m1.nano")
    assert report(migration, "hv2", contract.MIGRATION_FINISHED, values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("ACTIVE", "hv2")
    assert allocations(server) == [("hv1", 128, True), ("hv2", 128, False)], "held until the copy is removed"
    assert checks.compute[-1][:2] == ("hv1", contract.COMPUTE_CONFIRM_RESIZE)
    assert report(migration, "hv1", contract.MIGRATION_CONFIRMED)
    migration.refresh_from_db()
    assert migration.status == "confirmed" and allocations(server) == [("hv2", 128, False)]


def test_cold_migration_of_a_stopped_server_leaves_it_stopped(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    Instance.objects.filter(uuid=server.uuid).update(vm_state="stopped", power_state="shutdown")
    heartbeat("hv2")
    migration = started(checks, cold(admin_api, server, host="hv2"))
    assert migration.power_on is False
    report(migration, "hv2", contract.MIGRATION_PREPARED)
    report(migration, "hv1", contract.MIGRATION_MIGRATED)
    assert checks.compute[-1][2]["power_on"] is False
    report(migration, "hv2", contract.MIGRATION_FINISHED, values={"power_state": "shutdown"})
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("SHUTOFF", "hv2")


def test_a_failed_copy_leaves_the_server_where_it_was(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration = started(checks, cold(admin_api, server))
    report(migration, "hv2", contract.MIGRATION_PREPARED)
    assert report(migration, "hv1", contract.MIGRATION_ERROR, error="cannot reach qemu+tcp://10.0.0.2/system",
                  values={"power_state": "running"})
    server.refresh_from_db()
    migration.refresh_from_db()
    assert (server.status, server.host.name, migration.status) == ("ACTIVE", "hv1", "error")
    assert allocations(server) == [("hv1", 128, False)]


def resize(api: APIClient, server: Instance, flavor: str) -> Any:
    return api.post(f"/api/v1/servers/{server.uuid}/resize/", {"flavor": flavor}, format="json")


def resized(api: APIClient, checks: Outbox) -> tuple[Instance, Migration]:
    """A server resized from m1.nano to m1.tiny on its own host, waiting in VERIFY_RESIZE."""
    server = active_server(api, checks)
    migration = started(checks, resize(api, server, "m1.tiny"))
    assert (migration.source_host.name, migration.dest_host.name) == ("hv1", "hv1")
    server.refresh_from_db()
    assert allocations(server) == [("hv1", 128, True), ("hv1", 512, False)], "both flavors held"
    assert report(migration, "hv1", contract.MIGRATION_PREPARED)
    assert report(migration, "hv1", contract.MIGRATION_MIGRATED)
    assert checks.compute[-1][2]["spec"]["flavor"]["memory_mb"] == 512
    assert report(migration, "hv1", contract.MIGRATION_FINISHED, values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.flavor.name, server.memory_mb) == ("VERIFY_RESIZE", "m1.tiny", 512)
    assert allocations(server) == [("hv1", 128, True), ("hv1", 512, False)]
    checks.compute.clear()
    return server, migration


def test_resize_then_confirm_frees_the_old_flavor(
        api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server, migration = resized(api, checks)
    answer = api.post(f"/api/v1/servers/{server.uuid}/confirm-resize/")
    assert answer.status_code == 202 and answer.json()["status"] == "confirming"
    assert checks.compute == [("hv1", contract.COMPUTE_CONFIRM_RESIZE,
                               {"instance_uuid": str(server.uuid), "migration_id": migration.pk})]
    assert report(migration, "hv1", contract.MIGRATION_CONFIRMED)
    server.refresh_from_db()
    assert (server.status, server.flavor.name) == ("ACTIVE", "m1.tiny")
    assert allocations(server) == [("hv1", 512, False)]
    assert api.post(f"/api/v1/servers/{server.uuid}/confirm-resize/").status_code == 409


def test_resize_then_revert_goes_back_to_the_old_flavor(
        api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server, migration = resized(api, checks)
    answer = api.post(f"/api/v1/servers/{server.uuid}/revert-resize/")
    assert answer.status_code == 202 and answer.json()["status"] == "reverting"
    server.refresh_from_db()
    assert server.status == "REVERT_RESIZE"
    assert checks.compute[-1][:2] == ("hv1", contract.COMPUTE_REVERT_RESIZE)
    assert report(migration, "hv1", contract.MIGRATION_REVERTED_DEST)
    _host, name, kwargs = checks.compute[-1]
    assert (name, kwargs["spec"]["flavor"]["name"], kwargs["power_on"]) == (
        contract.COMPUTE_FINISH_REVERT_RESIZE, "m1.nano", True)
    assert report(migration, "hv1", contract.MIGRATION_REVERTED, values={"power_state": "running"})
    server.refresh_from_db()
    migration.refresh_from_db()
    assert (server.status, server.flavor.name, server.memory_mb, migration.status) == (
        "ACTIVE", "m1.nano", 128, "reverted")
    assert allocations(server) == [("hv1", 128, False)]


def test_an_unconfirmed_resize_is_confirmed_after_the_window(
        api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any, settings: Any) -> None:
    server, migration = resized(api, checks)
    settings.RESIZE_CONFIRM_WINDOW = 60
    assert recovery.confirm_expired_resizes() == 0
    Migration.objects.filter(pk=migration.pk).update(finished_at=timezone.now() - timedelta(seconds=61))
    assert recovery.confirm_expired_resizes() == 1
    assert checks.compute[-1][:2] == ("hv1", contract.COMPUTE_CONFIRM_RESIZE)
    report(migration, "hv1", contract.MIGRATION_CONFIRMED)
    server.refresh_from_db()
    assert server.status == "ACTIVE"
    assert InstanceAction.objects.filter(instance=server, action="confirmResize", result="Success").exists()


@pytest.mark.parametrize(("flavor", "message"), [
    ("m1.nano", "already has flavor"), ("nonesuch", "no flavor")])
def test_bad_resize_requests_name_the_flavor(
        api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any, flavor: str,
        message: str) -> None:
    server = active_server(api, checks)
    answer = resize(api, server, flavor)
    assert answer.status_code == 400 and message in answer.json()["flavor"][0], answer.json()


def test_a_resize_cannot_shrink_the_disk(
        api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    Flavor.objects.create(name="wide", vcpus=1, memory_mb=256, root_gb=0)
    answer = resize(api, server, "wide")
    assert answer.status_code == 400 and "cannot shrink" in answer.json()["flavor"][0]


def test_a_finish_that_fails_reverts_to_the_source(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration = started(checks, cold(admin_api, server))
    report(migration, "hv2", contract.MIGRATION_PREPARED)
    report(migration, "hv1", contract.MIGRATION_MIGRATED)
    assert report(migration, "hv2", contract.MIGRATION_ERROR, error="libvirt cannot define the domain")
    assert checks.compute[-1][:2] == ("hv2", contract.COMPUTE_REVERT_RESIZE)
    report(migration, "hv2", contract.MIGRATION_REVERTED_DEST)
    assert checks.compute[-1][:2] == ("hv1", contract.COMPUTE_FINISH_REVERT_RESIZE)
    report(migration, "hv1", contract.MIGRATION_REVERTED, values={"power_state": "running"})
    server.refresh_from_db()
    migration.refresh_from_db()
    assert (server.status, server.host.name, migration.status) == ("ACTIVE", "hv1", "error")
    assert "could not finish" in migration.error and allocations(server) == [("hv1", 128, False)]


def test_a_source_worker_restart_mid_migration_ends_truthfully(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    """Nova's _init_instance for migrations: where the domain is after the restart decides."""

    server, migration = started_live_migration(api, admin_api, checks)
    recovery.host_init(host="hv1", reported={str(server.uuid): "running"})  # still here: aborted, failed
    assert checks.compute[0][:2] == ("hv1", contract.COMPUTE_ABORT_LIVE_MIGRATION)
    server.refresh_from_db()
    migration.refresh_from_db()
    assert (server.status, server.host.name, migration.status) == ("ACTIVE", "hv1", "failed")
    assert "restart of the compute worker on hv1" in migration.error
    assert allocations(server) == [("hv1", 128, False)]

    Instance.objects.filter(uuid=server.uuid).update(task_state=None)
    checks.compute.clear()
    second = started(checks, live_migrate(admin_api, server, host="hv2"))
    report(second, "hv2", contract.MIGRATION_PREPARED)
    report(second, "hv1", contract.MIGRATION_RUNNING)
    recovery.host_init(host="hv1", reported={})  # the domain left: ask the destination
    assert checks.compute[-1][:2] == ("hv2", contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST)
    assert report(second, "hv2", contract.MIGRATION_COMPLETED, values={"power_state": "running"})
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("ACTIVE", "hv2")


def test_a_domain_found_on_another_host_moves_the_record(
        api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any) -> None:
    from cloudctl.compute import conductor, sync

    server = active_server(api, checks)
    heartbeat("hv2", instances={str(server.uuid): "running"})
    source = heartbeat("hv1", instances={})
    sync.sync_host(source, {}, conductor.observed_at_of({"observed_at": timezone.now().timestamp() + 1}))
    server.refresh_from_db()
    assert (server.status, server.host.name) == ("ACTIVE", "hv2")
    assert allocations(server) == [("hv2", 128, False)]
    assert InstanceAction.objects.filter(instance=server, events__event="domain_found_elsewhere").exists()


def test_stuck_migrations_are_reaped_from_what_the_hosts_report(
        api: APIClient, admin_api: APIClient, checks: Outbox, flavors: dict[str, Flavor], image: Any,
        settings: Any) -> None:
    server = active_server(api, checks)
    heartbeat("hv2")
    migration = started(checks, live_migrate(admin_api, server, host="hv2"))
    report(migration, "hv2", contract.MIGRATION_PREPARED)
    report(migration, "hv1", contract.MIGRATION_MIGRATED)  # and then the destination never answers
    settings.MIGRATION_STEP_TIMEOUT = 5
    assert recovery.reap_stuck_migrations() == 0
    Migration.objects.filter(pk=migration.pk).update(updated=timezone.now() - timedelta(seconds=6))
    heartbeat("hv2", instances={str(server.uuid): "running"})
    assert recovery.reap_stuck_migrations() == 1
    server.refresh_from_db()
    migration.refresh_from_db()
    assert (server.status, server.host.name, migration.status) == ("ACTIVE", "hv2", "completed")
