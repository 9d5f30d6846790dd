"""The Celery app of the control plane: scheduler, conductor and beat run it (with Django)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cloudctl.settings")

app = Celery("cloudctl")
app.config_from_object("django.conf:settings", namespace="CELERY")
