"""The database going away (PostgreSQL restarted, failed over, cut off by the network) is an outage to
wait out, not a bug to report: the API answers 503 ``database_unavailable`` with ``Retry-After``
instead of 500, and the control plane's Celery tasks are retried with backoff instead of failed.

Three pieces share :func:`database_unavailable` (which errors mean "the database cannot be used
now") and :func:`discard_broken_connections` (the next request or task connects anew):

* :func:`cloudctl.api.exception_handler` for everything DRF runs (views, authentication, permissions);
* :class:`DatabaseUnavailableMiddleware` for what runs outside DRF (the admin, its login, the
  dashboard, another middleware), and :class:`SessionMiddleware` for a session saved on the way out;
* :class:`DatabaseTask`, the base class of every task of the control plane's Celery app.

Every write that must not be half-done is one transaction, so an outage in the middle of a request
or a task leaves nothing behind (PostgreSQL rolls back what was not committed) and the retry starts
from the beginning. With ``CONN_HEALTH_CHECKS`` (settings.py) a persistent connection that the
restart closed while idle is replaced before its first query, so requests after the outage succeed
at once.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Task
from celery.utils.time import get_exponential_backoff_interval
from django.conf import settings
from django.contrib.sessions.exceptions import SessionInterrupted
from django.contrib.sessions.middleware import SessionMiddleware as DjangoSessionMiddleware
from django.core.signals import got_request_exception
from django.db import InterfaceError, OperationalError, connections
from django.http import HttpRequest, HttpResponse, JsonResponse

from cloudctl.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

_errors: list[type[BaseException]] = [OperationalError, InterfaceError]
try:  # the driver's own classes, should one escape Django's wrapper (it wraps queries and connects)
    import psycopg2
except ImportError:  # pragma: no cover - SQLite-only installs
    pass
else:
    _errors += [psycopg2.OperationalError, psycopg2.InterfaceError]

# Django's OperationalError covers a lost or refused connection, a server shutting down or starting
# up, and also a deadlock, a lock or statement timeout and SQLite's "database is locked": all of them
# transient, none of them the request's fault, all of them worth a retry.
DATABASE_ERRORS: tuple[type[BaseException], ...] = tuple(_errors)


def database_unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the database cannot be used now (rather than that a query is wrong)."""
    return isinstance(exc, DATABASE_ERRORS)


def database_error_in(exc: BaseException | None) -> BaseException | None:
    """The database outage ``exc`` is or was raised while handling (``__cause__``, ``__context__``),
    if any: Django turns some into errors of its own (a session that cannot be saved becomes
    ``SessionInterrupted``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if database_unavailable(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def discard_broken_connections() -> None:
    """Close this thread's database connections, so the next request or task connects again instead
    of using one the server dropped. A connection inside a transaction is left to whoever opened
    that transaction (its ``atomic`` rolls back and Django closes it at the end of the request)."""
    for connection in connections.all(initialized_only=True):
        if connection.in_atomic_block:
            continue
        try:
            connection.close()
        except DATABASE_ERRORS:  # closing a connection the server already dropped can fail too
            connection.connection = None


def request_failed(exc: BaseException) -> DatabaseUnavailable:
    """A request met :func:`database_unavailable` ``exc``: logged, its broken connection closed;
    returns the error the request answers (503)."""
    log.warning("answered 503: the database is unavailable (%s: %s)", type(exc).__name__,
                str(exc).strip())
    discard_broken_connections()
    return DatabaseUnavailable()


def unavailable_response(exc: BaseException) -> JsonResponse:
    """The 503 of a Django view's request that met ``exc`` (DRF's views get the same answer from
    :func:`cloudctl.api.exception_handler`)."""
    error = request_failed(exc)
    return JsonResponse(error.body(), status=error.status_code, headers=error.headers())


_FAILED_ON_DATABASE = "_cloudctl_database_unavailable"


def _note_database_error(sender: Any, request: HttpRequest | None = None, **_: Any) -> None:
    """``got_request_exception`` receiver: Django is about to answer 500 for an exception that
    escaped a middleware; mark the request when that exception is a database outage, so that
    :class:`DatabaseUnavailableMiddleware` turns the 500 into the 503."""
    exc = database_error_in(sys.exc_info()[1])
    if request is not None and exc is not None:
        setattr(request, _FAILED_ON_DATABASE, exc)


class DatabaseUnavailableMiddleware:
    """503 ``database_unavailable`` with ``Retry-After`` for a request outside DRF that met a
    database outage: in a view (``process_exception``: the admin, the dashboard) or in another
    middleware (the session saved on the way out), which Django has already turned into a 500 by
    the time it gets here. First in MIDDLEWARE, so that it sees every other middleware's answer."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        got_request_exception.connect(_note_database_error, dispatch_uid=_FAILED_ON_DATABASE)

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response: HttpResponse = self.get_response(request)
        exc = getattr(request, _FAILED_ON_DATABASE, None)
        if exc is not None and response.status_code >= 500:
            return unavailable_response(exc)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if database_unavailable(exception):
            return unavailable_response(exception)
        return None


class SessionMiddleware(DjangoSessionMiddleware):
    """Django's, except that a session it cannot save because the database is down answers the
    outage's 503, not the 400 "session interrupted" Django gives when the row seems deleted."""

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        try:
            return super().process_response(request, response)
        except SessionInterrupted as interrupted:
            exc = database_error_in(interrupted)
            if exc is None:
                raise
            return unavailable_response(exc)


def retry_delay(retries: int) -> int:
    """Seconds before retry number ``retries + 1`` of a task that lost the database: exponential
    (1, 2, 4, ... s) up to TASK_DATABASE_RETRY_MAX_DELAY, with full jitter, so that the tasks an
    outage held back do not all hit the database in the same second when it returns."""
    return int(get_exponential_backoff_interval(
        factor=1, retries=retries, maximum=settings.TASK_DATABASE_RETRY_MAX_DELAY, full_jitter=True))


class DatabaseTask(Task):
    """The base of every task of the control plane's Celery app (``cloudctl.celery``): a task that
    meets a database outage (:func:`database_unavailable`) closes its broken connection and is
    retried with backoff (:func:`retry_delay`), at most TASK_DATABASE_MAX_RETRIES times, instead of
    failing (which, with ``acks_late``, would acknowledge and so lose the message).

    A retry runs the task again from the start: every task applies its writes in transactions that
    the outage rolled back whole, and checks the state it expects, so a second run does what the
    first did not and nothing twice. A direct call (tests, another service) is not retried: the
    error is the caller's."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except DATABASE_ERRORS as exc:
            discard_broken_connections()
            request = self.request
            if request.called_directly:
                raise
            limit = settings.TASK_DATABASE_MAX_RETRIES
            if request.retries >= limit:
                log.error("task %s %s: the database is still unavailable after %d retries; giving up "
                          "(%s)", self.name, request.id, limit, exc)
                raise
            delay = retry_delay(request.retries)
            log.warning("task %s %s: the database is unavailable (%s: %s); retry %d of %d in %d s",
                        self.name, request.id, type(exc).__name__, str(exc).strip(),
                        request.retries + 1, limit, delay)
            raise self.retry(exc=exc, countdown=delay, max_retries=limit) from exc
