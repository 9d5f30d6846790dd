"""Reports authenticated per host: what a forged conductor.* message gets (nothing), what a signed one
from the right host gets (applied), how a new host joins, and how a key is rotated or revoked.

Reports are delivered the way the conductor's worker runs them (``task.apply`` with the message
headers: the Celery request, not a direct call), signed as a compute worker's CeleryReporter signs.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from cloudctl.compute import host_keys
from cloudctl.compute import tasks as conductor_tasks
from cloudctl.compute.conductor import NEW_HOST_REASON
from cloudctl.compute.models import Host, Instance, InstanceAction
from cloudctl.compute.scheduling import schedule_instance
from cloudctl.compute.services import server_create, server_delete
from cloudctl.compute.states import TaskState, VmState
from compute_workers import contract, credentials

from .conftest import heartbeat
from .test_settings_from_env import REPO

SPAWNED = {"vm_state": "active", "task_state": None, "power_state": "running"}


def key(host: str) -> str:
    """The key host_credentials issues to ``host`` now (what its COMPUTE_HOST_KEY holds)."""
    return host_keys.host_credentials(name=host).key


def deliver(task: Any, kwargs: dict[str, Any], *, signer: str | None = None, with_key: str | None = None,
            at: float | None = None, args: tuple[Any, ...] = ()) -> Any:
    """Run conductor task ``task`` as its worker runs a message from the broker: signed by host
    ``signer`` with ``with_key`` (default: the signer's key), at time ``at`` (default: now); unsigned
    when no signer is given. Returns the task's result (None when the report was dropped)."""
    headers: dict[str, str] = {}
    if signer is not None:
        sent = time.time() if at is None else at
        headers = credentials.sign(with_key or key(signer), task.name, signer, kwargs, now=lambda: sent)
    result = task.apply(args=args, kwargs=kwargs, headers=headers)
    return result.get(propagate=True)


@pytest.fixture
def spawning(member, project, flavors, image, outbox) -> Instance:
    """A server placed on hv1 (hv2 up beside it), its spawn under way."""
    heartbeat("hv1")
    heartbeat("hv2")
    server = server_create(user=member, project=project, name="s", flavor=flavors["m1.nano"], image=image)
    assert schedule_instance(str(server.uuid)) in ("hv1", "hv2")
    Instance.objects.filter(pk=server.pk).update(host=Host.objects.get(name="hv1"))
    server.refresh_from_db()
    return server


@pytest.fixture
def deleting(spawning: Instance, member, outbox) -> Instance:
    conductor_tasks.instance_update(instance_uuid=str(spawning.uuid), host="hv1",
                                    expected_task_state="spawning", values=SPAWNED)
    assert server_delete(instance=spawning, user=member) is False
    spawning.refresh_from_db()
    assert spawning.task_state == TaskState.DELETING
    return spawning


def state(server: Instance) -> tuple[str, str | None]:
    server.refresh_from_db()
    return server.vm_state, server.task_state


def forgeries(signer_host: str) -> list[tuple[str, dict[str, Any]]]:
    """The ways to forge a report that the instance's host ``signer_host`` did not send: (label,
    deliver() options)."""
    now = time.time()
    return [
        ("unsigned", {}),
        ("another key", {"signer": signer_host, "with_key": credentials.host_key("guessed", signer_host, 1)}),
        ("hv2's own key, hv1's name", {"signer": "hv2"}),
        ("replayed 10 minutes later", {"signer": signer_host, "at": now - 600}),
        ("dated in the future", {"signer": signer_host, "at": now + 600}),
    ]


def test_a_forged_instance_destroyed_does_not_finish_a_delete(deleting: Instance, caplog) -> None:
    kwargs = {"instance_uuid": str(deleting.uuid), "host": "hv1"}
    caplog.set_level(logging.WARNING, logger="cloudctl.compute.host_keys")
    before = dict(host_keys.rejected_reports)
    for label, options in forgeries("hv1"):
        assert deliver(conductor_tasks.instance_destroyed, kwargs, **options) is None, label
        assert state(deleting) == (VmState.ACTIVE, TaskState.DELETING), label
    assert host_keys.rejected_reports[contract.CONDUCTOR_INSTANCE_DESTROYED] - \
        before.get(contract.CONDUCTOR_INSTANCE_DESTROYED, 0) == 5
    reasons = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(reasons) == 5
    assert "unsigned" in reasons[0]
    assert "bad signature for host 'hv1'" in reasons[1]
    assert "signed by host 'hv2' but speaks for host 'hv1'" in reasons[2]
    assert "a replay or a wrong clock" in reasons[3] and "a replay or a wrong clock" in reasons[4]
    # Positional arguments are not covered by a signature: refused even with a valid one.
    assert deliver(conductor_tasks.instance_destroyed, {"host": "hv1"}, signer="hv1",
                   args=(str(deleting.uuid),)) is None
    # hv2 signing for itself: authentic, but the server is not on hv2, so nothing happens either.
    deliver(conductor_tasks.instance_destroyed, {**kwargs, "host": "hv2"}, signer="hv2")
    assert state(deleting) == (VmState.ACTIVE, TaskState.DELETING)
    # The real report of hv1 finishes the delete.
    deliver(conductor_tasks.instance_destroyed, kwargs, signer="hv1")
    assert state(deleting) == (VmState.DELETED, None)


def test_a_forged_instance_update_changes_nothing(spawning: Instance) -> None:
    kwargs = {"instance_uuid": str(spawning.uuid), "host": "hv1", "expected_task_state": "spawning",
              "values": {"vm_state": "error", "task_state": None, "power_state": "nostate"},
              "fault": {"message": "forged", "code": 500, "details": ""}}
    for label, options in forgeries("hv1"):
        assert deliver(conductor_tasks.instance_update, kwargs, **options) is None, label
        assert state(spawning) == (VmState.BUILDING, TaskState.SPAWNING), label
    # Signed by hv2 for itself: the server is not on hv2.
    assert deliver(conductor_tasks.instance_update, {**kwargs, "host": "hv2"}, signer="hv2") is False
    assert state(spawning) == (VmState.BUILDING, TaskState.SPAWNING)
    # A signature covers the arguments: hv1's signature of another report does not carry this one.
    signed = credentials.sign(key("hv1"), contract.CONDUCTOR_INSTANCE_UPDATE, "hv1",
                              {**kwargs, "values": SPAWNED})
    assert conductor_tasks.instance_update.apply(kwargs=kwargs, headers=signed).get() is None
    assert state(spawning) == (VmState.BUILDING, TaskState.SPAWNING)
    assert deliver(conductor_tasks.instance_update, {**kwargs, "values": SPAWNED, "fault": None},
                   signer="hv1") is True
    assert state(spawning) == (VmState.ACTIVE, None)
    assert InstanceAction.objects.get(instance=spawning).result == contract.ActionResult.SUCCESS


def test_a_forged_build_failed_neither_reschedules_nor_errors_the_server(spawning: Instance, outbox) -> None:
    kwargs = {"instance_uuid": str(spawning.uuid), "host": "hv1", "reschedule": False,
              "fault": {"message": "forged", "code": 500, "details": ""}}
    for label, options in forgeries("hv1"):
        assert deliver(conductor_tasks.build_failed, kwargs, **options) is None, label
        assert state(spawning) == (VmState.BUILDING, TaskState.SPAWNING), label
    deliver(conductor_tasks.build_failed, {**kwargs, "host": "hv2"}, signer="hv2")
    assert state(spawning) == (VmState.BUILDING, TaskState.SPAWNING)
    deliver(conductor_tasks.build_failed, kwargs, signer="hv1")
    assert state(spawning) == (VmState.ERROR, None)


def _resources(**changes: Any) -> dict[str, Any]:
    resources = {"libvirt_uri": "qemu:///system", "driver": "libvirt", "virt_type": "kvm",
                 "hypervisor_type": "QEMU", "hypervisor_version": 7002000, "vcpus": 512,
                 "memory_mb": 4_000_000, "memory_mb_reserved": 0, "disk_gb": 100_000, "disk_gb_reserved": 0,
                 "cpu_info": {"arch": "x86_64"}, "instances": {}, "observed_at": time.time(), "tunnel_ip": ""}
    return {**resources, **changes}


def test_a_forged_heartbeat_neither_registers_nor_resizes_nor_empties_a_host(spawning: Instance) -> None:
    """A heartbeat under hv1's name claiming a huge host without its server (which would push the server
    to ERROR through the sync), or registering a host nobody added: dropped."""
    hv1 = Host.objects.get(name="hv1")
    conductor_tasks.instance_update(instance_uuid=str(spawning.uuid), host="hv1",
                                    expected_task_state="spawning", values=SPAWNED)
    forged = {"host": "hv1", "resources": _resources()}
    for label, options in forgeries("hv1"):
        assert deliver(conductor_tasks.host_heartbeat, forged, **options) is None, label
        assert deliver(conductor_tasks.host_init, forged, **options) is None, label
    assert Host.objects.get(name="hv1").memory_mb == hv1.memory_mb == 8192
    assert state(spawning) == (VmState.ACTIVE, None)
    rogue = {"host": "rogue", "resources": _resources()}
    assert deliver(conductor_tasks.host_heartbeat, rogue) is None
    assert deliver(conductor_tasks.host_heartbeat, rogue, signer="hv2") is None
    assert not Host.objects.filter(name="rogue").exists()
    # hv1's own heartbeat is applied.
    deliver(conductor_tasks.host_heartbeat, {"host": "hv1", "resources": _resources(
        memory_mb=16384, instances={str(spawning.uuid): "running"})}, signer="hv1")
    assert Host.objects.get(name="hv1").memory_mb == 16384


def test_power_state_and_migration_reports_need_the_hosts_signature(spawning: Instance) -> None:
    conductor_tasks.instance_update(instance_uuid=str(spawning.uuid), host="hv1",
                                    expected_task_state="spawning", values=SPAWNED)
    kwargs = {"host": "hv1", "instance_uuid": str(spawning.uuid), "power_state": "shutdown",
              "observed_at": time.time()}
    for label, options in forgeries("hv1"):
        assert deliver(conductor_tasks.power_state_update, kwargs, **options) is None, label
    assert deliver(conductor_tasks.host_stopping, {"host": "hv1"}) is None
    assert deliver(conductor_tasks.migration_update, {"migration_id": 1, "host": "hv1",
                                                      "status": "completed"}) is None
    assert deliver(conductor_tasks.migration_progress, {"migration_id": 1, "host": "hv1",
                                                        "progress": {}}, signer="hv2") is None
    spawning.refresh_from_db()
    assert spawning.power_state == "running" and Host.objects.get(name="hv1").is_up


def test_a_new_host_joins_disabled_unless_trusted(settings, db) -> None:
    settings.COMPUTE_TRUSTED_HOSTS = ["devbox", "rack1-*"]
    for name in ("newcomer", "devbox", "rack1-07"):
        deliver(conductor_tasks.host_init, {"host": name, "resources": _resources()}, signer=name)
    newcomer = Host.objects.get(name="newcomer")
    assert (newcomer.enabled, newcomer.disabled_reason, newcomer.is_up) == (False, NEW_HOST_REASON, True)
    assert Host.objects.get(name="devbox").enabled and Host.objects.get(name="rack1-07").enabled
    # Its next heartbeats leave it disabled; an admin enables it.
    deliver(conductor_tasks.host_heartbeat, {"host": "newcomer", "resources": _resources()},
            signer="newcomer")
    assert not Host.objects.get(name="newcomer").enabled


def test_the_default_trusts_only_the_host_make_run_configures(tmp_path) -> None:
    code = "from django.conf import settings; print(settings.COMPUTE_TRUSTED_HOSTS)"
    env = {k: v for k, v in os.environ.items() if k not in ("COMPUTE_HOST", "COMPUTE_TRUSTED_HOSTS")}
    env.update(CLOUDCTL_STATE_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="cloudctl.settings")
    run = [sys.executable, "-c", f"import django; django.setup(); {code}"]
    assert subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    assert subprocess.run(run, cwd=REPO, env={**env, "COMPUTE_HOST": "hv7"}, capture_output=True, text=True,
                          check=True).stdout.strip() == "['hv7']"


def test_rotation_refuses_the_old_key_and_revocation_disables_the_host(spawning: Instance) -> None:
    old = key("hv1")
    stdout = io.StringIO()
    call_command("host_credentials", "hv1", "--rotate", stdout=stdout, stderr=io.StringIO())
    lines = stdout.getvalue().splitlines()
    assert lines[0] == "COMPUTE_HOST=hv1" and lines[1].startswith("COMPUTE_HOST_KEY=")
    new = lines[1].removeprefix("COMPUTE_HOST_KEY=")
    assert new != old and Host.objects.get(name="hv1").key_generation == 2
    kwargs = {"instance_uuid": str(spawning.uuid), "host": "hv1", "expected_task_state": "spawning",
              "values": SPAWNED}
    assert deliver(conductor_tasks.instance_update, kwargs, signer="hv1", with_key=old) is None
    assert state(spawning) == (VmState.BUILDING, TaskState.SPAWNING)
    assert deliver(conductor_tasks.instance_update, kwargs, signer="hv1", with_key=new) is True
    call_command("host_credentials", "hv1", "--revoke", stdout=stdout, stderr=io.StringIO())
    hv1 = Host.objects.get(name="hv1")
    assert (hv1.enabled, hv1.disabled_reason, hv1.key_generation) == (False, "host key revoked", 3)
    assert deliver(conductor_tasks.host_heartbeat, {"host": "hv1", "resources": _resources()}, signer="hv1",
                   with_key=new) is None


def test_host_credentials_of_a_host_not_yet_joined(db, settings) -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command("host_credentials", "hv9", stdout=stdout, stderr=stderr)
    assert stdout.getvalue() == (f"COMPUTE_HOST=hv9\nCOMPUTE_HOST_KEY="
                                 f"{credentials.host_key(settings.CLOUDCTL_HOST_KEY_SECRET, 'hv9', 1)}\n")
    assert "has not joined yet" in stderr.getvalue() and not Host.objects.filter(name="hv9").exists()
    quiet, silent = io.StringIO(), io.StringIO()  # -v 0, as tools/run.sh asks: the lines alone
    call_command("host_credentials", "hv9", verbosity=0, stdout=quiet, stderr=silent)
    assert quiet.getvalue() == stdout.getvalue() and silent.getvalue() == ""
    # Rotated before it joined: registered disabled, so that the first key stays refused.
    call_command("host_credentials", "hv9", "--rotate", stdout=io.StringIO(), stderr=io.StringIO())
    assert Host.objects.filter(name="hv9", key_generation=2, enabled=False).exists()
    with pytest.raises(CommandError, match="invalid host name"):
        call_command("host_credentials", "two words", stdout=io.StringIO(), stderr=io.StringIO())


def test_a_host_awaiting_trust_cannot_take_a_server_by_claiming_its_domain(spawning: Instance,
                                                                          settings) -> None:
    """The sync moves a server whose domain left its host to the one host that reports it (a finished
    live migration)... but not to a newcomer nobody trusted yet, which could claim any uuid."""
    from django.utils import timezone

    from cloudctl.compute import conductor, sync

    conductor_tasks.instance_update(instance_uuid=str(spawning.uuid), host="hv1",
                                    expected_task_state="spawning", values=SPAWNED)
    settings.COMPUTE_TRUSTED_HOSTS = []
    deliver(conductor_tasks.host_init, {"host": "stranger", "resources": _resources(
        instances={str(spawning.uuid): "running"})}, signer="stranger")
    assert Host.objects.get(name="stranger").awaiting_trust
    source = heartbeat("hv1", instances={})
    sync.sync_host(source, {}, conductor.observed_at_of({"observed_at": timezone.now().timestamp() + 1}))
    spawning.refresh_from_db()
    assert spawning.host.name == "hv1" and spawning.vm_state == VmState.ERROR  # gone, not adopted
    assert not spawning.actions.filter(events__event="domain_found_elsewhere").exists()
