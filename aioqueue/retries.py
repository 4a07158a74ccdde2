"""When a failed task runs again: the retry policy of one task, checked once at registration.

A retry is decided by the worker after the task ends (``raise Retry(...)``, or an exception
listed in ``retry_for``) and carried out as a delayed re-send of the same task id; see the
README's "Retries". The delay, unless the task names one:

* ``retry_backoff`` set (``True`` is 1 s, or a number of seconds): exponential,
  ``retry_backoff * 2**retries`` capped at ``retry_backoff_max``, and with ``retry_jitter`` a
  random point between 0 and that ("full jitter": many tasks failing together on one outage
  do not all come back in the same instant);
* otherwise ``default_retry_delay`` seconds every time.

These are Celery's names and defaults, so a task moved over retries the way it did there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

__all__ = ["DEFAULT_MAX_RETRIES", "RetryPolicy"]

DEFAULT_MAX_RETRIES = 3
_MAX_DELAY = 10 * 365 * 24 * 3600.0


def _seconds(where: str, what: str, value: Any, *, allow_zero: bool) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        low_ok = seconds >= 0 if allow_zero else seconds > 0  # False for NaN
        if low_ok and seconds <= _MAX_DELAY:
            return seconds
    floor = "at least 0" if allow_zero else "above 0"
    raise ConfigurationError(
        f"{what} of {where} must be a number of seconds {floor} and at most {_MAX_DELAY:.0f} "
        f"(ten years), not {value!r}"
    )


def check_max_retries(where: str, value: Any) -> int | None:
    """A retry limit: a whole number of at least 0, or None for "retry for ever"."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ConfigurationError(
        f"max_retries of {where} must be a whole number of at least 0 or None (no limit), "
        f"not {value!r}"
    )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how soon one task is retried."""

    max_retries: int | None = DEFAULT_MAX_RETRIES
    retry_for: tuple[type[BaseException], ...] = ()
    backoff: float = 0.0
    """Base of the exponential delay in seconds; 0: a fixed ``default_delay``."""
    backoff_max: float = 600.0
    jitter: bool = True
    default_delay: float = 180.0

    @classmethod
    def build(
        cls,
        where: str,
        *,
        max_retries: Any,
        retry_for: Any,
        retry_backoff: Any,
        retry_backoff_max: Any,
        retry_jitter: Any,
        default_retry_delay: Any,
    ) -> RetryPolicy:
        """The policy, every value checked: a bad one is a ConfigurationError naming it."""
        exceptions = _exception_types(where, retry_for)
        if retry_backoff is True:
            backoff = 1.0
        elif retry_backoff is False or retry_backoff is None:
            backoff = 0.0
        else:
            backoff = _seconds(where, "retry_backoff", retry_backoff, allow_zero=True)
        if not isinstance(retry_jitter, bool):
            raise ConfigurationError(
                f"retry_jitter of {where} must be True or False, not {retry_jitter!r}"
            )
        return cls(
            max_retries=check_max_retries(where, max_retries),
            retry_for=exceptions,
            backoff=backoff,
            backoff_max=_seconds(where, "retry_backoff_max", retry_backoff_max, allow_zero=False),
            jitter=retry_jitter,
            default_delay=_seconds(
                where, "default_retry_delay", default_retry_delay, allow_zero=True
            ),
        )

    def delay(self, retries: int) -> float:
        """Seconds before try number ``retries + 2`` (``retries`` made so far)."""
        if not self.backoff:
            return self.default_delay
        # 2**retries overflows a float past ~1024 retries: the cap applies long before that.
        exponent = min(retries, 64)
        delay = min(self.backoff_max, self.backoff * math.pow(2, exponent))
        if self.jitter:
            delay = random.uniform(0, delay)
        return delay

    def allows(self, retries: int, override: int | None = None) -> bool:
        """True if a task that has retried ``retries`` times may retry once more."""
        limit = self.max_retries if override is None else override
        return limit is None or retries < limit


def _exception_types(where: str, value: Any) -> tuple[type[BaseException], ...]:
    if value is None:
        return ()
    items: Iterable[Any] = (value,) if isinstance(value, type) else value
    try:
        found = tuple(items)
    except TypeError:
        found = (value,)
    for item in found:
        if not (isinstance(item, type) and issubclass(item, Exception)):
            raise ConfigurationError(
                f"retry_for of {where} must be exception classes (a tuple of Exception "
                f"subclasses), not {item!r}"
            )
    return found
