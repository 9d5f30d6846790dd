"""Instance states as Nova names them, so operators recognise them.

``vm_state`` is where the instance rests; ``task_state`` is the operation in flight (None when
idle); ``power_state`` is what the hypervisor last said. The API ``status`` derives from the first
two. Each action lists the (vm_state, task_state) pairs it may start from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from django.db import models

from compute_workers import contract


def _choices(enum: type[StrEnum]) -> Any:
    """Django choices with the members (names and values) of one of the contract's enumerations."""
    return models.TextChoices(enum.__name__, [(member.name, member.value) for member in enum])


# The contract's enumerations are the one definition; these are their Django choices.
VmState = _choices(contract.VmState)
TaskState = _choices(contract.TaskState)
PowerState = _choices(contract.PowerState)


_STATUS_BY_VM_STATE = {
    VmState.BUILDING: "BUILD",
    VmState.ACTIVE: "ACTIVE",
    VmState.STOPPED: "SHUTOFF",
    VmState.PAUSED: "PAUSED",
    VmState.SUSPENDED: "SUSPENDED",
    VmState.RESIZED: "VERIFY_RESIZE",
    VmState.ERROR: "ERROR",
    VmState.DELETED: "DELETED",
}
_STATUS_BY_TASK_STATE = {
    TaskState.REBOOTING: "REBOOT",
    TaskState.REBOOTING_HARD: "HARD_REBOOT",
    TaskState.MIGRATING: "MIGRATING",
    TaskState.RESIZE_PREP: "RESIZE",
    TaskState.RESIZE_MIGRATING: "RESIZE",
    TaskState.RESIZE_FINISH: "RESIZE",
    TaskState.RESIZE_REVERTING: "REVERT_RESIZE",
    TaskState.RESIZE_CONFIRMING: "VERIFY_RESIZE",
    TaskState.REBUILDING: "REBUILD",
}


def derive_status(vm_state: str, task_state: str | None) -> str:
    """The API status, as Nova's ``nova.api.openstack.common.status_from_state``."""
    if vm_state in (VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED) and task_state == TaskState.MIGRATING:
        return "MIGRATING"
    if vm_state == VmState.RESIZED and task_state == TaskState.RESIZE_REVERTING:
        return "REVERT_RESIZE"
    if vm_state in (VmState.ACTIVE, VmState.STOPPED) and task_state in _STATUS_BY_TASK_STATE:
        return _STATUS_BY_TASK_STATE[TaskState(task_state)]
    return _STATUS_BY_VM_STATE.get(VmState(vm_state), "UNKNOWN")


def states_for_status(status: str) -> dict[str, list[str | None]]:
    """vm_state -> the task_states (None: idle) whose derived status is ``status``: the inverse of
    :func:`derive_status`, computed from it (Nova's ``task_and_vm_state_from_status``), so a list
    filtered by status shows exactly the servers that show that status."""
    found: dict[str, list[str | None]] = {}
    for vm_state in VmState.values:
        for task_state in [None, *TaskState.values]:
            if derive_status(vm_state, task_state) == status:
                found.setdefault(vm_state, []).append(task_state)
    return found


# Every status a server can show, for the list's ?status= filter.
STATUSES = sorted({derive_status(v, t) for v in VmState.values for t in [None, *TaskState.values]})


@dataclass(frozen=True)
class Transition:
    """An action's allowed starting points and the task_state it moves the instance into."""

    action: str
    from_vm_states: tuple[str, ...]
    from_task_states: tuple[str | None, ...]
    to_task_state: str


# Delete is allowed from every state (as Nova: it is how users get rid of a stuck server); a
# second delete while one runs is refused rather than doubled.
DELETE = Transition(
    action="delete",
    from_vm_states=tuple(s for s in VmState.values if s != VmState.DELETED),
    from_task_states=(None, *(t for t in TaskState.values if t != TaskState.DELETING)),
    to_task_state=TaskState.DELETING,
)

# Nova's compute API rules. Hard reboot is the escape hatch: it may start from a half-done
# reboot, pause, unpause, suspend or resume, and from stopped, paused, suspended and error.
REBOOT_SOFT = Transition(
    action="reboot",
    from_vm_states=(VmState.ACTIVE,),
    from_task_states=(None,),
    to_task_state=TaskState.REBOOTING,
)
REBOOT_HARD = Transition(
    action="reboot",
    from_vm_states=(VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED, VmState.SUSPENDED,
                    VmState.ERROR),
    from_task_states=(None, TaskState.REBOOTING, TaskState.REBOOTING_HARD, TaskState.PAUSING,
                      TaskState.UNPAUSING, TaskState.SUSPENDING, TaskState.RESUMING),
    to_task_state=TaskState.REBOOTING_HARD,
)
STOP = Transition(
    action="stop",
    from_vm_states=(VmState.ACTIVE, VmState.ERROR),
    from_task_states=(None,),
    to_task_state=TaskState.POWERING_OFF,
)
START = Transition(
    action="start",
    from_vm_states=(VmState.STOPPED,),
    from_task_states=(None,),
    to_task_state=TaskState.POWERING_ON,
)
PAUSE = Transition(action="pause", from_vm_states=(VmState.ACTIVE,), from_task_states=(None,),
                   to_task_state=TaskState.PAUSING)
UNPAUSE = Transition(action="unpause", from_vm_states=(VmState.PAUSED,),
                     from_task_states=(None,), to_task_state=TaskState.UNPAUSING)
SUSPEND = Transition(action="suspend", from_vm_states=(VmState.ACTIVE,),
                     from_task_states=(None,), to_task_state=TaskState.SUSPENDING)
RESUME = Transition(action="resume", from_vm_states=(VmState.SUSPENDED,),
                    from_task_states=(None,), to_task_state=TaskState.RESUMING)

SNAPSHOT = Transition(
    action="snapshot",
    from_vm_states=(VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED, VmState.SUSPENDED),
    from_task_states=(None,),
    to_task_state=TaskState.IMAGE_SNAPSHOT,
)

# Migrations (admin) and resize (owner). Nova live-migrates active and paused servers; a cold
# migration or resize starts from active or stopped and ends where it started (resize: in RESIZED,
# i.e. VERIFY_RESIZE, until confirmed or reverted).
LIVE_MIGRATE = Transition(action="live-migration", from_vm_states=(VmState.ACTIVE, VmState.PAUSED),
                          from_task_states=(None,), to_task_state=TaskState.MIGRATING)
COLD_MIGRATE = Transition(action="migrate", from_vm_states=(VmState.ACTIVE, VmState.STOPPED),
                          from_task_states=(None,), to_task_state=TaskState.RESIZE_PREP)
RESIZE = Transition(action="resize", from_vm_states=(VmState.ACTIVE, VmState.STOPPED),
                    from_task_states=(None,), to_task_state=TaskState.RESIZE_PREP)
CONFIRM_RESIZE = Transition(action="confirmResize", from_vm_states=(VmState.RESIZED,),
                            from_task_states=(None,), to_task_state=TaskState.RESIZE_CONFIRMING)
REVERT_RESIZE = Transition(action="revertResize", from_vm_states=(VmState.RESIZED,),
                           from_task_states=(None,), to_task_state=TaskState.RESIZE_REVERTING)

# Evacuate (admin; Nova's evacuate): the server's host is down and fenced, so it is rebuilt on another
# host. A lifecycle task the host's death interrupted may be in flight (it is over: its action ends in
# error); a migration's, a build's or a delete's may not (each has its own ending).
EVACUATE = Transition(
    action="evacuate",
    from_vm_states=(VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED, VmState.SUSPENDED, VmState.ERROR),
    from_task_states=(None, TaskState.REBOOTING, TaskState.REBOOTING_HARD, TaskState.POWERING_OFF,
                      TaskState.POWERING_ON, TaskState.PAUSING, TaskState.UNPAUSING, TaskState.SUSPENDING,
                      TaskState.RESUMING, TaskState.IMAGE_SNAPSHOT, TaskState.IMAGE_UPLOADING),
    to_task_state=TaskState.REBUILDING,
)

# The vm_state that tells the truth about a domain in a given power state.
VM_STATE_FOR_POWER_STATE = contract.VM_STATE_OF_POWER_STATE
