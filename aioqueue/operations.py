"""What the operator commands (``aioqueue queues``, ``purge``, ``dead-letters``) do to an app.

The CLI only parses and prints; everything here takes a connected :class:`~aioqueue.App`, so the
same calls work from Python (a notebook, a runbook script) as from the shell.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .brokers.base import DeadLetter, QueueAdmin, QueueStats, QueueStatsMany, dead_letter_id
from .errors import AioQueueError, ConfigurationError
from .inspection import DEFAULT_TIMEOUT, Answers, request

if TYPE_CHECKING:
    from .app import App

__all__ = [
    "ALL_DEAD",
    "admin_of",
    "app_queues",
    "drop_dead",
    "format_dead_letters",
    "format_stats",
    "list_dead",
    "purge",
    "queue_stats",
    "requeue_dead",
    "settings_in_use",
]

ALL_DEAD = 1_000_000_000
"""``limit`` that reads every dead letter of a queue."""


def admin_of(app: App) -> QueueAdmin:
    broker = app.broker
    if not isinstance(broker, QueueAdmin):
        raise ConfigurationError(f"broker {broker.url} cannot be operated on (no QueueAdmin)")
    return broker


async def queue_stats(
    app: App,
    queues: Sequence[str],
    *,
    ask_workers: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[QueueStats]:
    """What ``aioqueue queues`` shows: the broker's counts, and what the live workers hold.

    The workers are asked (``inspect holding``, waiting at most ``timeout`` seconds, less once
    every listening worker answered) at the same time as the broker counts. Their answers give
    ``oldest_held_age`` on every transport, and ``in_flight`` where the broker cannot count it
    (RabbitMQ). Both are only as complete as the answers: when a worker did not answer in time
    they are None and ``unknown`` says so, never a partial sum. ``ask_workers=False``: the
    broker's counts alone.
    """
    admin = admin_of(app)
    await app.ready_broker()

    async def counted() -> list[QueueStats]:
        if isinstance(admin, QueueStatsMany):
            return await admin.queue_stats_many(queues)
        return [await admin.queue_stats(queue) for queue in queues]

    if not ask_workers:
        return await counted()
    stats, (answers, why) = await asyncio.gather(counted(), _holdings(app, timeout))
    now = time.time()
    return [_with_holdings(row, answers, why, now) for row in stats]


async def _holdings(app: App, timeout: float) -> tuple[Answers, str | None]:
    """The workers' ``holding`` answers, and why they are not complete (None: they are)."""
    try:
        answers = await request(app.control, "holding", timeout=timeout)
    except AioQueueError as exc:
        return Answers(), f"the workers could not be asked: {exc}"
    # an error reply is {"error": "..."}; a queue named "error" would map to a dict
    failed = [
        worker
        for worker, answer in answers.items()
        if not isinstance(answer, dict) or not isinstance(answer.get("error", {}), dict)
    ]
    if failed:
        return answers, f"worker(s) {', '.join(failed)} could not answer"
    if not answers.everyone:
        return answers, (
            f"{len(answers)} worker(s) answered within {timeout:g}s, not every live worker"
        )
    return answers, None


def _with_holdings(stats: QueueStats, answers: Answers, why: str | None, now: float) -> QueueStats:
    unknown = {k: v for k, v in stats.unknown.items() if k not in {"in_flight", "oldest_held_age"}}
    rows = [
        answer[stats.queue]
        for answer in answers.values()
        if isinstance(answer, dict) and isinstance(answer.get(stats.queue), dict)
    ]
    held = sum(int(row.get("held", 0)) for row in rows)
    dated = [float(row["oldest_sent_at"]) for row in rows if row.get("oldest_sent_at")]
    undated = sum(int(row.get("undated", 0)) for row in rows)
    in_flight = stats.in_flight if "in_flight" not in stats.unknown else None
    oldest_held: float | None = None
    if why is not None:
        unknown["oldest_held_age"] = why
        if "in_flight" in stats.unknown:
            unknown["in_flight"] = why
    else:
        if "in_flight" in stats.unknown:
            in_flight = held
        if undated:
            unknown["oldest_held_age"] = f"{undated} held message(s) carry no sent time"
        elif dated:
            oldest_held = max(0.0, now - min(dated))
    return dataclasses.replace(
        stats, in_flight=in_flight, oldest_held_age=oldest_held, unknown=unknown
    )


async def list_dead(app: App, queue: str, ids: frozenset[str] | None = None) -> list[DeadLetter]:
    """The dead letters of ``queue``, oldest first; only those of ``ids`` when given."""
    broker = await app.ready_broker()
    letters = await broker.dead_letters(queue, limit=ALL_DEAD)
    return [d for d in letters if ids is None or dead_letter_id(d.body) in ids]


async def requeue_dead(app: App, queue: str, ids: frozenset[str] | None) -> int:
    """Send dead letters back to their queue under their own task ids, attempt 1.

    The failure stored for each id is forgotten first: outcomes are first-wins, so otherwise
    the new run's outcome could never be stored and ``get()`` would keep the old failure. (A
    crash between the two leaves the dead letter where it was, its failure forgotten.)
    """
    admin = admin_of(app)
    backend = await app.ready_backend()
    for letter in await list_dead(app, queue, ids):
        task_id = dead_letter_id(letter.body)
        if task_id is not None and letter.size is None:
            await backend.forget(task_id)
    return await admin.requeue_dead(queue, ids)


async def drop_dead(app: App, queue: str, ids: frozenset[str] | None) -> int:
    admin = admin_of(app)
    await app.ready_broker()
    return await admin.drop_dead(queue, ids)


async def purge(app: App, queue: str) -> int:
    admin = admin_of(app)
    await app.ready_broker()
    return await admin.purge(queue)


def settings_in_use(app: App) -> dict[str, Any]:
    """The app's settings as it runs them, secrets masked: a ``result_backend`` left unset
    shows the backend the broker implies (``rpc://`` for AMQP, the broker's Redis)."""
    settings = app.conf.table()
    if not settings.get("result_backend"):
        try:
            settings["result_backend"] = app.backend.url  # masked by the backend itself
        except ConfigurationError as exc:
            settings["result_backend"] = f"(none: {exc})"
    return settings


def app_queues(app: App) -> list[str]:
    """The queues a worker of ``app`` consumes by default: the default one, then the tasks'."""
    names = {t.queue for t in app.tasks.values() if t.queue}
    return [app.conf.default_queue, *sorted(names - {app.conf.default_queue})]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def format_stats(rows: Sequence[QueueStats]) -> str:
    """A table, one queue a line; ``?`` where a value cannot be known, each explained in a
    footnote under the table. OLDEST: the oldest message, waiting or held."""
    header = ("QUEUE", "DEPTH", "DELAYED", "IN FLIGHT", "CONSUMERS", "OLDEST", "DEAD")
    lines = [header] + [
        (
            row.queue,
            str(row.depth),
            str(row.delayed),
            "?" if "in_flight" in row.unknown else str(row.in_flight or 0),
            str(row.consumers),
            "?" if row.oldest is None and _oldest_unknown(row) else _age(row.oldest),
            str(row.dead),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    return "\n".join(table + _footnotes(rows))


def _oldest_unknown(row: QueueStats) -> bool:
    return "oldest_age" in row.unknown or "oldest_held_age" in row.unknown


def _footnotes(rows: Sequence[QueueStats]) -> list[str]:
    """``? <queue> <COLUMN>: why`` for each unknown value; the same reason once for all."""
    notes: dict[str, list[str]] = {}
    for row in rows:
        for name, why in row.unknown.items():
            column = "IN FLIGHT" if name == "in_flight" else "OLDEST"
            if name == "oldest_age" and row.oldest_held_age is not None:
                why += f" (a worker holds one sent {_age(row.oldest_held_age)} ago)"
            notes.setdefault(f"{column}: {why}", []).append(row.queue)
    return [f"? {','.join(dict.fromkeys(queues))} {note}" for note, queues in notes.items()]


def format_dead_letters(letters: Sequence[DeadLetter], *, full: bool = False) -> str:
    """One line per dead letter (id, when, reason); ``full`` adds each body."""
    if not letters:
        return "no dead letters"
    out: list[str] = []
    now = time.time()
    for letter in letters:
        task_id = dead_letter_id(letter.body) or "(not an envelope)"
        cut = f" [first {len(letter.body)} of {letter.size} bytes]" if letter.size else ""
        out.append(f"{task_id}  {_age(now - letter.at)} ago  {letter.reason}{cut}")
        if full:
            out.append("    " + letter.body.decode("utf-8", "replace"))
    return "\n".join(out)
