"""Idempotent task ids and ``unique_for``: one message per id, claimed atomically at send time.

A send that names its ``task_id``, or a task with ``unique_for``, first *claims* the id on the
result backend (:class:`~aioqueue.backends.base.ClaimsTaskIds`); when the claim is refused the
send enqueues nothing and returns a handle on the task already holding the id. Only those
messages carry the envelope's ``claim`` field, so a plain send pays no extra round trip and the
worker's settle no extra command.

How long a claim holds:

* taken at send for as long as the task may wait and run: its eta delay plus its result TTL
  (at least ``unique_for``);
* ended by the worker when it records the final outcome (in the same step as the store): an
  explicit id stays claimed while its result is kept (result TTL from then on; released at once
  with ``ignore_result``), a ``unique_for`` claim until ``unique_for`` seconds after the send.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING, Any, Final

import orjson

from .errors import ConfigurationError, SerializationError
from .message import MAX_RESULT_TTL
from .serializers import json_default

if TYPE_CHECKING:
    from .backends.base import ClaimsTaskIds, ResultBackend
    from .message import Message

__all__ = [
    "check_flag",
    "check_unique_for",
    "claim_for",
    "claim_ttl_at_end",
    "claim_ttl_at_send",
    "claims",
    "unique_id",
]

UNTIL_RESULT_EXPIRES: Final = 0.0
"""The envelope's ``claim`` for an explicit id: held until its result expires."""


def check_unique_for(value: Any, where: str) -> float:
    """``unique_for`` as a float: a finite number of seconds above 0 (at most ten years)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if math.isfinite(seconds) and 0 < seconds <= MAX_RESULT_TTL:
            return seconds
    raise ConfigurationError(
        f"unique_for of {where} must be a finite number of seconds above 0 and at most "
        f"{MAX_RESULT_TTL:.0f} (ten years), not {value!r}"
    )


def check_flag(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigurationError(f"{what} must be True or False, not {value!r}")


def unique_id(task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A stable id for this call: a hash of the task name and the canonical JSON of its arguments.

    Keyword arguments are sorted, so their order does not matter; but ``f(1, 2)`` and
    ``f(x=1, y=2)`` are different calls here, as they are different messages.
    """
    try:
        canonical = orjson.dumps(
            [task_name, list(args), kwargs],
            default=_canonical,
            option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
        )
    except TypeError as exc:
        raise SerializationError(
            f"unique_for: cannot derive a task id for {task_name!r} from its arguments (they "
            f"must be JSON-encodable to hash them): {exc}"
        ) from exc
    return "u-" + hashlib.sha256(canonical).hexdigest()[:40]


def _canonical(obj: Any) -> Any:
    """Sets sorted where they can be: their iteration order changes from process to process."""
    if isinstance(obj, set | frozenset):
        try:
            return sorted(obj)
        except TypeError:
            pass
    return json_default(obj)


def claim_for(
    task_name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    task_id: str | None,
    unique_for: float | None,
    now: float,
) -> tuple[str, float]:
    """(the message's id, its envelope ``claim``) for a send that claims its id."""
    if unique_for is None:
        assert task_id is not None
        return task_id, UNTIL_RESULT_EXPIRES
    return task_id or unique_id(task_name, args, kwargs), now + unique_for


def claim_ttl_at_send(message: Message, result_ttl: float, now: float) -> float:
    """How long the claim is taken for at send: while the task may wait and run."""
    ttl = result_ttl + (message.eta - now if message.eta is not None and message.eta > now else 0)
    if message.claim is not None and message.claim > 0:
        ttl = max(ttl, message.claim - now)
    return min(max(ttl, 0.001), MAX_RESULT_TTL)


def claim_ttl_at_end(message: Message, result_ttl: float) -> float | None:
    """Seconds the claim is kept once the final outcome is known (0: release); None: no claim."""
    claim = message.claim
    if claim is None:
        return None
    if claim == UNTIL_RESULT_EXPIRES:
        return 0.0 if message.ignore_result else result_ttl
    return max(0.0, claim - time.time())


def claims(backend: ResultBackend) -> ClaimsTaskIds:
    """The backend's claim capability, or ConfigurationError (before anything is sent)."""
    from .backends.base import ClaimsTaskIds

    if isinstance(backend, ClaimsTaskIds):
        return backend
    raise ConfigurationError(
        f"result backend {backend!r} cannot claim task ids, so task_id= and unique_for "
        "cannot be honoured with it (memory://, redis:// and rpc:// can)"
    )
