"""Keeping secret task arguments out of logs, stored failures and displays.

Two ways to mark an argument secret:

* ``@app.task(sensitive=("card", "token"))`` names parameters;
* a parameter annotated ``Secret[str]`` (any ``Secret[...]``) is sensitive too, and the task
  receives a :class:`Secret`, whose ``repr``/``str`` never show the value (``.value`` does).

A sensitive value still travels in the message (the broker must hold it to deliver it: protect
it there with TLS, ACLs and ``signing_key``). What the worker writes *about* the task is masked:
the error message, args and traceback of a FAILURE or RETRY outcome (so the stored result, the
log line and a client's ``RemoteError``) have every sensitive value replaced by ``********``.

One helper for every display (events, inspect, dashboards): :func:`masked_arguments` gives a
task's arguments with the sensitive ones masked; :func:`mask_text` scrubs known values from text.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .config import MASK
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .message import Outcome
    from .task import Task

__all__ = [
    "Secret",
    "mask_outcome",
    "mask_text",
    "masked_arguments",
    "sensitive_params",
    "sensitive_values",
    "wrap_secrets",
]

T = TypeVar("T")

_MIN_MASKED = 3
"""Shorter values are not scrubbed from text: masking every "1" would garble the message."""


class Secret(Generic[T]):
    """A value that never shows in a ``repr``, ``str`` or log line: read it with ``.value``.

    Sent as its plain value (JSON has no place for a wrapper); a worker hands a parameter
    annotated ``Secret[...]`` to the task wrapped again.
    """

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __reduce__(self) -> tuple[Callable[..., Secret[T]], tuple[T]]:
        return (Secret, (self.value,))


def sensitive_params(
    fn: Callable[..., Any], names: Iterable[str], where: str
) -> tuple[frozenset[str], frozenset[str]]:
    """(every sensitive parameter, those annotated ``Secret[...]``) of a task's function."""
    if isinstance(names, str):
        raise ConfigurationError(f"sensitive of {where} must be a tuple of names, not a string")
    named = frozenset(names)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return named, frozenset()
    unknown = named - params.keys()
    if unknown:
        raise ConfigurationError(f"sensitive of {where} names no parameter: {sorted(unknown)}")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: only the named ones count
        hints = {}
    wrapped = frozenset(
        name
        for name, hint in hints.items()
        if name in params and (hint is Secret or typing.get_origin(hint) is Secret)
    )
    return named | wrapped, wrapped


def _bound(task: Task[Any, Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    try:
        return task.signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None


def sensitive_values(
    task: Task[Any, Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> list[str]:
    """The text of each sensitive argument of one call (to scrub from messages)."""
    values = [kwargs[name] for name in task.sensitive if name in kwargs]
    bound = _bound(task, args, {})
    if bound is not None:
        values += [bound.arguments[name] for name in task.sensitive if name in bound.arguments]
    out = []
    for value in values:
        value = value.value if isinstance(value, Secret) else value
        text = value if isinstance(value, str) else repr(value)
        if len(text) >= _MIN_MASKED:
            out.append(text)
    return sorted(set(out), key=len, reverse=True)  # longest first: no partial leftovers


def mask_text(text: str, values: Iterable[str]) -> str:
    """``text`` with every occurrence of each value replaced by ``********``."""
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def masked_arguments(
    task: Task[Any, Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a call with each sensitive one replaced by ``********``: for any
    display of a task's arguments (events, inspect, dashboards, log lines)."""
    masked_kwargs = {k: MASK if k in task.sensitive else v for k, v in kwargs.items()}
    if not task.sensitive or not args:
        return tuple(args), masked_kwargs
    names = list(task.signature.parameters)
    masked_args = tuple(
        MASK if i < len(names) and names[i] in task.sensitive else value
        for i, value in enumerate(args)
    )
    return masked_args, masked_kwargs


def wrap_secrets(
    task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with those annotated ``Secret[...]`` wrapped in :class:`Secret`."""
    wrapped = task.secret_params
    kwargs = {
        k: Secret(v) if k in wrapped and not isinstance(v, Secret) else v for k, v in kwargs.items()
    }
    names = list(task.signature.parameters)
    args = tuple(
        Secret(v) if i < len(names) and names[i] in wrapped and not isinstance(v, Secret) else v
        for i, v in enumerate(args)
    )
    return args, kwargs


def _mask_arg(value: Any, values: list[str]) -> Any:
    if isinstance(value, str):
        return mask_text(value, values)
    return MASK if repr(value) in values else value


def mask_outcome(outcome: Outcome, values: list[str]) -> Outcome:
    """A FAILURE/RETRY outcome with the values scrubbed from its message, args and traceback."""
    if not values or outcome.exc_type is None:
        return outcome
    return replace(
        outcome,
        exc_message=mask_text(outcome.exc_message, values) if outcome.exc_message else None,
        exc_args=tuple(_mask_arg(a, values) for a in outcome.exc_args),
        traceback=mask_text(outcome.traceback, values) if outcome.traceback else None,
    )
