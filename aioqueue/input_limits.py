"""Limits against abusive messages, all in one place.

A worker reads whatever its queues hold, so each message is bounded before it costs anything:

=========================  ==========================  ========  ===================================
setting                    bounds                      default   checked
=========================  ==========================  ========  ===================================
``max_message_size``       bytes of a body             16 MiB    raw bytes, before the MAC and
                                                                 before parsing (Redis: in the fetch
                                                                 script, the body is never read)
``max_nesting_depth``      nesting of JSON arrays and  32        the parsed JSON, before any field
                           objects, envelope included            is read (bounded first by a count
                                                                 of ``[`` and ``{`` in the raw
                                                                 bytes, or for a body over 4 KiB
                                                                 by a walk of its few containers)
``max_task_name_length``   characters of a task name   200       before the name is looked up
``max_headers``            number of user headers      64        before the headers are read
``max_headers_size``       bytes of the headers as     16 KiB    before the headers are read
                           JSON
=========================  ==========================  ========  ===================================

A message over a limit is never run: the worker dead-letters it with a reason naming the limit
(``LimitExceeded: ...``) and records a FAILURE for its id. Senders hit the same limits when
they encode (a message a worker would refuse is not sent), and ``@app.task`` refuses a name over
``max_task_name_length``. orjson, which parses every body, cannot run code and refuses nesting
over 1024 on its own; the depth limit keeps the Python objects built from a body small.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .errors import ConfigurationError, LimitExceeded

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds a codec enforces; see the module docstring for the table."""

    max_message_size: int = 16 * 1024 * 1024
    max_nesting_depth: int = 32
    max_task_name_length: int = 200
    max_headers: int = 64
    max_headers_size: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a whole number of at least 1")
        if self.max_nesting_depth < 3:
            raise ConfigurationError("max_nesting_depth must be at least 3 (the envelope's own)")

    def check_depth(self, body: bytes, data: object) -> None:
        """Raise LimitExceeded when ``data`` (parsed from ``body``) nests too deeply.

        Two ways to know, each cheap where the other is not: walking the parsed containers
        costs per element (a 100 KB string argument is one), the C scan of the raw bytes for
        openers costs per byte (two passes over a 100 KB body took longer than parsing it) and
        bounds the depth from above. The walk goes first, with a budget of one element per 64
        bytes of body (where the two cost about the same); a body with more elements than that
        (say, a long list of numbers) is scanned, and walked in full only if the scan cannot
        rule it out.
        """
        limit = self.max_nesting_depth
        deeper = _deeper_than(data, limit, budget=len(body) >> 6)
        if deeper is None:
            deeper = body.count(b"[") + body.count(b"{") > limit and bool(_deeper_than(data, limit))
        if deeper:
            raise LimitExceeded(f"message nests deeper than max_nesting_depth={limit}")

    def check_headers(self, headers: dict[str, Any]) -> None:
        """Raise LimitExceeded for too many headers, or headers too large as JSON."""
        if len(headers) > self.max_headers:
            raise LimitExceeded(
                f"message has {len(headers)} headers, over max_headers={self.max_headers}"
            )
        try:
            size = len(orjson.dumps(headers, option=orjson.OPT_NON_STR_KEYS))
        except TypeError:
            return  # not JSON at all: the envelope's own check reports it
        if size > self.max_headers_size:
            raise LimitExceeded(
                f"message headers are {size} bytes, over max_headers_size={self.max_headers_size}"
            )

    def check_task_name(self, name: str) -> None:
        if len(name) > self.max_task_name_length:
            raise LimitExceeded(
                f"task name is {len(name)} characters, over "
                f"max_task_name_length={self.max_task_name_length}"
            )


def _deeper_than(data: object, limit: int, budget: int | None = None) -> bool | None:
    """True when containers nest more than ``limit`` levels (iterative: no recursion); None
    when the containers hold more than ``budget`` elements in all (the walk gave up)."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if type(item) is dict:
            values: Collection[object] = item.values()
        elif type(item) is list:
            values = item
        else:
            continue
        if budget is not None:
            budget -= len(values)
            if budget < 0:
                return None
        stack.extend((v, depth + 1) for v in values if type(v) in _CONTAINERS)
    return False


_CONTAINERS: Final = (dict, list)

DEFAULT_LIMITS: Final = Limits()
