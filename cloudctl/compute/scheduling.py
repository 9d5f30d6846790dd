"""Scheduling a new server: pick a host, claim it, send the spawn; or end the server in ERROR with
a fault naming the filter that left no host.

Runs in the scheduler's Celery worker (``scheduler/tasks.py`` is the entry point); the control
plane asks for it by task name (``contract.SCHEDULE_INSTANCE``), never by importing the task.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

from cloudctl.compute import placement, rpc
from cloudctl.compute.conductor import current_action, record_event
from cloudctl.compute.models import Instance
from cloudctl.compute.services import finish_action
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import TaskState, VmState
from compute_workers import contract
from compute_workers.contract import ActionResult
from scheduler.selection import NoValidHost

log = logging.getLogger(__name__)


def schedule_instance(instance_uuid: str) -> str | None:
    """Place one instance: returns the host name, or None when it ended in ERROR or is gone."""
    instance = (Instance.objects.select_related("flavor", "image", "server_group")
                .filter(uuid=instance_uuid).first())
    if instance is None or instance.task_state != TaskState.SCHEDULING:
        log.info("not scheduling %s: it is no longer waiting for a host", instance_uuid)
        return None
    spec = placement.request_spec_of(instance)
    try:
        candidates = placement.candidate_hosts(spec, subset_size=settings.SCHEDULER_HOST_SUBSET_SIZE)
        for candidate in candidates:
            # The claim, its event and the spawn spec in one transaction, the spawn sent once it
            # committed: a database lost half-way leaves the server waiting in scheduling (the
            # task's retry places it again), never claimed without its spawn.
            with transaction.atomic():
                if placement.claim(instance_uuid, candidate.name, spec):
                    record_event(instance_uuid, event="schedule", result=ActionResult.SUCCESS,
                                 host=candidate.name, message=f"attempt {len(spec.ignore_hosts) + 1}")
                    instance.refresh_from_db()
                    spawn = spawn_spec(instance, candidate.name)
                    break
            log.info("lost the race for %s on %s; trying the next host", instance_uuid,
                     candidate.name)
        else:
            raise NoValidHost(total_hosts=len(candidates))
    except placement.InstanceGone:
        log.info("%s left scheduling while being placed; nothing claimed", instance_uuid)
        return None
    except NoValidHost as no_host:
        _fail_no_valid_host(instance, no_host)
        return None
    rpc.cast(candidate.name, contract.COMPUTE_SPAWN, spec=spawn)
    return candidate.name


def _fail_no_valid_host(instance: Instance, no_host: NoValidHost) -> None:
    fault = no_host.as_fault()
    with transaction.atomic():
        updated = Instance.objects.filter(
            uuid=instance.uuid, task_state=TaskState.SCHEDULING).change(
            vm_state=VmState.ERROR, task_state=None, fault=fault)
        if not updated:
            return
        # The action and its event are the owner's to read: the message without host names (the
        # fault keeps both; the API shows administrators the one naming the hosts).
        record_event(str(instance.uuid), event="schedule", result=ActionResult.ERROR,
                     message=fault["tenant_message"])
        action = current_action(str(instance.uuid))
        if action is not None:
            finish_action(action, result=ActionResult.ERROR, message=fault["tenant_message"])
