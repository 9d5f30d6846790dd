"""A bare Celery app for the broker-restart test: the consumer code that must survive a Redis restart
is Celery's and kombu's, not cloudctl's, so the test runs it without Django or a database. Each task
appends its argument to the file named by BROKER_TEST_OUTPUT."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("broker_restart", broker=os.environ["BROKER_TEST_URL"])
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_send_task_events = True  # as the product's workers (Flower's events)
app.conf.broker_transport_options = {"visibility_timeout": 7200}


@app.task(name="broker_restart.record")
def record(marker: str) -> None:
    with open(os.environ["BROKER_TEST_OUTPUT"], "a", encoding="utf-8") as out:
        out.write(marker + "\n")
