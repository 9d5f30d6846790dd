"""WSGI entry point (gunicorn cloudctl.wsgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cloudctl.settings")
application = get_wsgi_application()
