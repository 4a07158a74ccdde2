"""Task routes: which queue (and priority) a task's messages go to, decided by the sender.

``task_routes`` takes Celery's shapes: a mapping of exact task names and globs (``"billing.*"``)
to a queue name or to ``{"queue": ..., "priority": ...}``; a callable ``(name, args, kwargs)``
returning one of those or None (no opinion); or a list of those, tried in order until one
answers. In a mapping an exact name wins over globs, and globs are tried in their order.

Static routes cost one dict lookup per send: a task name's answer from the mappings is worked out
on its first send and kept (``plan``), so only callables run per send. Every route value is
checked when the setting is applied; a callable's answer is checked when it is given.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias

from .errors import ConfigurationError
from .task import check_priority

__all__ = ["Route", "RouteFunction", "Router", "TaskRoutes", "check_routes"]

Route: TypeAlias = "str | Mapping[str, Any]"
"""A queue name, or ``{"queue": name, "priority": 0..9}`` (either key may be left out)."""
RouteFunction: TypeAlias = "Callable[[str, tuple[Any, ...], dict[str, Any]], Route | None]"
TaskRoutes: TypeAlias = (
    "Mapping[str, Route] | RouteFunction | Sequence[Mapping[str, Route] | RouteFunction]"
)
_ROUTE_KEYS = frozenset({"queue", "priority"})
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a route sends a message; None fields leave the choice to the task's own defaults."""

    queue: str | None = None
    priority: int | None = None


def destination(value: object, where: str) -> Destination:
    """A route value as a Destination, or ConfigurationError naming the value and ``where``."""
    if type(value) is str:
        if value:
            return Destination(queue=value)
    elif isinstance(value, Mapping):
        unknown = set(value) - _ROUTE_KEYS
        if unknown:
            raise ConfigurationError(
                f"route {where} has unknown key(s) {sorted(map(str, unknown))} in {value!r}; "
                f"a route sets {sorted(_ROUTE_KEYS)}"
            )
        queue = value.get("queue")
        if queue is not None and (type(queue) is not str or not queue):
            raise ConfigurationError(
                f"route {where}: queue must be a non-empty string, not {queue!r}"
            )
        priority = value.get("priority")
        if priority is not None:
            check_priority(priority, f"route {where}: priority")
        return Destination(queue=queue, priority=priority)
    raise ConfigurationError(
        f"route {where} must be a queue name or a dict with 'queue' and/or 'priority', "
        f"not {value!r}"
    )


class _MapRoute:
    """One mapping of names and globs, its values checked and converted once."""

    __slots__ = ("exact", "globs")

    def __init__(self, routes: Mapping[Any, Any]) -> None:
        self.exact: dict[str, Destination] = {}
        self.globs: list[tuple[re.Pattern[str], Destination]] = []
        for pattern, value in routes.items():
            if type(pattern) is not str or not pattern:
                raise ConfigurationError(
                    f"task_routes keys must be task names or globs, not {pattern!r}"
                )
            target = destination(value, f"for {pattern!r}")
            if _GLOB.search(pattern):
                self.globs.append((re.compile(fnmatch.translate(pattern)), target))
            else:
                self.exact[pattern] = target

    def match(self, name: str) -> Destination | None:
        found = self.exact.get(name)
        if found is not None:
            return found
        for pattern, target in self.globs:
            if pattern.match(name):
                return target
        return None


_Step: TypeAlias = "Destination | RouteFunction"


class Router:
    """Resolves ``task_routes`` for a task name (and, for callables, its arguments)."""

    __slots__ = ("_plans", "_steps", "source")

    def __init__(self, routes: object) -> None:
        items: Sequence[object]
        if isinstance(routes, Mapping) or callable(routes):
            items = (routes,)
        elif isinstance(routes, list | tuple):
            items = routes
        else:
            raise ConfigurationError(
                "task_routes must be a mapping of task names or globs to routes, a callable "
                f"(name, args, kwargs) -> route | None, or a list of those, not {routes!r}"
            )
        self._steps: tuple[_MapRoute | RouteFunction, ...] = tuple(
            _step(item, index) for index, item in enumerate(items)
        )
        self._plans: dict[str, Destination | tuple[_Step, ...] | None] = {}
        self.source: object = (
            _frozen(routes) if isinstance(routes, Mapping) else tuple(map(_frozen, items))
        )
        """A read-only copy of the setting, which the app puts in its place: routes are
        worked out once per name, so changing them in place would be ignored; instead it
        fails, and assigning a new ``task_routes`` is what takes effect."""

    def _plan(self, name: str) -> Destination | tuple[_Step, ...] | None:
        """What routing ``name`` takes: the static answer itself when no callable comes before
        it, else the steps left (mappings already matched) to walk on each send."""
        steps: list[_Step] = []
        for step in self._steps:
            if isinstance(step, _MapRoute):
                found = step.match(name)
                if found is None:
                    continue
                if not steps:
                    return found
                steps.append(found)
                break
            steps.append(step)
        return tuple(steps) if steps else None

    def route(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Destination | None:
        """The destination for one message of ``name``, or None when no route says anything."""
        try:
            plan = self._plans[name]
        except KeyError:
            plan = self._plans[name] = self._plan(name)
        if plan is None or isinstance(plan, Destination):
            return plan
        for step in plan:
            if isinstance(step, Destination):
                return step
            answer = step(name, args, kwargs)
            if answer is not None:
                return destination(answer, f"returned by {_describe(step)} for {name!r}")
        return None


def _step(item: object, index: int) -> _MapRoute | RouteFunction:
    if isinstance(item, Mapping):
        return _MapRoute(item)
    if callable(item):
        return item
    raise ConfigurationError(
        f"task_routes[{index}] must be a mapping or a callable (name, args, kwargs), not {item!r}"
    )


def _frozen(item: object) -> object:
    if isinstance(item, Mapping):
        return MappingProxyType(
            {
                key: MappingProxyType(dict(v)) if isinstance(v, Mapping) else v
                for key, v in item.items()
            }
        )
    return item


def _describe(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def check_routes(routes: object) -> Router | None:
    """The router for a ``task_routes`` setting (None: no routes), every static value checked."""
    if routes is None:
        return None
    return Router(routes)
