"""How the network app tells compute workers what to converge to: one sender, and the commit hook
its syncs share.

A sync (a network's DHCP state, a host's network state) is sent when the transaction that changed
it commits, so the worker never reads a state the database may still roll back, and it is built
then, from what the transaction left: a subject changed several times in one transaction is sent
once (:func:`on_commit_once`). Outside a transaction (autocommit) it is built and sent at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from cloudctl.celery import app
from compute_workers import contract

log = logging.getLogger(__name__)


def cast(host: str, task_name: str, **kwargs: Any) -> None:
    """Send a task to ``host``'s compute queue (the network app's own sender: it sits below the
    compute app, whose ``rpc.cast`` it may not import). The tests' ``outbox`` replaces it."""
    app.send_task(task_name, kwargs=kwargs, queue=contract.compute_queue(host))


class _Once:
    """A commit callback with the subject it syncs, so that a second request for the same subject in
    the same transaction finds it (:func:`_pending`)."""

    def __init__(self, key: Hashable, callback: Callable[[], None]) -> None:
        self.key = key
        self.callback = callback

    def __call__(self) -> None:
        self.callback()


def _pending(key: Hashable, using: str) -> bool:
    """Whether this transaction already has a callback for ``key`` waiting for its commit. A callback
    registered in a savepoint that rolled back is gone from the list: the next request registers
    again."""
    connection = connections[using]
    if not connection.in_atomic_block:
        return False
    return any(isinstance(entry[1], _Once) and entry[1].key == key for entry in connection.run_on_commit)


def on_commit_once(key: Hashable, callback: Callable[[], None], *, using: str = DEFAULT_DB_ALIAS) -> None:
    """Run ``callback`` when the current transaction commits, unless one for ``key`` is already
    waiting (the callback reads committed state then, so the first one sends the last word). A
    failing callback is logged, never raised into the committed request (``robust``)."""
    if _pending(key, using):
        return
    transaction.on_commit(_Once(key, callback), using=using, robust=True)
