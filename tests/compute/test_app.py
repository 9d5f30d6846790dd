"""The Celery app's settings, the tasks' registration (each family registers its own: see the family's
test module for its tasks' kwargs), the reporter and the heartbeat thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from compute_workers import contract
from compute_workers.app import celery_settings, create_app
from compute_workers.config import ComputeConfig
from compute_workers.heartbeat import Heartbeat
from compute_workers.operations import FAMILIES
from compute_workers.reporter import CeleryReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeDriver

from .conftest import make_manager


def test_celery_settings_are_explicit() -> None:
    config = ComputeConfig.from_env(environ={"CELERY_BROKER_URL": "redis://h:1/3",
                                             "CELERY_RPC_BACKEND": "redis://h:1/4", "COMPUTE_HOST": "n1",
                                             "COMPUTE_CONCURRENCY": "3"})
    settings = celery_settings(config)
    assert settings["broker_url"] == "redis://h:1/3" and settings["result_backend"] == "redis://h:1/4"
    assert settings["task_serializer"] == "json" and settings["accept_content"] == ["json"]
    assert settings["task_acks_late"] is True and settings["task_reject_on_worker_lost"] is True
    assert settings["worker_prefetch_multiplier"] == 1
    assert settings["worker_send_task_events"] is True and settings["task_send_sent_event"] is True
    assert settings["broker_connection_retry_on_startup"] is True
    assert settings["result_expires"] == 300
    assert settings["worker_pool"] == "threads" and settings["worker_concurrency"] == 3
    longest = max(hard for _, _, hard in config.time_limits())
    assert settings["broker_transport_options"]["visibility_timeout"] > longest
    app = create_app(config)
    assert app.main == "compute_workers"
    assert app.conf.task_acks_late is True
    assert list(app.fixups) == []  # no Django fixup, even with DJANGO_SETTINGS_MODULE set


class RecordingApp:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, **options: Any) -> None:
        self.sent.append((name, options))


def test_celery_reporter_sends_to_the_conductor_queue() -> None:
    app = RecordingApp()
    reporter = CeleryReporter(app)
    reporter.report(contract.CONDUCTOR_INSTANCE_DESTROYED, instance_uuid="u", host="h")
    reporter.report(contract.CONDUCTOR_HOST_HEARTBEAT, host="h", resources={})
    retry = {"retry": True, "retry_policy": CeleryReporter.RETRY_POLICY}
    assert app.sent == [
        (contract.CONDUCTOR_INSTANCE_DESTROYED,
         {"kwargs": {"instance_uuid": "u", "host": "h"}, "queue": contract.CONDUCTOR_QUEUE, **retry}),
        (contract.CONDUCTOR_HOST_HEARTBEAT,
         {"kwargs": {"host": "h", "resources": {}}, "queue": contract.CONDUCTOR_STATUS_QUEUE,
          "expires": 60.0, **retry}),
    ]


def test_heartbeat_beats_at_once_then_on_interval_and_survives_failures() -> None:
    beats: list[float] = []
    third = threading.Event()

    def beat() -> None:
        beats.append(time.monotonic())
        if len(beats) == 2:
            raise ConnectionError("broker away")
        if len(beats) == 3:
            third.set()

    started = time.monotonic()
    heartbeat = Heartbeat(beat, interval=0.5)  # wide: a busy machine cannot blur "at once" with "later"
    heartbeat.start()
    assert third.wait(10)
    heartbeat.stop()
    assert not heartbeat.is_alive()
    assert beats[0] - started < 0.4  # the first one does not wait for the interval
    assert beats[2] - beats[1] >= 0.45  # a failure does not make it hurry or stop


def test_every_compute_task_is_registered_once_by_its_family(tmp_path: Path) -> None:
    """The families together register exactly the tasks that have time limits, each once: the control
    plane sends them by name."""
    manager, _ = make_manager(FakeDriver(), tmp_path)
    names = [name for name, _, _ in manager.config.time_limits()]
    # What an app has without any family: Celery's own tasks, and any shared task another part of the
    # test session imported (the control plane's @shared_task, added to every app Celery finalizes).
    bare = create_app(manager.config)
    bare.finalize()
    not_ours = set(bare.tasks)
    by_family: dict[str, list[str]] = {}
    for family in FAMILIES:
        app = create_app(manager.config)
        register_tasks(app, manager, families=(family,))
        app.finalize()
        by_family[family.__name__] = sorted(n for n in app.tasks if n not in not_ours)
    registered = [name for tasks in by_family.values() for name in tasks]
    assert sorted(registered) == sorted(names) and len(set(registered)) == len(registered), by_family
    app = create_app(manager.config)
    register_tasks(app, manager)
    app.finalize()
    for name, soft, hard in manager.config.time_limits():
        task = app.tasks[name]
        assert (task.soft_time_limit, task.time_limit) == (soft, hard), name
        assert task.typing and task.run.__self__ is task, name  # bind=True
