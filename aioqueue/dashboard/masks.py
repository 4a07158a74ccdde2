"""Task arguments as the dashboard shows them: secrets masked, size bounded.

Two maskings apply: by name and value (:func:`aioqueue.worker.remote.mask_arguments`: a
``password=`` keyword, a URL's password), and, where the app's tasks declare sensitive
parameters (``@app.task(sensitive=...)``, ``Secret[...]``: the ``aioqueue.masking`` module),
those parameters by position and name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import orjson

from ..worker.remote import mask_arguments

if TYPE_CHECKING:
    from ..app import App

__all__ = ["display_arguments", "shown"]

_MAX_SHOWN = 4000  # characters of arguments or a result shown on a page


def _by_task(app: App, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        masking = importlib.import_module("aioqueue.masking")
    except ImportError:  # a build without declared sensitive parameters
        return args, kwargs
    task = app.tasks.get(name)
    if task is None:
        return args, kwargs
    return masking.masked_arguments(task, args, kwargs)


def display_arguments(
    app: App, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``{"args": [...], "kwargs": {...}}`` with every secret masked."""
    args, kwargs = _by_task(app, name, tuple(args), dict(kwargs))
    return {"args": mask_arguments(list(args)), "kwargs": mask_arguments(kwargs)}


def shown(value: Any) -> str:
    """JSON text of ``value`` (``repr`` for what JSON cannot hold), cut to a page's size."""
    text = orjson.dumps(value, default=repr, option=orjson.OPT_INDENT_2).decode()
    if len(text) > _MAX_SHOWN:
        return text[:_MAX_SHOWN] + f"\n… ({len(text) - _MAX_SHOWN} more characters)"
    return text
