"""``aioqueue worker shop.worker:app``: Django is set up before the tasks (and so the models)
are imported, which a task module cannot do for itself while Django imports it for a view."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
django.setup()

from orders import tasks  # noqa: E402  registers the tasks

from shop.taskqueue import app  # noqa: E402

__all__ = ["app", "tasks"]
