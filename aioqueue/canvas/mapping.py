"""``task.map``, ``task.starmap`` and ``task.chunks``: many calls of one task in one message.

A map is one message for the built-in task ``aioqueue.starmap``, which every worker knows
without registering it (the handler asks :func:`builtin_task` when a name is not in the app's
registry, so plain tasks pay nothing). It runs the named task's function for each item in order,
in the worker that took the message: async functions on its loop, plain ones (thread or process
tasks) on a thread, one after another. Its result is the list of results; the first call that
raises fails the whole message. ``chunks(items, n)`` is a group of such messages, one per ``n``
items, so its result is one list per chunk.

A map made with its items is immutable in a chain (the previous result does not go in front of
the items); ``task.map()`` with no items takes them from the previous step.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, TaskNotRegistered

if TYPE_CHECKING:
    from ..app import App
    from ..task import Task

__all__ = ["STARMAP", "builtin_task", "chunk_calls", "starmap_items"]

STARMAP = "aioqueue.starmap"

_BUILTINS: weakref.WeakKeyDictionary[App, Task[Any, Any]] = weakref.WeakKeyDictionary()


def builtin_task(app: App, name: str) -> Task[Any, Any] | None:
    """The built-in task called ``name`` for ``app`` (made once per app), or None."""
    if name != STARMAP:
        return None
    task = _BUILTINS.get(app)
    if task is None:
        from ..task import Task

        async def starmap(items: list[Any], task_name: str, star: bool = False) -> list[Any]:
            return await _run_each(app, items, task_name, star)

        task = _BUILTINS[app] = Task(
            app,
            starmap,
            name=STARMAP,
            queue=None,
            executor=None,
            result_ttl=None,
            track_started=None,
        )
    return task


async def _run_each(app: App, items: list[Any], task_name: str, star: bool) -> list[Any]:
    task = app.tasks.get(task_name)
    if task is None:
        raise TaskNotRegistered(f"map of task {task_name!r}: it is not registered here")
    if not isinstance(items, list):
        raise ConfigurationError(f"map of {task_name!r} needs a list of items, not {items!r}")
    results: list[Any] = []
    for item in items:
        args = tuple(item) if star else (item,)
        if task.executor == "async":
            results.append(await task(*args))
        else:
            results.append(await asyncio.to_thread(task, *args))
    return results


def starmap_items(items: Iterable[Any], *, star: bool) -> list[Any]:
    """The items as wire data: for a starmap each one a list of positional arguments."""
    if star:
        calls = [list(item) for item in items]
        return calls
    return list(items)


def chunk_calls(items: Iterable[Any], size: int) -> list[list[Any]]:
    """``items`` (each a tuple of arguments) cut into lists of ``size``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigurationError(f"chunks() takes a chunk size of at least 1, not {size!r}")
    calls = starmap_items(items, star=True)
    return [calls[start : start + size] for start in range(0, len(calls), size)]
