"""The compute tasks: thin wrappers that call one method of one operation family each.

Each family of :mod:`compute_workers.operations` declares its own tasks
(:meth:`~compute_workers.operations.base.OperationFamily.register_tasks`) through a
:class:`TaskRegistrar`; :func:`register_tasks` has every family of
:data:`compute_workers.operations.FAMILIES` do so. Names come from :mod:`compute_workers.contract`; the
time limits from :class:`ComputeConfig` (declared for Celery; the threads pool does not enforce them,
the operations bound their own waits).

Which manager runs a task is asked of a :class:`Managers` for each task: a worker of one host always
answers its one manager (:class:`OneHost`); a fleet of simulated hosts answers the manager of the host
whose queue the task came from (:class:`compute_workers.fleet.Fleet`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from celery import Celery, Task
from celery.app.task import Context

from compute_workers.config import ComputeConfig
from compute_workers.manager import ComputeManager
from compute_workers.operations import FAMILIES, OperationFamily
from compute_workers.redelivery import CONCURRENT, OFF, DeliveredTwice

LOG = logging.getLogger(__name__)

Family = TypeVar("Family", bound=OperationFamily)
TaskFunction = TypeVar("TaskFunction", bound=Callable[..., Any])


class Managers(Protocol):
    """The manager that runs each task."""

    @property
    def config(self) -> ComputeConfig:
        """Settings every manager shares (the tasks' time limits)."""

    def for_task(self, request: Context, host: str | None = None) -> ComputeManager | None:
        """The manager of the task being run (``request`` is its Celery request: delivery info, id);
        ``host`` is the one the task's arguments name, if any (a spawn spec's). None: no host here."""


class OneHost:
    """The worker of one host: every task is its manager's."""

    def __init__(self, manager: ComputeManager) -> None:
        self.manager = manager

    @property
    def config(self) -> ComputeConfig:
        return self.manager.config

    def for_task(self, request: Context, host: str | None = None) -> ComputeManager:
        return self.manager


class TaskRegistrar:
    """What a family needs to declare its tasks: :meth:`task` declares one on the app with its time
    limits, :meth:`family` finds the family instance that runs a task being run."""

    def __init__(self, app: Celery, managers: Managers) -> None:
        self.app = app
        self.managers = managers
        self.limits = {name: {"soft_time_limit": soft, "time_limit": hard}
                       for name, soft, hard in managers.config.time_limits()}
        # COMPUTE_TEST_DUPLICATE_DELIVERY: every task declared here runs twice per delivery.
        self.duplicate_delivery = managers.config.test_duplicate_delivery
        if self.duplicate_delivery != OFF:
            LOG.warning("COMPUTE_TEST_DUPLICATE_DELIVERY=%s: every compute and network task is run twice "
                        "(%s); a test setting, never for a real host", self.duplicate_delivery,
                        "the second run while the first still runs" if self.duplicate_delivery ==
                        CONCURRENT else "the second run after the first")

    def task(self, name: str, *, ignore_result: bool) -> Callable[[TaskFunction], TaskFunction]:
        """Declare the task ``name`` (a contract constant) with its time limits. bind=True: the task's
        request tells which queue (hence which host) it came from."""
        doubled: dict[str, Any] = ({} if self.duplicate_delivery == OFF else
                                   {"base": DeliveredTwice, "duplicate_delivery": self.duplicate_delivery})
        decorator: Callable[[TaskFunction], TaskFunction] = self.app.task(
            name=name, ignore_result=ignore_result, shared=False, bind=True, **self.limits[name], **doubled)
        return decorator

    def family(self, task: Task, family: type[Family], host: str | None = None) -> Family | None:
        """The ``family`` of the manager that runs ``task``; None (logged: the task is dropped) when no
        host of this worker consumes the queue it came from."""
        manager = self.managers.for_task(task.request, host)
        if manager is None:
            LOG.error("%s %s came with routing key %r, which is no queue of this worker's hosts; dropped",
                      task.name, task.request.id, self.route(task))
            return None
        return manager.family(family)

    @staticmethod
    def route(task: Task) -> str | None:
        """The routing key (the queue) ``task`` came with."""
        delivery_info = getattr(task.request, "delivery_info", None) or {}
        return delivery_info.get("routing_key")


def register_tasks(app: Celery, managers: ComputeManager | Managers,
                   families: Iterable[type[OperationFamily]] = FAMILIES) -> None:
    """Register the tasks of every family on ``app``, run by ``managers`` (a manager: that one for every
    task)."""
    if isinstance(managers, ComputeManager):
        managers = OneHost(managers)
    tasks = TaskRegistrar(app, managers)
    for family in families:
        family.register_tasks(tasks)
