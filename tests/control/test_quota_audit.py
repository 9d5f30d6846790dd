"""manage.py quota_audit: usage against limits per project, projects over a lowered limit, and drift
between servers and their placement claims (exit status 1)."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from cloudctl.compute.models import Allocation, Instance
from cloudctl.compute.services import mark_deleted
from cloudctl.quotas.models import ProjectQuota
from tests.control.conftest import Outbox, active_server

pytestmark = pytest.mark.django_db


def audit() -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("quota_audit", stdout=out)
    except SystemExit as exit_:
        return int(exit_.code or 0), out.getvalue()
    return 0, out.getvalue()


def test_a_clean_setup_has_no_drift(api, project, flavors, image, outbox: Outbox):
    active_server(api, outbox, "a")
    active_server(api, outbox, "b")
    assert Allocation.objects.count() == 2
    status, output = audit()
    assert status == 0, output
    assert "project blue" in output
    assert "instances" in output and "2 / 10" in output
    assert "no drift, no project over a limit" in output


def test_a_deleted_server_still_holding_its_claim_is_drift(api, project, flavors, image,
                                                          outbox: Outbox):
    server = active_server(api, outbox)
    claim = Allocation.objects.get(instance=server)
    mark_deleted(server)
    assert not Allocation.objects.exists()
    claim.pk = None
    claim.save()  # the planted leak: a claim without a live server
    status, output = audit()
    assert status == 1
    assert f"drift: placement: claim {claim.pk} on host hv1 (1 vCPU, 128 MiB) belongs to server " \
           f"{server.uuid}, which is deleted" in output


def test_a_server_without_its_claim_is_drift(api, project, flavors, image, outbox: Outbox):
    server = active_server(api, outbox)
    Allocation.objects.filter(instance=server).delete()
    status, output = audit()
    assert status == 1
    assert f"server {server.uuid} (active) runs on host hv1 without a claim there" in output


def test_an_error_server_whose_build_failed_is_not_drift(api, project, flavors, image, outbox: Outbox):
    server = active_server(api, outbox)
    Allocation.objects.filter(instance=server).delete()
    Instance.objects.filter(uuid=server.uuid).update(vm_state="error")
    assert audit()[0] == 0


def test_a_project_over_a_lowered_limit_is_reported_not_drift(api, project, flavors, image,
                                                              outbox: Outbox):
    active_server(api, outbox, "a")
    active_server(api, outbox, "b")
    ProjectQuota.objects.create(project=project, resource="instances", limit=1)
    status, output = audit()
    assert status == 0
    assert "2 / 1" in output and "OVER LIMIT" in output
    assert "over limit: project blue: instances 2 in use over its limit 1" in output


def test_a_source_claim_kept_after_its_migration_ended_is_drift(api, project, flavors, image,
                                                               outbox: Outbox):
    from cloudctl.compute.models import Migration, MigrationStatus, MigrationType

    server = active_server(api, outbox)
    migration = Migration.objects.create(instance=server, migration_type=MigrationType.COLD,
                                         status=MigrationStatus.CONFIRMED, source_host=server.host,
                                         old_flavor=server.flavor, new_flavor=server.flavor)
    leaked = Allocation.objects.create(instance=server, host=server.host, migration=migration,
                                       vcpus=1, memory_mb=128, disk_gb=1)
    status, output = audit()
    assert status == 1
    assert (f"claim {leaked.pk} on host hv1 is held for migration {migration.pk} of server "
            f"{server.uuid}, which ended confirmed") in output
    Migration.objects.filter(pk=migration.pk).update(status=MigrationStatus.FINISHED)
    assert audit()[0] == 0, "while the resize waits for confirm, the source claim is held rightly"


def test_the_usage_table_of_one_project(api, project, other_project, flavors, image, outbox: Outbox):
    from django.core.management.base import CommandError

    active_server(api, outbox)
    out = StringIO()
    call_command("quota_audit", "--project", "blue", stdout=out)
    assert "project blue" in out.getvalue() and "project green" not in out.getvalue()
    with pytest.raises(CommandError, match="no project 'nowhere'"):
        call_command("quota_audit", "--project", "nowhere")
