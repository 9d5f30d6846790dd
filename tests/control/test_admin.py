"""The admin: every page renders, actions go through the services, reset state is recorded,
the dashboard shows real usage."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse

from cloudctl.compute.models import Host, Instance, InstanceAction, Migration
from compute_workers import contract
from tests.control.conftest import active_server, heartbeat, run_preflights

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(admin) -> Client:
    client = Client()
    client.force_login(admin)
    return client


@pytest.fixture
def running(api, flavors, image, outbox) -> Instance:
    return active_server(api, outbox, name="web")


def test_every_admin_page_renders(staff, running, outbox):
    for model, model_admin in admin.site._registry.items():
        meta = model._meta
        changelist = staff.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist"))
        assert changelist.status_code == 200, (meta.label, changelist.status_code)
        if model_admin.has_add_permission(changelist.wsgi_request):
            add = staff.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_add"))
            assert add.status_code == 200, meta.label
        first = model._default_manager.first()
        if first is not None:
            change = staff.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_change",
                                       args=[first.pk]))
            assert change.status_code == 200, meta.label
    page = staff.get(reverse("admin:compute_instance_change", args=[running.pk]))
    assert b"did not answer" in page.content  # the console tail asked the host (none here)


def act(staff: Client, action: str, *servers: Instance, **extra):
    return staff.post(reverse("admin:compute_instance_changelist"),
                      {"action": action, "_selected_action": [s.pk for s in servers], **extra},
                      follow=True)


def test_admin_actions_go_through_the_services(staff, running, outbox,
                                               django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        page = act(staff, "reboot_soft", running)
    assert "Web: reboot (soft) accepted" in page.content.decode()
    running.refresh_from_db()
    assert running.task_state == "rebooting"
    assert outbox.compute[-1][:2] == ("hv1", contract.COMPUTE_REBOOT)
    action = InstanceAction.objects.get(instance=running, action="reboot")
    assert action.user.username == "root"
    refused = act(staff, "stop", running)
    assert "Web: stop refused: cannot stop server" in refused.content.decode()
    assert "task_state=rebooting" in refused.content.decode()


def test_reset_state_asks_why_and_records_it(staff, running):
    Instance.objects.filter(pk=running.pk).update(task_state="rebooting")
    form = act(staff, "reset_state", running)
    assert b"Reset the state of 1 server" in form.content
    done = act(staff, "reset_state", running, apply="1", state="active",
               reason="reboot hung; guest checked by hand")
    assert "Web: reset state accepted" in done.content.decode()
    running.refresh_from_db()
    assert (running.vm_state, running.task_state) == ("active", None)
    record = InstanceAction.objects.get(instance=running, action="reset_state")
    assert record.user.username == "root"
    assert record.message == ("vm_state=active task_state=rebooting -> vm_state=active: "
                              "reboot hung; guest checked by hand")


def test_hosts_can_be_disabled_from_the_admin(staff, running):
    staff.post(reverse("admin:compute_host_changelist"),
               {"action": "disable_hosts", "_selected_action": [running.host.pk]})
    running.host.refresh_from_db()
    assert not running.host.enabled and "from the admin" in running.host.disabled_reason


def test_dashboard_shows_real_usage(staff, running):
    heartbeat("hv2")
    page = staff.get("/admin/dashboard/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'http-equiv="refresh"' in html
    hv1 = html.split('id="host-hv1"', 1)[1].split("</tr>", 1)[0]
    assert '<td class="instances">1</td>' in hv1
    assert "128 / 12288" in hv1  # 8192 MiB x 1.5, one m1.nano
    assert "ACTIVE" in html
    anonymous = Client().get("/admin/dashboard/")
    assert anonymous.status_code == 302


def test_live_migrate_from_the_admin_reports_each_server(staff, running, outbox, api,
                                                         django_capture_on_commit_callbacks):
    other = active_server(api, outbox, name="db")
    heartbeat("hv2")
    outbox.calls[contract.COMPUTE_CHECK_MIGRATE_DESTINATION] = lambda host, instance_uuid, **kw: (
        {"ok": True, "migration_uri": "qemu+tcp://10.0.0.2/system", "migration_data_uri": "tcp://10.0.0.2",
         "shared_marker": ".shared-x", "disk_free_bytes": 2**40, "image_cached": True, "cpu": "identical"}
        if instance_uuid == str(running.uuid) else
        {"ok": False, "check": "cpu", "message": "host CPU lacks avx2"})
    outbox.calls[contract.COMPUTE_CHECK_MIGRATE_SOURCE] = {"ok": True, "shared_storage": False,
                                                           "power_state": "running", "disk_bytes": 1}
    with django_capture_on_commit_callbacks(execute=True):
        page = act(staff, "live-migrate", running, other).content.decode()
    # Both accepted at once; the checks run next (the scheduler's worker) and refuse db later.
    assert "Web: live-migrate accepted (checking)" in page
    assert "Db: live-migrate accepted (checking)" in page
    with django_capture_on_commit_callbacks(execute=True):
        assert sorted(run_preflights(outbox)) == ["preparing", "refused"]
    running.refresh_from_db()
    other.refresh_from_db()
    assert (running.status, other.status, other.task_state) == ("MIGRATING", "ACTIVE", None)
    assert outbox.compute[-1][:2] == ("hv2", contract.COMPUTE_PRE_LIVE_MIGRATION)
    listed = staff.get(reverse("admin:compute_migration_changelist")).content.decode()
    assert "live-migration" in listed and "preparing" in listed
    assert "refused" in listed and "cpu" in listed  # the later refusal, with the check
    refusal = InstanceAction.objects.get(instance=other, action="live-migration")
    assert refusal.result == "Error" and refusal.message == "destination hv2: host CPU lacks avx2"
    dashboard = staff.get("/admin/dashboard/").content.decode()
    row = dashboard.split('id="migration-', 1)[1].split("</tr>", 1)[0]
    assert all(text in row for text in ("web", "live-migration", "hv1", "hv2", "preparing"))


def checks_pass_for_hv2(outbox) -> None:
    """The hosts' answers to a live migration's pre-flight checks: hv2 takes it, hv1 sends it."""
    outbox.calls[contract.COMPUTE_CHECK_MIGRATE_DESTINATION] = {
        "ok": True, "migration_uri": "qemu+tcp://10.0.0.2/system", "migration_data_uri": "tcp://10.0.0.2",
        "shared_marker": ".shared-x", "disk_free_bytes": 2**40, "image_cached": True, "cpu": "identical"}
    outbox.calls[contract.COMPUTE_CHECK_MIGRATE_SOURCE] = {"ok": True, "shared_storage": False,
                                                           "power_state": "running", "disk_bytes": 1}


def test_a_host_is_emptied_from_the_admin(staff, running, outbox, api, django_capture_on_commit_callbacks):
    heartbeat("hv2")
    heartbeat("hv3")
    checks_pass_for_hv2(outbox)
    hv1, hv3 = Host.objects.get(name="hv1"), Host.objects.get(name="hv3")
    with django_capture_on_commit_callbacks(execute=True):
        page = staff.post(reverse("admin:compute_host_changelist"),
                          {"action": "live_migrate_servers_away", "_selected_action": [hv1.pk, hv3.pk]},
                          follow=True).content.decode()
    migration = Migration.objects.get(instance=running)
    assert f"Web (on hv1): live migration {migration.pk} accepted (checking)" in page
    assert "Host hv3: disabled; no servers to move" in page
    assert migration.batch_limit == 2  # the admin passes no max_servers: EVACUATION_MAX_SERVERS
    with django_capture_on_commit_callbacks(execute=True):
        assert run_preflights(outbox) == ["preparing"]
    running.refresh_from_db()
    assert running.status == "MIGRATING"
    assert Migration.objects.get(instance=running).dest_host.name == "hv2"
    assert not Host.objects.get(name="hv1").enabled


def test_a_running_live_migration_can_be_forced_or_aborted_from_the_admin(
        staff, running, outbox, django_capture_on_commit_callbacks):
    from cloudctl.compute import migration_reports

    heartbeat("hv2")
    checks_pass_for_hv2(outbox)
    with django_capture_on_commit_callbacks(execute=True):
        act(staff, "live-migrate", running)
    with django_capture_on_commit_callbacks(execute=True):
        assert run_preflights(outbox) == ["preparing"]
    migration = Migration.objects.get(instance=running)
    url = reverse("admin:compute_migration_changelist")

    def act_on_migration(action: str) -> str:
        with django_capture_on_commit_callbacks(execute=True):
            return staff.post(url, {"action": action, "_selected_action": [migration.pk]},
                              follow=True).content.decode()

    page = act_on_migration("force_complete")  # still preparing
    assert f"Migration {migration.pk} of web: force-complete refused" in page and "preparing" in page
    for host, status in (("hv2", contract.MIGRATION_PREPARED), ("hv1", contract.MIGRATION_RUNNING)):
        assert migration_reports.migration_update(migration_id=migration.pk, host=host, status=status)
    assert f"Migration {migration.pk} of web: force-complete accepted" in act_on_migration("force_complete")
    assert outbox.compute[-1][:2] == ("hv1", contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE)
    assert f"Migration {migration.pk} of web: abort accepted" in act_on_migration("abort")
    assert outbox.compute[-1][:2] == ("hv1", contract.COMPUTE_ABORT_LIVE_MIGRATION)
    migration.refresh_from_db()
    assert migration.status == "cancelling"
