"""Why a compute request is refused: each error knows its HTTP answer (see :mod:`cloudctl.errors`).

Names differ from the compute workers' exceptions (``compute_workers/exception.py``) on purpose:
``ServerInvalidState`` is the control plane refusing a request, ``InstanceInvalidState`` a hypervisor
refusing an operation on a domain.
"""

from __future__ import annotations

from typing import Any

from cloudctl.compute.models import Instance, Migration
from cloudctl.errors import CloudctlError
from cloudctl.errors import InvalidRequest as InvalidRequest  # re-exported: the compute side's name


class ServerError(CloudctlError):
    """A refusal about one server: the body adds the server's status, vm_state and task_state at the
    time of the answer, so the caller sees what blocked it."""

    def __init__(self, instance: Instance, message: str) -> None:
        self.instance = instance
        super().__init__(message)

    def server_state(self) -> dict[str, Any]:
        instance = self.instance
        return {"status": instance.status, "vm_state": instance.vm_state, "task_state": instance.task_state}

    def body(self) -> dict[str, Any]:
        return {**super().body(), **self.server_state()}


class ServerInvalidState(ServerError):
    """The server is not in a state the action may start from (HTTP 409)."""

    # Action records carry Nova's names; the message says what the user asked to do.
    VERBS = {"live-migration": "live-migrate", "confirmResize": "confirm the resize of",
             "revertResize": "revert the resize of"}

    def __init__(self, instance: Instance, action: str) -> None:
        self.action = action
        super().__init__(instance, f"cannot {self.VERBS.get(action, action)} server {instance.uuid} "
                                   f"while vm_state={instance.vm_state} task_state={instance.task_state}")


class HostUnavailable(ServerError):
    """The server's host cannot act now (HTTP 409): it is down, or the server has no host."""

    code = "host_unavailable"


class MigrationInvalidState(CloudctlError):
    """The migration is not in a state the request applies to (HTTP 409)."""

    def __init__(self, migration: Migration, message: str) -> None:
        self.migration = migration
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {**super().body(), "status": self.migration.status}


class ServerConsoleUnavailable(CloudctlError):
    """The console cannot be read now (HTTP 409): the server does not run on a host."""


class ComputeUnavailable(CloudctlError):
    """The host's compute worker did not answer in time (HTTP 503)."""

    status_code = 503
    code = "compute_unavailable"


class EvacuationRefused(ServerError):
    """The server cannot be evacuated now (HTTP 409); the message says why and what to do: no host can
    take it, its disk's data would be lost without ``allow_data_loss``, its image is gone, a migration
    of it is in progress."""

    code = "evacuation_refused"


class HostFenceFailed(CloudctlError):
    """HOST_FENCE_COMMAND is not set, the host is up, or the command failed (HTTP 409)."""

    code = "fence_failed"


class HostNotFenced(CloudctlError):
    """The host's servers may not be evacuated now (HTTP 409): it is up, or not fenced."""

    code = "host_not_fenced"
