"""The pre-flight checks of a requested migration, off the API's request thread.

A request (:mod:`cloudctl.compute.migration_requests`) puts the server in its task state and the
migration in ``checking``, and sends ``contract.MIGRATION_PREFLIGHT``; the scheduler's worker
(``scheduler/tasks.py``) runs :func:`migration_preflight`: the scheduler's filters and weighers pick
the destinations to try (a named host is still filtered), then per destination its compute worker
and the source's answer (synchronous calls, ``MIGRATION_PRECHECK_TIMEOUT`` each): no domain of the
server there, the CPU, the image, shared storage, disk space. The first destination that passes
and whose claim holds gets the migration: in one transaction the claim, the checks' findings, the
``preflight_checks`` event, status ``preparing`` and the first step sent on commit.

Refused (a check, no host, the claim lost on every candidate): the migration ends ``refused`` with
the reason and ``failed_check``, the action ends in Error, the server goes back to idle exactly as
it was. A migration no longer ``checking`` (aborted meanwhile; a redelivered task) is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cloudctl.compute import placement, ports, rpc, states
from cloudctl.compute.errors import ComputeUnavailable
from cloudctl.compute.migration_batches import migration_locked
from cloudctl.compute.migration_steps import (
    instance_in_task,
    migration_event,
    migration_finish,
    migration_save,
)
from cloudctl.compute.models import Host, Instance, Migration, MigrationType
from cloudctl.compute.models import MigrationStatus as S
from cloudctl.compute.services import GIB
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import VmState
from compute_workers import contract
from compute_workers.contract import ActionResult
from scheduler.host_state import RequestSpec
from scheduler.selection import NoValidHost

log = logging.getLogger(__name__)

# The transition each kind of migration made when it was requested.
RULES: dict[str, states.Transition] = {MigrationType.LIVE: states.LIVE_MIGRATE,
                                       MigrationType.COLD: states.COLD_MIGRATE,
                                       MigrationType.RESIZE: states.RESIZE}


class CheckRefused(Exception):
    """A pre-flight check refused the migration on one destination (or no destination is left)."""

    def __init__(self, check: str, message: str) -> None:
        self.check = check
        super().__init__(message)


def migration_preflight(migration_id: int) -> str:
    """Run the checks of a ``checking`` migration and start it or refuse it. Returns the migration's
    status afterwards, or "" when it was not ``checking`` (nothing done)."""
    migration = (Migration.objects.select_related("instance__host", "instance__flavor", "instance__image",
                                                  "instance__server_group", "source_host", "dest_host",
                                                  "new_flavor")
                 .filter(pk=migration_id).first())
    if migration is None or migration.status != S.CHECKING:
        log.info("pre-flight of migration %s: not checking (%s), nothing to do", migration_id,
                 migration.status if migration else "gone")
        return ""
    instance = migration.instance
    task = RULES[migration.migration_type].to_task_state
    if instance.task_state != task or instance.host_id != migration.source_host_id:
        return _end(migration_id, S.ERROR, "", f"the server left {task} on {migration.source_host} before "
                                               f"the pre-flight checks (now {instance.task_state} on "
                                               f"{instance.host}): nothing was done")
    same_host = migration.migration_type == MigrationType.RESIZE and settings.ALLOW_RESIZE_TO_SAME_HOST
    named = migration.dest_host.name if migration.dest_host else None
    failures: list[str] = []
    check = "scheduler"
    try:
        names, spec = _candidates(instance, migration, named, same_host)
    except CheckRefused as refused:
        return _end(migration_id, S.REFUSED, refused.check, str(refused))
    for name in names:
        dest = Host.objects.get(name=name)
        try:
            answer = _checks(instance, migration, dest)
        except CheckRefused as refused:
            failures.append(str(refused))
            check = refused.check
            continue
        started = _start(migration_id, instance, dest, answer, spec)
        if started is None:
            return ""
        if started:
            return S.PREPARING
        failures.append(f"host {dest.name} no longer has room for flavor {migration.new_flavor.name} "
                        "(claimed concurrently)")
        check = "resources"
    return _end(migration_id, S.REFUSED, check,
                "; ".join(failures) or "No valid host was found for the migration.")


def _candidates(instance: Instance, migration: Migration, named: str | None,
                same_host: bool) -> tuple[list[str], RequestSpec]:
    """Destination hosts to try, best first, and the request they were chosen for (the claim
    re-checks it): the scheduler's filters and weighers over every host (a named host is still
    filtered)."""
    source = instance.host
    assert source is not None
    flavor = migration.new_flavor
    spec = replace(placement.request_spec_of(instance), vcpus=flavor.vcpus, memory_mb=flavor.memory_mb,
                   root_gb=flavor.root_gb, flavor_extra_specs=dict(flavor.extra_specs),
                   ignore_hosts=() if same_host else (source.name,), force_host=named or "")
    try:
        chosen = placement.candidate_hosts(spec, subset_size=1)
    except NoValidHost as no_host:
        raise CheckRefused("scheduler", no_host.message) from None
    return [h.name for h in chosen][: settings.MIGRATION_MAX_ATTEMPTS], spec


def _checks(instance: Instance, migration: Migration, dest: Host) -> dict[str, Any]:
    """The hosts' answers on ``dest``, with the rules of the kind of migration applied."""
    source = instance.host
    assert source is not None
    if migration.migration_type != MigrationType.LIVE:
        answer = _ask_hosts(instance, dest, live=False)
        if not answer["shared_storage"] and dest.pk != instance.host_id:
            _check_disk_space(instance, dest, answer)
        return answer
    answer = _ask_hosts(instance, dest, live=True)
    shared = bool(answer["shared_storage"])
    requested = migration.block_migration  # None: "auto"
    if requested is True and shared:
        raise CheckRefused("block_migration", f"hosts {source.name} and {dest.name} share the instance "
                                              "storage: a block migration would copy the disk onto "
                                              "itself; use false or auto")
    if requested is False and not shared:
        raise CheckRefused("shared_storage", f"hosts {source.name} and {dest.name} do not share the "
                                             "instance storage: the disk must be copied (block_migration "
                                             "true or auto)")
    answer["block_migration"] = not shared
    if not shared:
        _check_disk_space(instance, dest, answer)
    return answer


def _ask_hosts(instance: Instance, dest: Host, *, live: bool) -> dict[str, Any]:
    """The destination's then the source's checks (synchronous calls). Raises CheckRefused."""
    source = instance.host
    assert source is not None
    if not dest.is_up:
        raise CheckRefused("destination", f"host {dest.name} is down")
    if dest.pk == source.pk:  # a resize on its own host: the disk stays where it is
        return {"ok": True, "migration_uri": "", "shared_storage": True, "image_cached": True,
                "disk_bytes": 0, "disk_free_bytes": 0, "cpu": "skipped"}
    timeout = settings.MIGRATION_PRECHECK_TIMEOUT
    try:
        answer = rpc.call(dest.name, contract.COMPUTE_CHECK_MIGRATE_DESTINATION, timeout=timeout,
                          instance_uuid=str(instance.uuid), source_host=source.name,
                          source_cpu_info=source.cpu_info or {},
                          image=spawn_spec(instance, dest.name)["image"], live=live)
    except ComputeUnavailable as exc:
        raise CheckRefused("destination", str(exc)) from None
    if not answer.get("ok"):
        raise CheckRefused(str(answer.get("check") or "destination"),
                           f"destination {dest.name}: {answer.get('message', 'refused')}")
    try:
        source_answer = rpc.call(source.name, contract.COMPUTE_CHECK_MIGRATE_SOURCE, timeout=timeout,
                                 instance_uuid=str(instance.uuid),
                                 shared_marker=answer.get("shared_marker") or "")
    except ComputeUnavailable as exc:
        raise CheckRefused("source", str(exc)) from None
    if not source_answer.get("ok"):
        raise CheckRefused(str(source_answer.get("check") or "source"),
                           f"source {source.name}: {source_answer.get('message', 'refused')}")
    return {**answer, **source_answer}


def _check_disk_space(instance: Instance, dest: Host, answer: dict[str, Any]) -> None:
    image_bytes = 0 if answer.get("image_cached") or instance.image is None else (instance.image.size or 0)
    needed = int(answer.get("disk_bytes") or 0) + image_bytes
    free = int(answer.get("disk_free_bytes") or 0)
    if needed > free:
        raise CheckRefused("disk", f"host {dest.name} has {free / GIB:.2f} GiB free for instances; the "
                                   f"disk to copy needs {needed / GIB:.2f} GiB")


def _checks_message(answer: dict[str, Any]) -> str:
    parts = [f"cpu {answer.get('cpu', 'skipped')}",
             "shared storage" if answer.get("shared_storage") else "no shared storage",
             f"image {'cached' if answer.get('image_cached') else 'fetchable'}"]
    if "block_migration" in answer:
        parts.append("block migration" if answer["block_migration"] else "memory only")
    return "pre-flight checks passed: " + ", ".join(parts)


def _start(migration_id: int, instance: Instance, dest: Host, answer: dict[str, Any],
           spec: RequestSpec) -> bool | None:
    """In one transaction: the claim on ``dest``, what the checks found, the first step sent on
    commit. True: started; False: the claim was lost (nothing written); None: the migration is no
    longer ``checking`` (aborted during the checks: nothing claimed)."""
    with transaction.atomic():
        migration = migration_locked(migration_id, (S.CHECKING,))
        if migration is None:
            log.info("pre-flight of migration %s: aborted during the checks", migration_id)
            return None
        if not placement.claim_move(str(instance.uuid), dest.name, spec, migration.pk):
            return False
        migration_event(migration, "preflight_checks", ActionResult.SUCCESS, _checks_message(answer),
                        host=dest.name)
        if migration.migration_type == MigrationType.LIVE:
            _start_live(migration, instance, dest, answer)
        else:
            _start_cold(migration, instance, dest, answer)
    return True


def _start_live(migration: Migration, instance: Instance, dest: Host, answer: dict[str, Any]) -> None:
    data_gib = instance.memory_mb / 1024 + (answer["disk_bytes"] / GIB if answer["block_migration"] else 0)
    migration_save(migration, dest_host=dest, status=S.PREPARING, block_migration=answer["block_migration"],
                   shared_storage=bool(answer["shared_storage"]), migration_uri=answer["migration_uri"],
                   migration_data_uri=answer.get("migration_data_uri") or "",
                   completion_timeout=max(1, round(settings.LIVE_MIGRATION_COMPLETION_TIMEOUT
                                                   * max(data_gib, 1 / 1024))))
    # The destination holds the ports from now on (its network state carries them with their
    # filtering, the other hosts flood to it): the sync goes before pre_live_migration, at commit.
    ports.server_ports_migrating(instance.uuid, dest.name)
    kwargs = {"instance_uuid": str(instance.uuid), "migration_id": migration.pk,
              "spec": spawn_spec(instance, dest.name),
              "block_migration": migration.block_migration,
              "shared_storage": migration.shared_storage,
              "shared_marker": answer.get("shared_marker") or ""}
    transaction.on_commit(lambda: rpc.cast(dest.name, contract.COMPUTE_PRE_LIVE_MIGRATION, **kwargs))


def _start_cold(migration: Migration, instance: Instance, dest: Host, answer: dict[str, Any]) -> None:
    migration_save(migration, dest_host=dest, status=S.PREPARING,
                   shared_storage=bool(answer["shared_storage"]) or dest.pk == instance.host_id,
                   migration_uri=answer["migration_uri"], power_on=instance.vm_state == VmState.ACTIVE)
    kwargs = {"instance_uuid": str(instance.uuid), "migration_id": migration.pk,
              "spec": spawn_spec(instance, dest.name, migration.new_flavor),
              "shared_marker": answer.get("shared_marker") or ""}
    transaction.on_commit(lambda: rpc.cast(dest.name, contract.COMPUTE_PREP_RESIZE, **kwargs))


def _end(migration_id: int, status: str, check: str, message: str) -> str:
    """End a ``checking`` migration that never started (``refused``: a check said no; ``error``: the
    server left its task meanwhile): the server back to idle as it was, nothing claimed."""
    with transaction.atomic():
        migration = migration_locked(migration_id, (S.CHECKING,))
        if migration is None:
            return ""
        instance_in_task(migration, RULES[migration.migration_type].to_task_state).filter(
            host_id=migration.source_host_id).change(task_state=None)
        migration_save(migration, status=status, error=message, failed_check=check,
                       finished_at=timezone.now())
        migration_event(migration, "preflight_checks", ActionResult.ERROR, message)
        migration_finish(migration, ActionResult.ERROR, message)
    log.info("pre-flight of migration %s: %s (%s) %s", migration_id, status, check, message)
    return status
