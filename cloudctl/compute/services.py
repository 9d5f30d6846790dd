"""Server operations requested by users: one function per operation, called by every interface.

Each operation is: validate, one compare-and-swap state transition (the loser of a race gets
:class:`~cloudctl.compute.errors.ServerInvalidState`, i.e. 409), an InstanceAction row, and a task
sent on commit.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from cloudctl.compute import ports, quota_usage, rpc, selectors, states
from cloudctl.compute.errors import (
    HostUnavailable,
    InvalidRequest,
    ServerConsoleUnavailable,
    ServerInvalidState,
)
from cloudctl.compute.models import (
    Aggregate,
    Allocation,
    Flavor,
    Host,
    Instance,
    InstanceAction,
    ServerGroup,
)
from cloudctl.compute.specs import spawn_spec
from cloudctl.compute.states import DELETE, PowerState, TaskState, Transition, VmState
from cloudctl.identity.models import Project
from cloudctl.images.models import Image, ImageStatus
from cloudctl.images.services import image_create, image_kill
from compute_workers import contract
from compute_workers.contract import ActionResult

log = logging.getLogger(__name__)

GIB = 1024**3


def new_request_id() -> str:
    return f"req-{uuid.uuid4()}"


def action_start(*, instance: Instance, action: str, user: Any, request_id: str,
                 project: Project | None = None) -> InstanceAction:
    return InstanceAction.objects.create(
        instance=instance, action=action, request_id=request_id,
        user=user if getattr(user, "pk", None) else None,
        project=project or instance.project,
    )


def transition(instance: Instance, rule: Transition, **values: Any) -> Instance:
    """Compare-and-swap the instance into ``rule.to_task_state`` or raise ServerInvalidState.

    One conditional UPDATE: of two concurrent requests exactly one matches the row.
    """
    allowed_task = Q(task_state__in=[s for s in rule.from_task_states if s is not None])
    if None in rule.from_task_states:
        allowed_task |= Q(task_state__isnull=True)
    updated = (Instance.objects
               .filter(allowed_task, uuid=instance.uuid, vm_state__in=rule.from_vm_states)
               .change(task_state=rule.to_task_state, **values))
    instance.refresh_from_db()
    if updated != 1:
        raise ServerInvalidState(instance, rule.action)
    return instance


def _check_boot_fit(flavor: Flavor, image: Image) -> None:
    if image.status != ImageStatus.ACTIVE:
        raise InvalidRequest("image", f"image {image.name} is {image.status}, not active")
    if flavor.memory_mb < image.min_ram:
        raise InvalidRequest("flavor", f"flavor {flavor.name} has {flavor.memory_mb} MiB RAM; "
                                       f"image {image.name} needs at least {image.min_ram} MiB")
    if flavor.root_gb < image.min_disk:
        raise InvalidRequest("flavor", f"flavor {flavor.name} has a {flavor.root_gb} GiB disk; "
                                       f"image {image.name} needs at least {image.min_disk} GiB")
    if image.virtual_size and image.virtual_size > flavor.root_gb * GIB:
        raise InvalidRequest("flavor", f"image {image.name} is {image.virtual_size / GIB:.2f} GiB, "
                                       f"larger than flavor {flavor.name}'s {flavor.root_gb} GiB disk")


def server_create(*, user: Any, project: Project, name: str, flavor: Flavor, image: Image,
                  availability_zone: str = "", server_group: ServerGroup | None = None,
                  same_host: list[str] | None = None, different_host: list[str] | None = None,
                  host: str = "", request_id: str | None = None,
                  networks: str | list[ports.NetworkRequest] | None = None) -> Instance:
    """Record a new server (BUILD/scheduling) with its ports and ask the scheduler to place it.

    ``networks``: see :func:`cloudctl.compute.ports.requested_networks`. The ports are created (or
    the given ones bound) in the server's transaction: a refused port refuses the server, and
    nothing of the request is left. Over a quota (instances, cores, ram, the group's members, ports):
    :class:`~cloudctl.errors.QuotaExceeded`, nothing created."""
    _check_boot_fit(flavor, image)
    if availability_zone and availability_zone not in selectors.availability_zones():
        raise InvalidRequest("availability_zone", f"no availability zone {availability_zone!r}")
    if host and not Host.objects.filter(name=host).exists():
        raise InvalidRequest("host", f"no host {host!r}")
    if server_group is not None and server_group.project_id != project.pk:
        raise InvalidRequest("scheduler_hints", "the server group belongs to another project")
    hints = {key: [str(v) for v in value] for key, value in
             (("same_host", same_host), ("different_host", different_host)) if value}
    with transaction.atomic():
        # The project's row is locked and its usage counted here, before anything is inserted: the
        # ports below are checked against the ports quota in the same turn.
        quota_usage.enforce_server_create(project=project, flavor=flavor, server_group=server_group)
        instance = Instance.objects.create(
            name=name, project=project, user=user, flavor=flavor, image=image,
            vcpus=flavor.vcpus, memory_mb=flavor.memory_mb, root_gb=flavor.root_gb,
            availability_zone=availability_zone, server_group=server_group,
            scheduler_hints=hints, requested_host=host,
            vm_state=VmState.BUILDING, task_state=TaskState.SCHEDULING,
            power_state=PowerState.NOSTATE,
        )
        ports.server_ports_create(
            instance=instance, user=user,
            requests=ports.requested_networks(project=project, networks=networks))
        action_start(instance=instance, action="create", user=user,
                     request_id=request_id or new_request_id())
        transaction.on_commit(lambda: rpc.send_to_scheduler(
            contract.SCHEDULE_INSTANCE, instance_uuid=str(instance.uuid)))
    return instance


def server_delete(*, instance: Instance, user: Any, request_id: str | None = None) -> bool:
    """Start deleting a server. Returns True when it is already gone (it had no host).

    A server placed on a host is destroyed there by its compute worker, which reports back to the
    conductor (:func:`cloudctl.compute.conductor.instance_destroyed`).
    """
    with transaction.atomic():
        previous_task = instance.task_state
        transition(instance, DELETE)
        # The delete replaces the task in flight (a build, a stop, a snapshot...): its report will be
        # dropped as stale, so its action ends here or never does.
        end_running_actions(instance, "superseded by a delete of the server"
                            + (f" during {previous_task}" if previous_task else ""))
        action = action_start(instance=instance, action="delete", user=user,
                              request_id=request_id or new_request_id())
        if instance.host is None or not instance.host.is_up:
            # Nova's local delete: nothing can be asked of a host that is down. Its domain, if
            # any, is removed when the host heartbeats again (conductor reaps deleted servers).
            if instance.host is not None:
                record_local_delete(action, instance.host)
            mark_deleted(instance)
            finish_action(action, result=ActionResult.SUCCESS)
            return True
        host_name = instance.host.name
        transaction.on_commit(lambda: rpc.cast(
            host_name, contract.COMPUTE_TERMINATE, instance_uuid=str(instance.uuid)))
    return False


def record_local_delete(action: InstanceAction, host: Host) -> None:
    now = timezone.now()
    action.events.create(event="local_delete", result=ActionResult.SUCCESS, host=host.name, start_time=now,
                         finish_time=now,
                         message=f"host {host.name} is down: deleted here; its domain is removed "
                                 "when the host comes back")


def mark_deleted(instance: Instance) -> None:
    """Final step of every delete: the row stays as history, its claim is released, the ports it
    created are deleted and the ports it was given are unbound."""
    Allocation.objects.filter(instance=instance).delete()
    ports.server_ports_release(instance.uuid)
    Instance.objects.filter(uuid=instance.uuid).change(
        vm_state=VmState.DELETED, task_state=None, power_state=PowerState.NOSTATE,
        deleted_at=timezone.now())
    instance.refresh_from_db()


def require_host_up(instance: Instance, action: str) -> Host:
    if instance.host is None:
        raise HostUnavailable(instance, f"cannot {action} server {instance.uuid}: it is on no host")
    if not instance.host.is_up:
        seen = instance.host.last_heartbeat.isoformat() if instance.host.last_heartbeat else "never"
        raise HostUnavailable(instance, f"cannot {action} server {instance.uuid}: its host "
                                        f"{instance.host.name} is down (last heartbeat {seen})")
    return instance.host


def _server_operation(*, instance: Instance, user: Any, rule: Transition, task_name: str,
                      request_id: str | None, **task_kwargs: Any) -> InstanceAction:
    """The one path of every lifecycle action: host check, compare-and-swap into the task state,
    an action record, and the compute task sent when the transaction commits."""
    host = require_host_up(instance, rule.action)
    with transaction.atomic():
        transition(instance, rule)
        action = action_start(instance=instance, action=rule.action, user=user,
                              request_id=request_id or new_request_id())
        kwargs = {"instance_uuid": str(instance.uuid), "action_id": action.pk, **task_kwargs}
        transaction.on_commit(lambda: rpc.cast(host.name, task_name, **kwargs))
    return action


def server_reboot(*, instance: Instance, user: Any, reboot_type: str,
                  request_id: str | None = None) -> InstanceAction:
    hard = reboot_type == contract.REBOOT_HARD
    return _server_operation(instance=instance, user=user,
                             rule=states.REBOOT_HARD if hard else states.REBOOT_SOFT,
                             task_name=contract.COMPUTE_REBOOT, request_id=request_id,
                             reboot_type=reboot_type,
                             spec=spawn_spec(instance, instance.host.name) if instance.host else {})


def server_stop(*, instance: Instance, user: Any, request_id: str | None = None) -> InstanceAction:
    return _server_operation(instance=instance, user=user, rule=states.STOP,
                             task_name=contract.COMPUTE_POWER_OFF, request_id=request_id,
                             timeout=settings.CLEAN_SHUTDOWN_TIMEOUT)


def server_start(*, instance: Instance, user: Any, request_id: str | None = None) -> InstanceAction:
    return _server_operation(instance=instance, user=user, rule=states.START,
                             task_name=contract.COMPUTE_POWER_ON, request_id=request_id,
                             spec=spawn_spec(instance, instance.host.name) if instance.host else {})


def server_pause(*, instance: Instance, user: Any, request_id: str | None = None) -> InstanceAction:
    return _server_operation(instance=instance, user=user, rule=states.PAUSE,
                             task_name=contract.COMPUTE_PAUSE, request_id=request_id)


def server_unpause(*, instance: Instance, user: Any,
                   request_id: str | None = None) -> InstanceAction:
    return _server_operation(instance=instance, user=user, rule=states.UNPAUSE,
                             task_name=contract.COMPUTE_UNPAUSE, request_id=request_id)


def server_suspend(*, instance: Instance, user: Any,
                   request_id: str | None = None) -> InstanceAction:
    return _server_operation(instance=instance, user=user, rule=states.SUSPEND,
                             task_name=contract.COMPUTE_SUSPEND, request_id=request_id)


def server_resume(*, instance: Instance, user: Any,
                  request_id: str | None = None) -> InstanceAction:
    return _server_operation(instance=instance, user=user, rule=states.RESUME,
                             task_name=contract.COMPUTE_RESUME, request_id=request_id)


def finish_action(action: InstanceAction, *, result: str, message: str = "") -> None:
    updated = InstanceAction.objects.filter(pk=action.pk, finish_time__isnull=True).update(
        finish_time=timezone.now(), result=result, message=message)
    if updated and result == ActionResult.ERROR and action.image_id is not None:
        # A snapshot that failed leaves no half image behind: killed, with the reason.
        image = Image.objects.filter(pk=action.image_id).first()
        if image is not None:
            image_kill(image, message or "the snapshot failed")


def end_running_actions(instance: Instance, message: str) -> int:
    """End every action of ``instance`` still without a result in error with ``message``: what ends
    them (the task they started) was replaced and will never report. Returns how many."""
    running = list(InstanceAction.objects.filter(instance=instance, finish_time__isnull=True))
    for action in running:
        finish_action(action, result=ActionResult.ERROR, message=message)
    return len(running)


def server_reset_state(*, instance: Instance, user: Any, state: str, reason: str) -> InstanceAction:
    """Nova's os-resetState: force vm_state to active or error and clear the task, recording who
    did it and why. The escape hatch for an operator who knows better than the records."""
    if state not in (VmState.ACTIVE, VmState.ERROR):
        raise InvalidRequest("state", "reset state goes to active or error")
    if instance.vm_state == VmState.DELETED:
        raise ServerInvalidState(instance, "reset the state of")
    before = f"vm_state={instance.vm_state} task_state={instance.task_state}"
    with transaction.atomic():
        Instance.objects.filter(uuid=instance.uuid).change(vm_state=state, task_state=None)
        end_running_actions(instance, f"ended by a reset of the state: {reason}")
        now = timezone.now()
        action = action_start(instance=instance, action="reset_state", user=user,
                              request_id=new_request_id())
        message = f"{before} -> vm_state={state}: {reason}"
        action.events.create(event="reset_state", result=ActionResult.SUCCESS, start_time=now,
                             finish_time=now, message=message)
        finish_action(action, result=ActionResult.SUCCESS, message=message)
    instance.refresh_from_db()
    return action


def server_snapshot(*, instance: Instance, user: Any, name: str,
                    request_id: str | None = None) -> InstanceAction:
    """Snapshot the server's disk into a new private image of its project (202 at once).

    Live when the server runs (the guest keeps running), cold when it is stopped. The image is
    queued now, saving while the compute worker uploads, active when the upload passes the image
    service's inspection; killed if anything fails.
    """
    host = require_host_up(instance, "snapshot")
    with transaction.atomic():
        # The project's images quota (403 before the server changes state). Its row is locked
        # before the server's, the order every quota-checked operation follows (a resize too).
        quota_usage.enforce_snapshot(project=instance.project)
        transition(instance, states.SNAPSHOT)
        base = instance.image
        image = image_create(
            name=name, disk_format="qcow2", owner=instance.project,
            min_ram=base.min_ram if base else 0, min_disk=instance.root_gb,
            properties={**({k: v for k, v in base.properties.items() if k != "failure"}
                           if base else {}),
                        "image_type": "snapshot", "instance_uuid": str(instance.uuid),
                        "base_image": str(base.id) if base else ""})
        action = action_start(instance=instance, action="snapshot", user=user,
                              request_id=request_id or new_request_id())
        InstanceAction.objects.filter(pk=action.pk).update(image=image)
        action.refresh_from_db()
        kwargs = {"instance_uuid": str(instance.uuid), "action_id": action.pk,
                  "image_id": str(image.id), "image_name": name,
                  "upload_url": f"{settings.CLOUDCTL_API_URL}/api/v1/images/{image.id}/file"}
        transaction.on_commit(lambda: rpc.cast(host.name, contract.COMPUTE_SNAPSHOT, **kwargs))
    return action


def server_console_output(*, instance: Instance, lines: int | None) -> str:
    """The tail of the guest's serial console, read on its host by a short synchronous call."""
    if instance.host is None or instance.vm_state in (VmState.BUILDING, VmState.DELETED) \
            or instance.task_state == TaskState.DELETING:
        raise ServerConsoleUnavailable(
            f"server {instance.uuid} is not running on a host "
            f"(vm_state={instance.vm_state}, task_state={instance.task_state})")
    answer = rpc.call(instance.host.name, contract.COMPUTE_CONSOLE_OUTPUT,
                      timeout=settings.CONSOLE_OUTPUT_TIMEOUT,
                      instance_uuid=str(instance.uuid), lines=lines)
    if "error" in answer:
        raise ServerConsoleUnavailable(answer.get("message") or answer["error"])
    return str(answer["output"])


def host_set_enabled(*, host: Host, enabled: bool, reason: str = "") -> Host:
    """Disable a host (it keeps its servers, receives no new ones) or enable it again."""
    Host.objects.filter(pk=host.pk).update(enabled=enabled, disabled_reason="" if enabled else reason)
    host.refresh_from_db()
    return host


def server_group_create(*, user: Any, project: Project, name: str, policy: str) -> ServerGroup:
    with transaction.atomic():
        quota_usage.enforce_server_group_create(project=project)
        return ServerGroup.objects.create(name=name, policy=policy, project=project,
                                          user=user if getattr(user, "pk", None) else None)


def aggregate_zone_sync(host: Host) -> None:
    """A host's zone is the zone its aggregates name (at most one), else the default."""
    zones = set(host.aggregates.exclude(availability_zone="").values_list("availability_zone",
                                                                          flat=True))
    if len(zones) > 1:
        raise InvalidRequest("availability_zone",
                             f"host {host.name} would be in zones {', '.join(sorted(zones))}; a "
                             "host is in one availability zone")
    Host.objects.filter(pk=host.pk).update(availability_zone=zones.pop() if zones else "")


def aggregate_add_host(*, aggregate: Aggregate, host: Host) -> Aggregate:
    with transaction.atomic():
        aggregate.hosts.add(host)
        aggregate_zone_sync(host)
    return aggregate


def aggregate_remove_host(*, aggregate: Aggregate, host: Host) -> Aggregate:
    with transaction.atomic():
        aggregate.hosts.remove(host)
        aggregate_zone_sync(host)
    return aggregate


def aggregate_update(*, aggregate: Aggregate, **values: Any) -> Aggregate:
    with transaction.atomic():
        for key, value in values.items():
            setattr(aggregate, key, value)
        aggregate.save()
        for host in aggregate.hosts.all():
            aggregate_zone_sync(host)
    return aggregate


def flavor_delete(*, flavor: Flavor) -> None:
    """Delete a flavor; one that servers were built from is only disabled (they keep its name)."""
    if Instance.objects.filter(flavor=flavor).exists():
        Flavor.objects.filter(pk=flavor.pk).update(disabled=True)
    else:
        flavor.delete()


# Nova's default flavors plus m1.nano, sized for the demo image.
DEFAULT_FLAVORS: tuple[tuple[str, int, int, int], ...] = (
    ("m1.nano", 1, 128, 1),
    ("m1.tiny", 1, 512, 1),
    ("m1.small", 1, 2048, 20),
    ("m1.medium", 2, 4096, 40),
    ("m1.large", 4, 8192, 80),
    ("m1.xlarge", 8, 16384, 160),
)


def flavors_seed() -> list[Flavor]:
    """Create the default flavors that do not exist yet; existing ones are left as they are."""
    return [Flavor.objects.get_or_create(name=name, defaults={"vcpus": vcpus, "memory_mb": ram,
                                                               "root_gb": disk})[0]
            for name, vcpus, ram, disk in DEFAULT_FLAVORS]
