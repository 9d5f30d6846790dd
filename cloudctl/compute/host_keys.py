"""Host keys: issued to a compute host by an admin (``manage.py host_credentials``), checked on every
report its worker sends (see :mod:`compute_workers.credentials` for the scheme and why it is not
Celery's message signing).

A host's key is derived, never stored: ``HMAC(CLOUDCTL_HOST_KEY_SECRET, "host:<name>:<generation>")``
with the generation kept on its Host row (1 for a host that has not joined yet). Rotating bumps the
generation: the old key stops working at once, on every conductor process.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F

from cloudctl.compute.models import Host
from cloudctl.errors import InvalidRequest
from compute_workers import contract, credentials

log = logging.getLogger(__name__)

# Reports dropped by this process since it started, by task name (the reasons are in the log).
rejected_reports: Counter[str] = Counter()
_rejected_lock = threading.Lock()


@dataclass(frozen=True)
class HostCredentials:
    host: str
    generation: int
    key: str
    registered: bool  # the host has a Host row (it heartbeated, or was rotated before it joined)


def host_key_of(host: str) -> str:
    """The key ``host``'s reports must be signed with now."""
    generation = Host.objects.filter(name=host).values_list("key_generation", flat=True).first()
    return credentials.host_key(settings.CLOUDCTL_HOST_KEY_SECRET, host,
                                generation or credentials.FIRST_GENERATION)


def host_credentials(*, name: str, rotate: bool = False, revoke: bool = False) -> HostCredentials:
    """The key of compute host ``name`` (for its COMPUTE_HOST_KEY). ``rotate``: a new key, the old one
    refused from now on; ``revoke``: the same, and the host disabled until an admin enables it. A host
    rotated before it ever heartbeated is registered (disabled) to keep its generation."""
    try:
        contract.compute_queue(name)
    except ValueError as exc:
        raise InvalidRequest("name", str(exc)) from None
    if rotate or revoke:
        with transaction.atomic():
            changes: dict[str, Any] = {"key_generation": F("key_generation") + 1}
            if revoke:
                changes.update(enabled=False, disabled_reason="host key revoked")
            if not Host.objects.filter(name=name).update(**changes):
                Host.objects.create(name=name, key_generation=credentials.FIRST_GENERATION + 1, enabled=False,
                                    disabled_reason="host key revoked" if revoke else
                                    "key issued before the host joined: enable it once it runs")
        log.warning("host %s: key %s", name, "revoked" if revoke else "rotated; the old one is refused")
    row = Host.objects.filter(name=name).values_list("key_generation", flat=True).first()
    generation = row or credentials.FIRST_GENERATION
    return HostCredentials(host=name, generation=generation, registered=row is not None,
                           key=credentials.host_key(settings.CLOUDCTL_HOST_KEY_SECRET, name, generation))


def report_verified(task_name: str, headers: Mapping[str, Any] | None, args: Sequence[Any],
                    kwargs: Mapping[str, Any], task_id: str | None = None) -> bool:
    """Whether a report delivered to a conductor task proves which host sent it (see
    :func:`credentials.verify`). A report that does not is logged at WARNING with the reason, counted
    in :data:`rejected_reports` and must be dropped: never an exception, so that a flood of forged
    messages costs a log line each, not a traceback and a retry."""
    try:
        if args:
            raise credentials.ReportRejected("positional arguments are not signed")
        credentials.verify(headers or {}, task_name, kwargs, host_key_of, max_skew=settings.REPORT_MAX_SKEW)
    except credentials.ReportRejected as exc:
        with _rejected_lock:
            rejected_reports[task_name] += 1
            total = sum(rejected_reports.values())
        log.warning("dropped report %s %s (host argument %r): %s [%d dropped by this process]", task_name,
                    task_id or "", kwargs.get("host"), exc, total)
        return False
    return True
