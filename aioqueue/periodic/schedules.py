"""When a periodic entry is due: fixed intervals and cron expressions in a time zone.

Due times are pure functions of the schedule, never of when a process started, so every
worker and beat computes the same instants without talking to each other, and a long run
does not drift: ``every(1)`` is due at each whole second of the Unix clock.

Cron entries follow the wall clock of their zone. Across DST transitions:

* a wall time the clock skips (02:30 on a spring-forward day) runs once, shifted forward by
  the length of the gap (03:30 local), as Python's ``fold=0`` reads such a time;
* a wall time the clock repeats (01:30 on a fall-back day) runs once, at its first occurrence;
  a cron that fires every few minutes therefore pauses during the repeated hour. Fixed
  intervals (``every=``) ignore wall clocks and keep firing through both transitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

__all__ = ["Cron", "Every", "Schedule", "crontab", "zone"]

_MS = 1000
_SEARCH_LIMIT = 4 * 366 * 86400.0


class Schedule(Protocol):
    """Due instants as Unix times, in seconds."""

    @property
    def tz(self) -> ZoneInfo:
        """The zone its due times are shown in (and, for cron, read in)."""

    def next_after(self, t: float) -> float:
        """The first due instant strictly after ``t``."""

    def latest_at(self, t: float) -> float:
        """The last due instant at or before ``t``."""

    def previous_before(self, t: float) -> float:
        """The last due instant strictly before ``t``."""

    def period(self, due: float) -> float:
        """Seconds from ``due`` to the next due instant: a tick's default ``expires``."""

    def describe(self) -> str:
        """Stable text naming the schedule (part of a default entry name)."""


def zone(name: str | ZoneInfo | None, default: str = "UTC") -> ZoneInfo:
    """A ``zoneinfo`` zone, or ConfigurationError naming the unknown zone before any I/O.

    :mod:`zoneinfo` (and the sysconfig it reads its search path from) loads with the first
    schedule, not with aioqueue: a worker without periodic entries never needs it.
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if isinstance(name, ZoneInfo):
        return name
    key = default if name is None else name
    if not isinstance(key, str) or not key:
        raise ConfigurationError(
            f"time zone must be a zone name such as 'Europe/Paris', not {key!r}"
        )
    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(f"unknown time zone {key!r}: {exc}") from None


@dataclass(frozen=True)
class Every:
    """Every ``seconds``, at whole multiples of it since the Unix epoch (so 30 s is due at :00
    and :30 of each minute, on every host alike)."""

    seconds: float
    tz: ZoneInfo = field(default_factory=lambda: zone(None))

    def __post_init__(self) -> None:
        value = self.seconds
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0.001:
            raise ConfigurationError(
                f"every must be a number of seconds of at least 0.001, not {value!r}"
            )

    @property
    def _ms(self) -> int:
        return round(self.seconds * _MS)

    def latest_at(self, t: float) -> float:
        step = self._ms
        return (math.floor(t * _MS) // step) * step / _MS

    def next_after(self, t: float) -> float:
        return self.latest_at(t) + self._ms / _MS

    def previous_before(self, t: float) -> float:
        latest = self.latest_at(t)
        return latest if latest < t else latest - self._ms / _MS

    def period(self, due: float) -> float:
        return self._ms / _MS

    def describe(self) -> str:
        return f"every {self.seconds:g}s"


class Cron:
    """A cron expression (parsed by croniter) read on the wall clock of ``tz``.

    croniter (and the dateutil it pulls in, ~4 MB of a worker's memory) is imported on the first
    cron schedule, not with aioqueue: a worker without one never loads it.
    """

    def __init__(self, expression: str, tz: str | ZoneInfo | None = None) -> None:
        from croniter import croniter

        if not isinstance(expression, str) or not croniter.is_valid(expression):
            raise ConfigurationError(f"invalid cron expression {expression!r}")
        self.expression = " ".join(expression.split())
        self.tz = zone(tz)

    def _instant(self, wall: datetime) -> float:
        return wall.replace(tzinfo=self.tz, fold=0).timestamp()

    def _wall(self, t: float) -> datetime:
        return datetime.fromtimestamp(t, self.tz).replace(tzinfo=None, fold=0)

    def next_after(self, t: float) -> float:
        from croniter import croniter  # loaded by __init__ already: a dict lookup

        walls = croniter(self.expression, self._wall(t))
        while True:  # a few rounds at most: only walls inside a DST fold map before t
            instant = self._instant(walls.get_next(datetime))
            if instant > t:
                return instant

    def previous_before(self, t: float) -> float:
        # Walk forward from ever earlier starts: the ticks are by definition what next_after
        # reaches, and backwards through a DST gap croniter's wall times would not agree.
        span = 60.0
        while span < _SEARCH_LIMIT:
            found = self.next_after(t - span)
            if found < t:
                while (following := self.next_after(found)) < t:
                    found = following
                return found
            span *= 2
        raise ConfigurationError(f"cron {self.expression!r} has no due time in the last 4 years")

    def latest_at(self, t: float) -> float:
        return self.previous_before(t + 0.001)

    def period(self, due: float) -> float:
        return self.next_after(due) - due

    def describe(self) -> str:
        return f"cron {self.expression} {self.tz.key}"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Cron)
            and other.expression == self.expression
            and other.tz.key == self.tz.key
        )

    def __hash__(self) -> int:
        return hash((self.expression, self.tz.key))

    def __repr__(self) -> str:
        return f"Cron({self.expression!r}, tz={self.tz.key!r})"


def crontab(
    minute: Any = "*",
    hour: Any = "*",
    day_of_week: Any = "*",
    day_of_month: Any = "*",
    month_of_year: Any = "*",
    *,
    tz: str | ZoneInfo | None = None,
) -> Cron:
    """Celery's keyword form: ``crontab(minute=0, hour="*/3", day_of_week="mon-fri")``.

    Fields take what cron takes (numbers, ``*/n``, ranges, lists, day and month names);
    ``tz`` defaults to the app's ``timezone`` setting when the entry is added.
    Like standard cron (and unlike Celery), a restricted day_of_month *or* day_of_week matches.
    """
    fields = (minute, hour, day_of_month, month_of_year, day_of_week)
    for value in fields:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigurationError(f"crontab fields are numbers or cron text, not {value!r}")
    return _CronTab(" ".join(str(value) for value in fields), tz)


class _CronTab(Cron):
    """A Cron from ``crontab()``: remembers whether its zone was given, so an unset one
    takes the app's ``timezone`` setting."""

    def __init__(self, expression: str, tz: str | ZoneInfo | None) -> None:
        super().__init__(expression, tz)
        self.zone_given = tz is not None
