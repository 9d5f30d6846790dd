"""A database outage for real, on PostgreSQL (issue 19, fault 2): a live WSGI server reaches the test
database through a TCP proxy that the test cuts (every connection reset, nothing listening: what
clients see while PostgreSQL is stopped) and restores (listening again: PostgreSQL started again).
The shared PostgreSQL server itself is never stopped: other test runs use it.

Requests during the cut answer 503 ``database_unavailable``, a create cut in the middle of its
transaction leaves nothing behind, requests after the restore succeed at once (the dead persistent
connection is replaced, CONN_HEALTH_CHECKS), and a conductor task whose connection the server
terminated is retried and applied once.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg2
import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.db import connection, connections

from cloudctl.compute import tasks as conductor_tasks
from cloudctl.compute.models import Instance, InstanceAction, InstanceActionEvent
from cloudctl.compute.states import VmState
from cloudctl.identity.services import token_issue

from .conftest import Outbox
from .test_host_keys import SPAWNED, key, spawning  # noqa: F401 (a fixture)

pytestmark = [
    pytest.mark.skipif(connection.vendor != "postgresql",
                       reason="needs PostgreSQL (DATABASE_URL=postgres://...): a real connection to cut"),
    pytest.mark.django_db(transaction=True),
]

BODY = {"detail": "the database is unavailable; retry shortly", "code": "database_unavailable"}


class CuttableProxy:
    """A TCP proxy on a free local port to the database server: ``cut()`` resets every connection
    through it and stops listening, ``restore()`` listens again on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _shut(listener)
        with self._lock:
            open_sockets, self._sockets = self._sockets, set()
        for sock in open_sockets:
            _shut(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _shut(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            _shut(source)
            _shut(target)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class LiveServer(threading.Thread):
    """cloudctl's WSGI application served from a thread whose database connection goes through
    ``proxy`` (settings as the test database's, HOST and PORT the proxy's). ``before_query`` sees
    every query's SQL first (the test cuts the proxy from there, in the middle of a transaction)."""

    def __init__(self, proxy: CuttableProxy, before_query: Callable[[str], None]) -> None:
        super().__init__(daemon=True)
        self.settings_dict = {**connections["default"].settings_dict, "HOST": "127.0.0.1",
                              "PORT": str(proxy.port)}
        self.before_query = before_query
        self.httpd: WSGIServer = make_server("127.0.0.1", 0, WSGIHandler(), handler_class=_Quiet)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def run(self) -> None:
        database = type(connections["default"])(self.settings_dict, "default")
        connections["default"] = database  # this thread's connection only

        def watch(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            self.before_query(sql)
            return execute(sql, params, many, context)

        database.execute_wrappers.append(watch)
        try:
            self.httpd.serve_forever(poll_interval=0.05)
        finally:
            database.close()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.join(10)


@pytest.fixture
def outage(member: Any, project: Any, flavors: Any, image: Any,
           outbox: Outbox) -> Iterator[tuple[CuttableProxy, LiveServer, Callable[..., Any], dict[str, Any]]]:
    """(proxy, server, call(method, path, body=None) -> (status, headers, json), armed): a
    query whose SQL ``armed["when"]`` matches cuts the proxy first (once)."""
    settings_dict = connections["default"].settings_dict
    proxy = CuttableProxy((settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432)))
    armed: dict[str, Any] = {"when": None}

    def before_query(sql: str) -> None:
        when = armed["when"]
        if when is not None and when(sql):
            armed["when"] = None
            proxy.cut()

    server = LiveServer(proxy, before_query)
    server.start()
    token = token_issue(user=member, project=project).secret

    def call(method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
        request = urllib.request.Request(
            server.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, error.headers, json.loads(error.read() or b"null")

    try:
        yield proxy, server, call, armed
    finally:
        proxy.cut()
        server.stop()


CREATE = {"name": "s", "flavor": "m1.nano", "image": "tiny"}


def test_requests_during_a_database_restart_get_503_then_work(outage, outbox: Outbox, settings) -> None:
    proxy, _, call, armed = outage
    assert call("GET", "/api/v1/servers/")[0] == 200

    # Stopped: every request answers 503 with Retry-After (the server's connection is reset, new
    # connections are refused), reads and writes alike; nothing is written.
    proxy.cut()
    for method, path, body in (("GET", "/api/v1/servers/", None), ("POST", "/api/v1/servers/", CREATE),
                               ("GET", "/api/v1/flavors/", None)):
        status, headers, answer = call(method, path, body)
        assert (status, answer) == (503, BODY), (method, path)
        assert headers["Retry-After"] == str(settings.DATABASE_RETRY_AFTER)
    assert Instance.objects.count() == 0

    # Started again: requests succeed at once.
    proxy.restore()
    status, _, created = call("POST", "/api/v1/servers/", CREATE)
    assert status == 202, created
    assert InstanceAction.objects.filter(instance_id=created["id"], action="create").count() == 1
    assert [name for name, _ in outbox.scheduler] == ["scheduler.schedule_instance"]

    # Stopped in the middle of a create: the server's row is inserted, then the connection dies
    # before its action's insert. 503, and PostgreSQL rolled the whole transaction back.
    armed["when"] = lambda sql: sql.startswith('INSERT INTO "compute_instanceaction"')
    status, _, answer = call("POST", "/api/v1/servers/", {**CREATE, "name": "cut"})
    assert (status, answer) == (503, BODY)
    assert armed["when"] is None  # the cut happened where it was meant to
    proxy.restore()
    assert not Instance.objects.filter(name="cut").exists()
    assert Instance.objects.count() == InstanceAction.objects.count() == 1
    assert len(outbox.scheduler) == 1

    # A restart while the server sat idle: its persistent connection is dead, and the next request
    # replaces it instead of failing on it.
    assert call("GET", "/api/v1/servers/")[0] == 200
    proxy.cut()
    proxy.restore()
    status, _, servers = call("GET", "/api/v1/servers/")
    assert status == 200 and [s["name"] for s in servers] == ["s"]


def _terminate_other_backends() -> int:
    """Terminate every other connection to the test database, from a connection of its own (as a
    restart does to each of them)."""
    params = connections["default"].get_connection_params()
    with psycopg2.connect(**params) as admin, admin.cursor() as cursor:
        cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        (count,) = cursor.fetchone()
    admin.close()
    return int(count)


def test_a_report_whose_connection_was_terminated_is_retried_and_applied_once(
        spawning: Instance, caplog) -> None:  # noqa: F811
    from compute_workers import credentials

    kwargs = {"instance_uuid": str(spawning.uuid), "host": "hv1", "expected_task_state": "spawning",
              "values": SPAWNED, "event": {"name": "compute_spawn", "result": "success"}}
    headers = credentials.sign(key("hv1"), conductor_tasks.instance_update.name, "hv1", kwargs)
    assert _terminate_other_backends() >= 1  # this test's own connection among them
    result = conductor_tasks.instance_update.apply(kwargs=kwargs, headers=headers)
    assert result.get() is True
    assert "the database is unavailable" in caplog.text and "retry 1 of" in caplog.text
    spawning.refresh_from_db()
    assert (spawning.vm_state, spawning.task_state) == (VmState.ACTIVE, None)
    assert InstanceActionEvent.objects.filter(action__instance=spawning, event="compute_spawn").count() == 1
