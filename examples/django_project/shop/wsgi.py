"""WSGI entry point: gunicorn shop.wsgi (each pre-forked worker gets its own sync client)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
application = get_wsgi_application()
