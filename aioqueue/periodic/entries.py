"""Periodic entries: what to send, on which schedule, and what to do about missed ticks.

Three spellings build the same :class:`Entry`: ``@app.periodic(...)`` above ``@app.task``,
``app.add_periodic_task(schedule, sig)`` and the ``beat_schedule`` setting. Everything is
checked where it is declared (a bad value raises ConfigurationError naming it, before any
I/O); ``beat_schedule`` is read when a scheduler starts or the schedule is listed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigurationError
from ..task import SendOptions, Signature, make_send_options
from .schedules import Cron, Every, Schedule, _CronTab, zone

if TYPE_CHECKING:
    from ..app import App

__all__ = ["DEFAULT_CATCH_UP_LIMIT", "Entry", "Missed", "build_schedule", "collect_entries"]

Missed = Literal["skip", "catch_up"]
DEFAULT_CATCH_UP_LIMIT = 100
"""Most missed ticks one entry sends after an outage under ``missed="catch_up"``."""

_RESERVED_OPTIONS = frozenset({"task_id", "countdown", "eta"})
_BEAT_KEYS = frozenset(
    {"task", "schedule", "args", "kwargs", "options", "missed", "catch_up_limit", "expires"}
)


@dataclass(frozen=True)
class Entry:
    """One periodic entry. Its ``name`` keys its claims: keep it stable across deploys."""

    name: str
    task: str
    schedule: Schedule
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    missed: Missed = "skip"
    catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT
    expires: float | None = None
    """Seconds a tick may wait in its queue; None: until the next tick is due."""

    def tick_expires(self, due: float) -> float:
        return self.expires if self.expires is not None else self.schedule.period(due)


def build_schedule(
    where: str,
    schedule: Any = None,
    *,
    cron: str | None = None,
    every: float | timedelta | None = None,
    tz: Any = None,
    default_tz: str = "UTC",
) -> Schedule:
    """The one schedule that ``schedule``, ``cron`` and ``every`` describe between them."""
    given = [x for x in (schedule, cron, every) if x is not None]
    if len(given) != 1:
        raise ConfigurationError(
            f"{where}: give exactly one schedule (cron=, every= or a schedule), not {len(given)}"
        )
    value = given[0]
    if isinstance(value, _CronTab) and not value.zone_given:
        if tz is not None:
            return Cron(value.expression, tz)
        return Cron(value.expression, zone(None, default_tz))
    if isinstance(value, Cron | Every):
        if tz is not None and zone(tz).key != value.tz.key:
            raise ConfigurationError(f"{where}: tz={tz!r} conflicts with the schedule's zone")
        return value
    if isinstance(value, timedelta):
        return Every(value.total_seconds(), zone(tz, default_tz))
    if isinstance(value, str) and value is cron:
        return Cron(value, zone(tz, default_tz))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Every(value, zone(tz, default_tz))
    raise ConfigurationError(
        f"{where}: a schedule is seconds, a timedelta, crontab(...) or cron='...', not {value!r}"
    )


def make_entry(
    *,
    name: str | None,
    task: str,
    schedule: Schedule,
    args: Any = (),
    kwargs: Any = None,
    options: Mapping[str, Any] | SendOptions | None = None,
    missed: Any = "skip",
    catch_up_limit: Any = DEFAULT_CATCH_UP_LIMIT,
    expires: Any = None,
) -> Entry:
    """An Entry with every value checked; the default name is stable (task and schedule)."""
    entry_name = name if name is not None else f"{task} {schedule.describe()}"
    where = f"periodic entry {entry_name!r}"
    if not isinstance(entry_name, str) or not entry_name:
        raise ConfigurationError(f"a periodic entry name must be a non-empty string, not {name!r}")
    if not isinstance(args, tuple | list):
        raise ConfigurationError(f"{where}: args must be a tuple or list, not {args!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigurationError(f"{where}: kwargs must be a mapping, not {kwargs!r}")
    if missed not in ("skip", "catch_up"):
        raise ConfigurationError(f"{where}: missed must be 'skip' or 'catch_up', not {missed!r}")
    limit_ok = isinstance(catch_up_limit, int) and not isinstance(catch_up_limit, bool)
    if not limit_ok or catch_up_limit < 1:
        raise ConfigurationError(
            f"{where}: catch_up_limit must be a whole number of at least 1, not {catch_up_limit!r}"
        )
    expires_ok = isinstance(expires, int | float) and not isinstance(expires, bool)
    if expires is not None and not (expires_ok and math.isfinite(expires) and expires > 0):
        raise ConfigurationError(
            f"{where}: expires must be a positive number of seconds, not {expires!r}"
        )
    send_options = _send_options(where, options)
    return Entry(
        name=entry_name,
        task=task,
        schedule=schedule,
        args=tuple(args),
        kwargs=dict(kwargs or {}),
        options=send_options,
        missed=missed,
        catch_up_limit=catch_up_limit,
        expires=float(expires) if expires is not None else None,
    )


def _send_options(where: str, options: Mapping[str, Any] | SendOptions | None) -> dict[str, Any]:
    """Send options as a checked dict; the task id and timing of a tick are the scheduler's."""
    if isinstance(options, SendOptions):
        default = SendOptions()
        chosen = {
            name: getattr(options, name)
            for name in SendOptions.__dataclass_fields__
            if getattr(options, name) != getattr(default, name)
        }
    elif options is None:
        chosen = {}
    elif isinstance(options, Mapping):
        chosen = dict(options)
    else:
        raise ConfigurationError(f"{where}: options must be a mapping, not {options!r}")
    reserved = sorted(set(chosen) & _RESERVED_OPTIONS)
    if reserved:
        raise ConfigurationError(
            f"{where}: send option(s) {reserved} are set by the scheduler for each tick "
            "(the task id comes from the entry and its due time; a tick is sent when due)"
        )
    if "link" in chosen or "link_error" in chosen:
        raise ConfigurationError(f"{where}: link / link_error are not for a periodic entry")
    make_send_options(SendOptions(), chosen)  # checks names and values now, before any I/O
    return chosen


def entry_from_signature(
    app: App,
    schedule: Any,
    sig: Any,
    name: str | None,
    *,
    args: Any = None,
    kwargs: Any = None,
    options: Mapping[str, Any] | None = None,
    missed: Any = "skip",
    catch_up_limit: Any = DEFAULT_CATCH_UP_LIMIT,
    expires: Any = None,
    **send_options: Any,
) -> Entry:
    """``add_periodic_task(schedule, sig, name=...)``: the signature's task, args and options,
    then ``options`` and any other keyword as send options (Celery's ``**opts``)."""
    if not isinstance(sig, Signature):
        raise ConfigurationError(
            f"add_periodic_task takes a signature such as add.s(2, 2), not {sig!r}"
        )
    where = f"periodic entry {name or sig.name!r}"
    send = _send_options(where, sig.options)
    send.update(_send_options(where, options))
    send.update(_send_options(where, send_options))
    built = build_schedule(where, schedule, default_tz=app.conf.timezone)
    return make_entry(
        name=name,
        task=sig.name,
        schedule=built,
        args=sig.args if args is None else args,
        kwargs=sig.kwargs if kwargs is None else kwargs,
        options=send,
        missed=missed,
        catch_up_limit=catch_up_limit,
        expires=expires,
    )


def entries_from_beat_schedule(app: App) -> list[Entry]:
    """Entries of the ``beat_schedule`` setting (Celery's dict form)."""
    table = app.conf.beat_schedule
    if not isinstance(table, Mapping):
        raise ConfigurationError(f"beat_schedule must be a mapping of name to entry, not {table!r}")
    entries = []
    for name, spec in table.items():
        where = f"beat_schedule entry {name!r}"
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"{where} must be a mapping, not {spec!r}")
        unknown = sorted(set(spec) - _BEAT_KEYS)
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown key(s) {unknown}; known: {sorted(_BEAT_KEYS)}"
            )
        task = spec.get("task")
        if not isinstance(task, str) or not task:
            raise ConfigurationError(f"{where}: 'task' must be a task name, not {task!r}")
        if "schedule" not in spec:
            raise ConfigurationError(f"{where}: 'schedule' is missing")
        schedule = build_schedule(where, spec["schedule"], default_tz=app.conf.timezone)
        entries.append(
            make_entry(
                name=str(name),
                task=task,
                schedule=schedule,
                args=spec.get("args", ()),
                kwargs=spec.get("kwargs"),
                options=spec.get("options"),
                missed=spec.get("missed", "skip"),
                catch_up_limit=spec.get("catch_up_limit", DEFAULT_CATCH_UP_LIMIT),
                expires=spec.get("expires"),
            )
        )
    return entries


def collect_entries(declared: Mapping[str, Entry], app: App) -> list[Entry]:
    """Entries declared in code plus those of ``beat_schedule``; a name used twice is an error."""
    entries = dict(declared)
    for entry in entries_from_beat_schedule(app):
        if entry.name in entries:
            raise ConfigurationError(
                f"periodic entry {entry.name!r} is in beat_schedule and declared in code"
            )
        entries[entry.name] = entry
    return list(entries.values())
