"""compute_workers.credentials and the signing reporter: Redis URLs made from one password, report
signatures that survive the broker's JSON and bind a report to one host, and the worker's own key."""

from __future__ import annotations

import os
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from celery import Celery, Task
from celery.contrib.testing.worker import start_worker
from kombu.utils.json import dumps, loads

from compute_workers import contract, credentials
from compute_workers.app import celery_settings, create_app
from compute_workers.config import ComputeConfig
from compute_workers.reporter import CeleryReporter, derived_host_keys, one_host_key


@pytest.mark.parametrize(("url", "password", "expected"), [
    ("redis://127.0.0.1:6379/0", "s3cret", "redis://:s3cret@127.0.0.1:6379/0"),
    ("rediss://cache.example:6380/2", "p@ss/w:rd", "rediss://:p%40ss%2Fw%3Ard@cache.example:6380/2"),
    ("redis://worker@10.0.0.1:6379/1", "pw", "redis://worker:pw@10.0.0.1:6379/1"),  # an ACL user
    ("redis://:own@127.0.0.1:6379/0", "s3cret", "redis://:own@127.0.0.1:6379/0"),  # names its own
    ("redis://127.0.0.1:6379/0", "", "redis://127.0.0.1:6379/0"),  # no password: as it was
    ("memory://", "s3cret", "memory://"),  # not Redis
])
def test_redis_urls_carry_the_one_password(url: str, password: str, expected: str) -> None:
    assert credentials.redis_url(url, password) == expected


def test_the_password_comes_from_the_environment_else_the_state_dirs_file(tmp_path: Path) -> None:
    assert credentials.redis_password({}, tmp_path) == ""
    (tmp_path / "redis.password").write_text("from-file\n")
    assert credentials.redis_password({}, tmp_path) == "from-file"
    assert credentials.redis_password({"REDIS_PASSWORD": "from-env"}, tmp_path) == "from-env"
    assert credentials.redis_password({"REDIS_PASSWORD": " "}, tmp_path) == "from-file"
    assert credentials.redis_password({}, tmp_path / "missing") == ""


def test_the_worker_puts_redis_password_in_both_urls() -> None:
    config = ComputeConfig.from_env(environ={"REDIS_PASSWORD": "pw", "CELERY_BROKER_URL": "redis://h:1/3",
                                             "CELERY_RPC_BACKEND": "redis://h:1/4"})
    settings = celery_settings(config)
    assert (settings["broker_url"], settings["result_backend"]) == ("redis://:pw@h:1/3", "redis://:pw@h:1/4")
    # Celery prefers the environment's CELERY_BROKER_URL (no password) to broker_url: what it connects
    # with is the URL with the password all the same.
    app = create_app(config)
    with patch.dict(os.environ, {"CELERY_BROKER_URL": "redis://h:1/3"}):
        assert app.conf.broker_url == "redis://h:1/3"
        for connection in (app.connection_for_read(), app.connection_for_write()):
            assert connection.as_uri(include_password=True) == "redis://:pw@h:1/3"
    assert "pw" not in repr(config) and "k3y" not in repr(ComputeConfig.from_env(
        environ={"COMPUTE_HOST_KEY": "k3y"}))


REPORT = {"instance_uuid": uuid.UUID(int=7), "at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
          "host": "hv1", "expected_task_state": None,
          "values": {"vm_state": "active", "task_state": None}, "event": {"name": "é", "result": "Start"},
          "observed_at": 1765000000.123456789, "tuple": (1, 2)}


def test_a_signature_survives_the_brokers_json_and_binds_task_host_time_and_arguments() -> None:
    key = credentials.host_key("secret", "hv1", 1)
    headers = credentials.sign(key, contract.CONDUCTOR_INSTANCE_UPDATE, "hv1", REPORT, now=lambda: 1000.0)
    received = loads(dumps(REPORT))  # what the conductor's task gets: tuples are lists now
    assert isinstance(received["instance_uuid"], uuid.UUID) and received["tuple"] == [1, 2]
    keys = {"hv1": key, "hv2": credentials.host_key("secret", "hv2", 1)}
    verify = {"key_of": keys.get, "now": lambda: 1100.0}
    assert credentials.verify(loads(dumps(headers)), contract.CONDUCTOR_INSTANCE_UPDATE, received,
                              **verify) == "hv1"
    refusals = {
        "unsigned": ({}, contract.CONDUCTOR_INSTANCE_UPDATE, received),
        "bad signature": (headers, contract.CONDUCTOR_INSTANCE_DESTROYED, received),  # another task
        "bad signature for": (headers, contract.CONDUCTOR_INSTANCE_UPDATE, {**received, "values": {}}),
        "speaks for host 'hv2'": (headers, contract.CONDUCTOR_INSTANCE_UPDATE, {**received, "host": "hv2"}),
        "a replay": ({**headers, credentials.TIMESTAMP_HEADER: "600.0"}, contract.CONDUCTOR_INSTANCE_UPDATE,
                     received),
        "is not a number": ({**headers, credentials.TIMESTAMP_HEADER: "nan?"},
                            contract.CONDUCTOR_INSTANCE_UPDATE, received),
        "no key for host 'hv3'": ({**headers, credentials.HOST_HEADER: "hv3"},
                                  contract.CONDUCTOR_INSTANCE_UPDATE, {**received, "host": "hv3"}),
        "speaks for host None": (headers, contract.CONDUCTOR_INSTANCE_UPDATE,
                                 {k: v for k, v in received.items() if k != "host"}),
    }
    for reason, (sent_headers, task_name, kwargs) in refusals.items():
        with pytest.raises(credentials.ReportRejected, match=reason):
            credentials.verify(sent_headers, task_name, kwargs, **verify)
    # Another generation of hv1's key is another key.
    assert credentials.host_key("secret", "hv1", 2) != key != credentials.host_key("other", "hv1", 1)


def test_the_reporter_signs_each_report_with_its_hosts_key() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    class RecordingApp:
        def send_task(self, name: str, **options: Any) -> None:
            sent.append((name, options))

    reporter = CeleryReporter(RecordingApp(), one_host_key("hv1", "k1"))  # type: ignore[arg-type]
    reporter.report(contract.CONDUCTOR_HOST_HEARTBEAT, host="hv1", resources={})
    reporter.report(contract.CONDUCTOR_HOST_STOPPING, host="hv2")  # not its host: unsigned
    (name, options), (_, unsigned) = sent
    assert options["headers"][credentials.HOST_HEADER] == "hv1" and options["expires"] == 60.0
    assert credentials.verify(options["headers"], name, options["kwargs"], {"hv1": "k1"}.get) == "hv1"
    assert "headers" not in unsigned
    fleet = derived_host_keys("secret")
    assert fleet("fake-1") == credentials.host_key("secret", "fake-1", credentials.FIRST_GENERATION)


def test_the_signature_headers_reach_the_task_through_a_real_worker() -> None:
    """Through a Celery worker (memory transport): the conductor's task reads the reporter's headers
    on ``self.request.headers``, and a message cannot pretend to be a direct call."""
    app = Celery("credentials-test", broker="memory://", fixups=[])
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
    seen: dict[str, Any] = {}
    done = threading.Event()

    class Recording(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            seen.update(direct=self.request.called_directly, headers=dict(self.request.headers or {}),
                        kwargs=kwargs)
            done.set()
            return None

    # A name of its own: cloudctl's shared conductor tasks join every Celery app of the process.
    @app.task(name="tests.signed_probe", base=Recording)
    def signed_probe(host: str) -> None:
        """Stands for a conductor task."""
    reporter = CeleryReporter(app, one_host_key("hv1", "k1"))
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[contract.CONDUCTOR_QUEUE]):
        reporter.report("tests.signed_probe", host="hv1")
        assert done.wait(10)
    assert seen["direct"] is False
    assert credentials.verify(seen["headers"], "tests.signed_probe", seen["kwargs"],
                              {"hv1": "k1"}.get) == "hv1"


@pytest.mark.parametrize(("url", "ok"), [
    ("http://api:8000/api/v1/images/1/file", True),
    ("http://API:8000/api/v1/images/1/file", True),  # host names are case-insensitive
    ("http://api:8001/api/v1/images/1/file", False),
    ("https://api:8000/api/v1/images/1/file", False),
    ("http://api.evil:8000/api/v1/images/1/file", False),
    ("http://evil/?http://api:8000/api/v1/", False),
    ("http://api:8000@evil/api/v1/images/1/file", False),
    ("http://api:8000/api/v2/images/1/file", False),  # beside the prefix
    ("http://api:8000/api/v1/../../admin/", False),
    ("", False),
])
def test_the_service_token_goes_only_under_the_api_url(url: str, ok: bool) -> None:
    if ok:
        assert credentials.check_api_url(url, "http://api:8000/api/v1") == url
    else:
        with pytest.raises(credentials.UntrustedURL, match=r"is not (under|a URL)"):
            credentials.check_api_url(url, "http://api:8000/api/v1")
