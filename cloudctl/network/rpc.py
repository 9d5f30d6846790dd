"""How the network app tells the network node what to converge to: one sender and one on-commit
dedupe, shared by the DHCP syncs (:mod:`cloudctl.network.dhcp`) and the router syncs
(:mod:`cloudctl.network.routers`).

A sync is sent when the transaction that changed the state commits (the worker then reads, in the
message, committed state only), once per object and transaction however many times the transaction
changed it, and the message is built at commit from what the transaction left. Each sync is a
:class:`CommitSync` whose ``key`` names the object; a second request for the same key in the same
transaction finds the first one waiting in the connection's on-commit list and does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from cloudctl.celery import app
from compute_workers import contract

log = logging.getLogger(__name__)


def cast(host: str, task_name: str, **kwargs: Any) -> None:
    """Send a task to ``host``'s compute queue (the network app's own sender: it sits below the
    compute app, whose ``rpc.cast`` it may not import). Tests replace it (the ``outbox`` fixture)."""
    app.send_task(task_name, kwargs=kwargs, queue=contract.compute_queue(host))


class CommitSync:
    """A commit callback that sends one object's state; ``key`` identifies the object for the
    dedupe (e.g. ``("dhcp", network id)``). Subclasses build and send the message in ``send``."""

    key: Hashable = None

    def __call__(self) -> None:
        self.send()

    def send(self) -> None:
        raise NotImplementedError


def pending(key: Hashable, using: str = DEFAULT_DB_ALIAS) -> bool:
    """Whether this transaction already has a sync of ``key`` waiting for its commit."""
    connection = connections[using]
    if not connection.in_atomic_block:
        return False
    return any(isinstance(entry[1], CommitSync) and entry[1].key == key
               for entry in connection.run_on_commit)


def send_on_commit(sync: CommitSync, *, using: str = DEFAULT_DB_ALIAS) -> None:
    """Send ``sync`` when the current transaction commits (at once outside one), unless a sync of
    the same key already waits for that commit. ``robust``: a broker that refuses one message is
    logged and does not stop the other callbacks (the next sync carries the whole state again)."""
    if pending(sync.key, using):
        return
    transaction.on_commit(sync, using=using, robust=True)
