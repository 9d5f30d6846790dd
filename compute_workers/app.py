"""The compute workers' own Celery app: configured from :class:`ComputeConfig`, no Django.

Every setting the worker depends on is spelled out here rather than left to a default.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from compute_workers.config import ComputeConfig

# A console-output answer nobody collected within five minutes never will be.
RESULT_EXPIRES = 300


def celery_settings(config: ComputeConfig) -> dict[str, Any]:
    return {
        "broker_url": config.broker_connection_url,
        # Celery takes the environment's CELERY_BROKER_URL over broker_url, and that variable holds the
        # URL without REDIS_PASSWORD: the URLs it connects with are set explicitly.
        "broker_read_url": config.broker_connection_url,
        "broker_write_url": config.broker_connection_url,
        "broker_connection_retry_on_startup": True,
        # Redis has no real acknowledgements: a task that is delivered and not acknowledged within
        # visibility_timeout is delivered again (to any worker of the queue). It must exceed the longest
        # hard time limit, or a long spawn would run twice while the first is still going
        # (ComputeConfig checks this at start).
        "broker_transport_options": {"visibility_timeout": config.visibility_timeout},
        # Only the results of synchronous calls (get_console_output) are stored, in their own Redis DB.
        "result_backend": config.rpc_backend_url,
        "result_expires": RESULT_EXPIRES,
        "task_ignore_result": True,
        # JSON only: tasks carry plain data, and pickle from the network would run arbitrary code.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Acknowledge a task after it ran, not when it arrives: a worker killed mid-spawn (host crash,
        # OOM, SIGKILL) leaves the message unacknowledged and Redis delivers it again. Safe because
        # every compute task is idempotent (a spawn finds the domain by its name).
        "task_acks_late": True,
        # With acks_late: a task whose executing worker died is requeued, not acknowledged as failed.
        "task_reject_on_worker_lost": True,
        # Reserve one task per thread and no more: a reserved task waits behind a long spawn, and would
        # be held (unacknowledged) by this worker until it finishes.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": config.concurrency,
        "worker_pool": "threads",
        # Flower (and `celery events`) see the workers and their tasks only through events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # Spelled out to keep Celery 5's behaviour (and silence its warning): on a lost broker
        # connection running tasks finish; their late acknowledgement makes Redis redeliver them.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": config.queue,
        "enable_utc": True,
    }


def create_app(config: ComputeConfig) -> Celery:
    """A configured Celery app named "compute_workers"; tasks are added by ``tasks.register_tasks``."""
    # fixups=[]: Celery's default Django fixup imports Django (and its settings) whenever
    # DJANGO_SETTINGS_MODULE is set in the environment, as it is for the control plane's processes.
    app = Celery("compute_workers", set_as_current=False, fixups=[])
    app.conf.update(celery_settings(config))
    return app
