"""A database outage (issue 19, fault 2): the API answers 503 ``database_unavailable`` with
Retry-After, never 500, on every path (DRF views, their authentication, the admin, a middleware);
the control plane's tasks are retried and apply once; nothing is half-written.

The outage is injected under the ORM (``connection.execute_wrapper``): the chosen queries fail with
the error psycopg2 raises when the server went away, as Django wraps it. The real thing, on
PostgreSQL, is in test_database_outage_pg.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.test import Client

from cloudctl.compute import tasks as conductor_tasks
from cloudctl.compute.models import Allocation, Instance, InstanceAction, InstanceActionEvent
from cloudctl.compute.states import TaskState, VmState
from cloudctl.database import DatabaseTask, retry_delay
from compute_workers import contract
from scheduler import tasks as scheduler_tasks

from .conftest import Outbox, heartbeat
from .test_host_keys import SPAWNED, deliver, spawning  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db

GONE = "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally"
BODY = {"detail": "the database is unavailable; retry shortly", "code": "database_unavailable"}


@contextmanager
def database_down(when: Callable[[str], bool] = lambda sql: True, *, times: int | None = None
                  ) -> Iterator[list[str]]:
    """Queries for which ``when(sql)`` holds fail as on a lost connection (the first ``times`` of
    them; all when None). Savepoints still work: the test's own transaction must survive, as the
    real database's rollback would. Yields the SQL of the queries that failed."""
    failed: list[str] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        savepoint = sql.lstrip().upper().startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO"))
        if not savepoint and when(sql) and (times is None or len(failed) < times):
            failed.append(sql)
            raise OperationalError(GONE)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield failed


def is_write_to(table: str) -> Callable[[str], bool]:
    return lambda sql: table in sql and sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))


def assert_unavailable(response: Any, settings: Any) -> None:
    assert response.status_code == 503, response.content
    assert response.json() == BODY
    assert response["Retry-After"] == str(settings.DATABASE_RETRY_AFTER)


# --- the API ---------------------------------------------------------------------------------------


def test_every_request_answers_503_while_the_database_is_down_then_works(api, flavors, image, settings,
                                                                         outbox: Outbox) -> None:
    settings.DATABASE_RETRY_AFTER = 7
    with database_down() as failed:
        # The token is looked up first: the outage is met in DRF's authentication.
        assert_unavailable(api.get("/api/v1/servers/"), settings)
        assert_unavailable(api.post("/api/v1/servers/", {"name": "s", "flavor": "m1.nano",
                                                         "image": "tiny"}, format="json"), settings)
        assert_unavailable(api.get("/api/v1/flavors/"), settings)
    assert failed and "identity_token" in failed[0]
    assert api.get("/api/v1/servers/").status_code == 200
    created = api.post("/api/v1/servers/", {"name": "s", "flavor": "m1.nano", "image": "tiny"},
                       format="json")
    assert created.status_code == 202
    assert Instance.objects.count() == InstanceAction.objects.count() == 1


def test_a_create_that_loses_the_database_half_way_writes_nothing(api, flavors, image, settings,
                                                                  outbox: Outbox) -> None:
    """The server row is inserted, then its action's insert meets the outage: 503, and the row is
    rolled back with the rest of the transaction (no server without its action, no scheduler task)."""
    with database_down(is_write_to("compute_instanceaction")) as failed:
        response = api.post("/api/v1/servers/", {"name": "s", "flavor": "m1.nano", "image": "tiny"},
                            format="json")
    assert_unavailable(response, settings)
    assert len(failed) == 1
    assert Instance.objects.count() == InstanceAction.objects.count() == 0
    assert outbox.scheduler == []


def test_refusals_keep_their_own_answers(api, flavors, image) -> None:
    """Only a database outage is 503: a refused request still answers its 400 without Retry-After."""
    response = api.post("/api/v1/servers/", {"name": "s", "flavor": "nope", "image": "tiny"},
                        format="json")
    assert response.status_code == 400 and "Retry-After" not in response


def test_the_admin_answers_503_from_its_view_and_from_a_middleware(admin, settings) -> None:
    settings.DATABASE_RETRY_AFTER = 3
    client = Client(raise_request_exception=False)
    client.force_login(admin)
    assert client.get("/admin/").status_code == 200
    # In the view: the admin reads the user from the session.
    with database_down():
        assert_unavailable(client.get("/admin/"), settings)
    # After the view answered: the session saved on the way out (Django would answer 400
    # "session interrupted", taking the failed update for a session deleted meanwhile).
    settings.SESSION_SAVE_EVERY_REQUEST = True
    with database_down(is_write_to("django_session")) as failed:
        assert_unavailable(client.get("/admin/"), settings)
    assert failed
    assert client.get("/admin/").status_code == 200


class TouchesTheDatabaseOnTheWayOut:
    """A middleware that writes after the view (as an audit log would)."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        response = self.get_response(request)
        InstanceAction.objects.filter(pk=-1).update(message="")
        return response


def test_an_outage_met_in_any_middleware_is_503_not_500(api, settings) -> None:
    """Django turns an error raised in a middleware into a 500 before the outer middlewares see it;
    the outermost one (DatabaseUnavailableMiddleware) makes it the 503."""
    settings.MIDDLEWARE = [*settings.MIDDLEWARE,
                           "tests.control.test_database_outage.TouchesTheDatabaseOnTheWayOut"]
    api.raise_request_exception = False
    assert api.get("/api/v1/flavors/").status_code == 200
    with database_down(is_write_to("compute_instanceaction")) as failed:
        assert_unavailable(api.get("/api/v1/flavors/"), settings)
    assert len(failed) == 1


def test_the_openapi_schema_documents_the_503_on_every_operation(api) -> None:
    schema = api.get("/api/v1/schema/?format=json").json()
    operations = [op for ops in schema["paths"].values() for op in ops.values() if isinstance(op, dict)]
    assert operations
    for operation in operations:
        answer = operation["responses"]["503"]
        assert "database_unavailable" in answer["description"]
        assert "Retry-After" in answer["headers"]
    console = schema["paths"]["/api/v1/servers/{id}/console-output/"]["get"]["responses"]["503"]
    assert "did not answer" in console["description"]  # its own 503 still said


# --- the control plane's tasks ---------------------------------------------------------------------


def test_every_control_plane_task_retries_on_a_lost_database() -> None:
    for task in (conductor_tasks.instance_update, conductor_tasks.host_heartbeat,
                 conductor_tasks.reap_expired_tasks, scheduler_tasks.schedule_instance,
                 scheduler_tasks.migration_preflight):
        assert isinstance(task, DatabaseTask), task.name
    # Reports keep their signature check, inside the retry.
    assert isinstance(conductor_tasks.instance_update, conductor_tasks.SignedReport)


def test_retry_delays_grow_with_jitter_up_to_the_maximum(settings) -> None:
    settings.TASK_DATABASE_RETRY_MAX_DELAY = 30
    for retries, ceiling in ((0, 1), (1, 2), (3, 8), (4, 16), (5, 30), (9, 30)):
        delays = {retry_delay(retries) for _ in range(200)}
        assert min(delays) >= 0 and max(delays) <= ceiling
    assert max(retry_delay(9) for _ in range(200)) > 16


def test_a_report_that_loses_the_database_half_way_is_retried_and_applied_once(
        spawning: Instance, caplog) -> None:  # noqa: F811
    """The instance's row is updated, then the event's insert meets the outage: the transaction is
    rolled back whole, the task retried (its signature checked again) and the report applied once."""
    kwargs = {"instance_uuid": str(spawning.uuid), "host": "hv1", "expected_task_state": "spawning",
              "values": SPAWNED, "event": {"name": "compute_spawn", "result": "success"}}
    with database_down(is_write_to("compute_instanceactionevent"), times=1) as failed:
        result = conductor_tasks.instance_update.apply(kwargs=kwargs, headers=_signed(kwargs))
    assert len(failed) == 1
    # Run eagerly here, the retry runs at once and its result is the task's.
    assert result.get() is True
    assert "the database is unavailable" in caplog.text and "retry 1 of" in caplog.text
    spawning.refresh_from_db()
    assert (spawning.vm_state, spawning.task_state) == (VmState.ACTIVE, None)
    action = InstanceAction.objects.get(instance=spawning)
    assert action.result == contract.ActionResult.SUCCESS
    assert list(InstanceActionEvent.objects.filter(action=action).values_list("event", flat=True)) == [
        "schedule", "compute_spawn"]
    # The report delivered once more (acks_late redelivery) is dropped: nothing applies twice.
    assert deliver(conductor_tasks.instance_update, kwargs, signer="hv1") is False


def test_retries_are_bounded(spawning: Instance, settings) -> None:  # noqa: F811
    settings.TASK_DATABASE_MAX_RETRIES = 2
    kwargs = {"instance_uuid": str(spawning.uuid), "host": "hv1", "expected_task_state": "spawning",
              "values": SPAWNED}
    with database_down(is_write_to("compute_instance")) as failed:
        result = conductor_tasks.instance_update.apply(kwargs=kwargs, headers=_signed(kwargs))
        with pytest.raises(OperationalError):
            result.get(propagate=True)
    assert len(failed) == 3  # the first run and two retries
    spawning.refresh_from_db()
    assert spawning.task_state == TaskState.SPAWNING


def test_a_direct_call_is_not_retried(spawning: Instance) -> None:  # noqa: F811
    with database_down(is_write_to("compute_instance")) as failed, pytest.raises(OperationalError):
        conductor_tasks.instance_update(instance_uuid=str(spawning.uuid), host="hv1",
                                        expected_task_state="spawning", values=SPAWNED)
    assert len(failed) == 1


def test_a_schedule_that_loses_the_database_after_its_claim_claims_once(
        member, project, flavors, image, outbox: Outbox, caplog) -> None:
    """The claim (host, allocation) and its event are one transaction with the spawn sent after it:
    an outage between them leaves the server scheduling with nothing claimed and no spawn sent, and
    the retry places it once."""
    from cloudctl.compute.services import server_create

    heartbeat("hv1")
    server = server_create(user=member, project=project, name="s", flavor=flavors["m1.nano"],
                           image=image)
    with database_down(is_write_to("compute_instanceactionevent"), times=1) as failed:
        result = scheduler_tasks.schedule_instance.apply(kwargs={"instance_uuid": str(server.uuid)})
    assert len(failed) == 1 and result.get() == "hv1" and "retry 1 of" in caplog.text
    server.refresh_from_db()
    assert (server.task_state, server.host.name, server.attempts) == (TaskState.SPAWNING, "hv1", 1)
    assert Allocation.objects.filter(instance=server).count() == 1
    assert [(host, name) for host, name, _ in outbox.compute] == [("hv1", contract.COMPUTE_SPAWN)]
    assert list(InstanceActionEvent.objects.filter(action__instance=server).values_list(
        "event", flat=True)) == ["schedule"]


def test_a_worker_restart_report_is_retried_not_half_recovered(spawning: Instance, outbox,  # noqa: F811
                                                                caplog) -> None:
    """host_init recovers each server apart ("one bad row must not stop the others"), but a lost
    database is no bad row: the task is retried and recovers every server."""
    # The worker restarted after the domain started: host_init completes the build (a write of the
    # instance, which the outage fails once).
    kwargs = {"host": "hv1", "resources": {**_resources(), "instances": {str(spawning.uuid): "running"}}}
    with database_down(is_write_to("compute_instance"), times=1) as failed:
        result = conductor_tasks.host_init.apply(kwargs=kwargs, headers=_signed(kwargs, "host.init"))
    result.get()
    assert failed and "retry 1 of" in caplog.text
    spawning.refresh_from_db()
    # Completed, as on a first delivery.
    assert (spawning.vm_state, spawning.task_state) == (VmState.ACTIVE, None)


def _resources() -> dict[str, Any]:
    import time

    return {"libvirt_uri": "test:///default", "driver": "fake", "virt_type": "qemu",
            "hypervisor_type": "QEMU", "hypervisor_version": 7002000, "vcpus": 4, "memory_mb": 8192,
            "memory_mb_reserved": 0, "disk_gb": 100, "disk_gb_reserved": 0,
            "cpu_info": {"arch": "x86_64"}, "instances": {}, "observed_at": time.time(), "tunnel_ip": ""}


def _signed(kwargs: dict[str, Any], _: str = "", task: Any = None) -> dict[str, str]:
    """hv1's signature headers of ``kwargs`` for ``task`` (host_init for resources, else
    instance_update)."""
    from compute_workers import credentials

    from .test_host_keys import key

    if task is None:
        task = conductor_tasks.host_init if "resources" in kwargs else conductor_tasks.instance_update
    return credentials.sign(key("hv1"), task.name, "hv1", kwargs)


def test_a_heartbeat_that_loses_the_database_after_a_new_tunnel_ip_still_tells_the_peers(
        admin, project, outbox: Outbox, commit, caplog) -> None:
    """The new tunnel IP and the sync of the hosts sharing a vxlan network with it are one
    transaction: an outage between them rolls the IP back, and the retry sends the sync."""
    from .network.test_hostsync import TUNNELS, guest_port, network, synced

    for name, ip in TUNNELS.items():
        heartbeat(name, tunnel_ip=ip)
    net = network(admin, project, dhcp=False)
    guest_port(admin, project, net, "hv1")
    guest_port(admin, project, net, "hv2")
    outbox.host_syncs.clear()
    kwargs = {"host": "hv1", "resources": {**_resources(), "tunnel_ip": "192.0.2.111"}}
    reading_peers = lambda sql: sql.lstrip().startswith("SELECT") and '"network_port"' in sql  # noqa: E731
    with commit(), database_down(reading_peers, times=1) as failed:
        conductor_tasks.host_heartbeat.apply(kwargs=kwargs, headers=_signed(kwargs, "heartbeat",
                                                                           conductor_tasks.host_heartbeat))
    assert failed and "retry 1 of" in caplog.text
    sent = synced(outbox)
    assert list(sent) == ["hv2"] and sent["hv2"]["networks"][0]["peers"] == ["192.0.2.111"]
