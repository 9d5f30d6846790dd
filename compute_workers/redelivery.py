"""A test setting that delivers every compute and network task twice: ``COMPUTE_TEST_DUPLICATE_DELIVERY``.

Redis has no real acknowledgements: a task whose worker died (or restarted, or lost its connection)
before acknowledging it is delivered again, with the same task id and the same arguments
(``task_acks_late``, ``visibility_timeout``). Every task of a compute worker must therefore change nothing
the second time. This setting proves it on the real paths: every task the worker runs is run a second
time, with the same request (task id, delivery info) and the same arguments, as a redelivery would:

- ``1`` (or ``after``): the second delivery runs once the first one finished, in the same thread, before
  the message is acknowledged (a redelivery after a worker died between the operation and its ack);
- ``concurrent``: the second delivery starts in a thread of its own while the first still runs (a
  worker restarted while the old one finishes; the per-instance locks must serialise them).

Implemented once, as the base class of every task :class:`compute_workers.tasks.TaskRegistrar` declares,
so a task added later is covered without a line of its own. A test setting only: it doubles the work of
every operation; the worker logs a WARNING at start when it is on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Task
from celery.app.task import Context

LOG = logging.getLogger(__name__)

OFF, AFTER, CONCURRENT = "0", "after", "concurrent"
MODES = (OFF, "1", AFTER, CONCURRENT)
# What the worker logs for each second delivery (tests count these lines).
SECOND_DELIVERY = "duplicate delivery: running %s[%s] a second time (%s)"
SECOND_DELIVERY_FAILED = "duplicate delivery: the second run of %s[%s] raised"


def parse_mode(text: str) -> str:
    """``0`` (off), ``1`` or ``after``, ``concurrent``: the mode, ``1`` spelled ``after``."""
    if text not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}")
    return AFTER if text == "1" else text


class DeliveredTwice(Task):  # type: ignore[misc]  # celery's Task is untyped
    """The base of every compute task when the setting is on: a worker's delivery runs the task's body
    twice (``duplicate_delivery`` says how, a class attribute set when the task is declared).

    Only a worker's delivery (a request on the stack: Celery's tracer pushed it, with the task id and
    delivery info) is doubled; a direct call of the task runs it once, as Celery's own ``__call__``.
    The task's outcome is the first run's; the second run's return value is dropped and an exception of
    it logged, never raised (the message is acknowledged as for one delivery)."""

    duplicate_delivery: str = AFTER

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request_stack.top
        if request is None or request.called_directly:
            return super().__call__(*args, **kwargs)
        if self.duplicate_delivery == CONCURRENT:
            copy = Context(vars(request))
            second = threading.Thread(target=self._second_delivery, args=(copy, args, kwargs),
                                      name=f"redelivery-{request.id}", daemon=True)
            second.start()
            try:
                return self.run(*args, **kwargs)
            finally:
                second.join()
        try:
            return self.run(*args, **kwargs)
        finally:
            self._second_delivery(None, args, kwargs)

    def _second_delivery(self, request: Context | None, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> None:
        """Run the task's body again; ``request``: a copy of the first delivery's, pushed in this thread
        (the request stack is per thread), None when the first one's is on this thread's stack."""
        if request is not None:
            self.request_stack.push(request)
        current = self.request_stack.top
        LOG.info(SECOND_DELIVERY, self.name, current.id, self.duplicate_delivery)
        try:
            self.run(*args, **kwargs)
        except Exception:
            LOG.exception(SECOND_DELIVERY_FAILED, self.name, current.id)
        finally:
            if request is not None:
                self.request_stack.pop()
