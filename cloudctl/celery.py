"""The Celery app of the control plane: scheduler, conductor and beat run it (with Django)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cloudctl.settings")

# Every task of this app retries when the database is lost (cloudctl.database.DatabaseTask).
app = Celery("cloudctl", task_cls="cloudctl.database:DatabaseTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
