"""The Celery app's settings, the tasks' registration, the reporter and the heartbeat thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from compute_workers import contract
from compute_workers.app import celery_settings, create_app
from compute_workers.config import ComputeConfig
from compute_workers.heartbeat import Heartbeat
from compute_workers.operations import Build
from compute_workers.reporter import CeleryReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeDriver

from .conftest import HOST, SpecFactory, make_manager


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


def test_tasks_are_registered_with_contract_names_and_limits(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(FakeDriver(), tmp_path)
    app = create_app(manager.config)
    register_tasks(app, manager)
    app.finalize()
    spawn = app.tasks[contract.COMPUTE_SPAWN]
    assert (spawn.soft_time_limit, spawn.time_limit) == (900, 960) and spawn.ignore_result
    assert app.tasks[contract.COMPUTE_TERMINATE].time_limit == 180
    console = app.tasks[contract.COMPUTE_CONSOLE_OUTPUT]
    assert not console.ignore_result and console.time_limit == 30

    spec = make_spec()
    spawn.run(spec=spec)  # what a delivered message calls: the thin task runs the manager
    assert reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)[0]["values"]["vm_state"] == "active"
    assert console.run(instance_uuid=spec["instance_uuid"], lines=None)["output"].endswith(
        "cloudctl-guest: ready\n")
    app.tasks[contract.COMPUTE_TERMINATE].run(instance_uuid=spec["instance_uuid"])
    assert reporter.named(contract.CONDUCTOR_INSTANCE_DESTROYED) == [
        {"instance_uuid": spec["instance_uuid"], "host": HOST}]


def test_lifecycle_tasks_take_the_contract_kwargs(tmp_path: Path, make_spec: SpecFactory) -> None:
    manager, reporter = make_manager(FakeDriver(), tmp_path)
    app = create_app(manager.config)
    register_tasks(app, manager)
    app.finalize()
    spec = make_spec()
    uuid = spec["instance_uuid"]
    manager.family(Build).spawn(spec)
    reporter.reports.clear()
    calls: list[tuple[str, dict[str, Any]]] = [
        (contract.COMPUTE_REBOOT, {"reboot_type": "SOFT", "spec": spec}),
        (contract.COMPUTE_REBOOT, {"reboot_type": "HARD", "spec": spec}),
        (contract.COMPUTE_PAUSE, {}), (contract.COMPUTE_UNPAUSE, {}),
        (contract.COMPUTE_SUSPEND, {}), (contract.COMPUTE_RESUME, {}),
        (contract.COMPUTE_POWER_OFF, {"timeout": 30}), (contract.COMPUTE_POWER_ON, {"spec": spec}),
    ]
    for action_id, (name, kwargs) in enumerate(calls, start=1):
        task = app.tasks[name]
        assert (task.soft_time_limit, task.time_limit) == (300, 360) and task.ignore_result
        task.run(instance_uuid=uuid, action_id=action_id, **kwargs)
    results = [update for update in reporter.named(contract.CONDUCTOR_INSTANCE_UPDATE)
               if update["event"]["result"] != "start"]
    assert [(u["event"]["name"], u["event"]["result"], u["action_id"]) for u in results] == [
        ("compute_reboot_instance", "success", 1), ("compute_reboot_instance", "success", 2),
        ("compute_pause_instance", "success", 3), ("compute_unpause_instance", "success", 4),
        ("compute_suspend_instance", "success", 5), ("compute_resume_instance", "success", 6),
        ("compute_stop_instance", "success", 7), ("compute_start_instance", "success", 8)]


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
    assert app.sent == [
        (contract.CONDUCTOR_INSTANCE_DESTROYED,
         {"kwargs": {"instance_uuid": "u", "host": "h"}, "queue": contract.CONDUCTOR_QUEUE}),
        (contract.CONDUCTOR_HOST_HEARTBEAT,
         {"kwargs": {"host": "h", "resources": {}}, "queue": contract.CONDUCTOR_STATUS_QUEUE,
          "expires": 60.0}),
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
