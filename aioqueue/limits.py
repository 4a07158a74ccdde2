"""Rate limits and concurrency caps of tasks: their values, checked before any I/O.

``rate_limit="10/m"`` (also ``/s``, ``/h``; ``"100/s burst 20"`` lets 20 start back to back
after a quiet spell) and ``concurrency_limit=3`` hold across every worker of a deployment; the
stores that enforce them are in :mod:`aioqueue._limiter`, the worker's side in
:mod:`aioqueue.worker.limiting`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

__all__ = ["Rate", "TaskLimits", "check_concurrency_limit", "parse_rate"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*(?:burst\s+(\d+)\s*)?$")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` starts per ``per`` seconds, up to ``burst`` of them back to back."""

    text: str
    count: float
    per: float
    burst: int

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady rate (GCRA's emission interval)."""
        return self.per / self.count


def parse_rate(value: Any, where: str = "rate_limit") -> Rate:
    """``"10/m"``, ``"5/s"``, ``"2/h"``, ``"100/s burst 20"`` -> a Rate (burst 1 by default)."""
    found = _RATE.match(value) if isinstance(value, str) else None
    if found is None:
        raise ConfigurationError(
            f"{where} must look like '10/s', '10/m', '10/h' or '100/s burst 20', not {value!r}"
        )
    count = float(found.group(1))
    burst = int(found.group(3)) if found.group(3) is not None else 1
    if not count > 0 or burst < 1:
        raise ConfigurationError(
            f"{where} needs a positive rate and a burst of at least 1, not {value!r}"
        )
    return Rate(value.strip(), count, _UNITS[found.group(2)], burst)


def check_concurrency_limit(value: Any, where: str = "concurrency_limit") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{where} must be a whole number of at least 1, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """What holds one task back: a rate, a cap, or both (never neither)."""

    rate: Rate | None
    cap: int | None
