"""Messages from the control plane to compute workers: one function per direction of call.

``cast`` sends and forgets; ``call`` waits (bounded) for the worker's answer, which compute
workers store in the Redis RPC backend (they have no database, so django-celery-results cannot
hold their results).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.backends.redis import RedisBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from django.conf import settings

from cloudctl.celery import app
from cloudctl.compute.errors import ComputeUnavailable
from compute_workers import contract

log = logging.getLogger(__name__)


@functools.cache
def _rpc_backend() -> RedisBackend:
    return RedisBackend(app=app, url=settings.CELERY_RPC_BACKEND)


def cast(host: str, task_name: str, *, expires: float | None = None, **kwargs: Any) -> None:
    """Send a task to ``host``'s compute queue; the worker reports back through the conductor.

    ``expires`` (seconds): a worker that gets the task later discards it (a migration step must not
    start hours later, when Redis redelivers it after a worker died holding it)."""
    app.send_task(task_name, kwargs=kwargs, queue=contract.compute_queue(host), expires=expires)


def call(host: str, task_name: str, *, timeout: float, **kwargs: Any) -> Any:
    """Run a task on ``host``'s compute worker and return its result, or raise ComputeUnavailable.

    The message expires with the timeout, so a worker that comes back later does not run a call
    nobody waits for any more.
    """
    sent = app.send_task(task_name, kwargs=kwargs, queue=contract.compute_queue(host),
                         expires=timeout)
    result = AsyncResult(sent.id, backend=_rpc_backend(), app=app)
    try:
        # Called from the scheduler's worker too (a migration's pre-flight checks): Celery refuses a
        # get() inside a task unless told, because a task waiting for a task of its own queue can
        # deadlock the pool. This one waits for a compute worker's queue, never its own.
        return result.get(timeout=timeout, propagate=True, interval=0.05, disable_sync_subtasks=False)
    except CeleryTimeoutError:
        raise ComputeUnavailable(
            f"the compute worker of host {host} did not answer within {timeout:g} s"
        ) from None
    finally:
        result.forget()


def send_to_scheduler(task_name: str, **kwargs: Any) -> None:
    app.send_task(task_name, kwargs=kwargs, queue=contract.SCHEDULER_QUEUE)
