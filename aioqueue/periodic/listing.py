"""``aioqueue schedule proj:app``: each entry's next due time, last run and last outcome.

Times are shown in the entry's own zone. The last run is the entry's last claimed tick (from
the claim store every scheduler shares); its outcome is the state of that tick's task in the
result backend, which ``rpc://`` cannot tell (its results travel only to the sender).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from .scheduler import claims_for

if TYPE_CHECKING:
    from ..app import App

__all__ = ["EntryStatus", "describe", "format_rows"]


@dataclass(frozen=True)
class EntryStatus:
    name: str
    task: str
    schedule: str
    missed: str
    next_due: datetime
    last_due: datetime | None
    last_task_id: str | None
    last_outcome: str | None


async def describe(app: App, now: float | None = None) -> list[EntryStatus]:
    """The status of every periodic entry of ``app``, at ``now`` (default: the clock)."""
    entries = app.periodic_entries()
    at = time.time() if now is None else now
    claims = claims_for(app, compete=False)
    try:
        await claims.open()
        last = await claims.last([entry.name for entry in entries])
    finally:
        await claims.close()
    can_read = not app.backend.url.lower().startswith("rpc:")
    rows = []
    for entry in entries:
        tz = entry.schedule.tz
        record = last.get(entry.name)
        outcome = None
        if record is not None:
            if can_read:
                outcome = await app.AsyncResult(record.task_id).state()
            else:
                outcome = "unknown (rpc:// results go to the sender only)"
        rows.append(
            EntryStatus(
                name=entry.name,
                task=entry.task,
                schedule=entry.schedule.describe(),
                missed=entry.missed,
                next_due=datetime.fromtimestamp(entry.schedule.next_after(at), tz),
                last_due=datetime.fromtimestamp(record.due, tz) if record else None,
                last_task_id=record.task_id if record else None,
                last_outcome=outcome,
            )
        )
    return rows


def format_rows(rows: list[EntryStatus]) -> str:
    """A plain table, one entry per line."""
    header = ("ENTRY", "TASK", "SCHEDULE", "MISSED", "NEXT DUE", "LAST RUN", "LAST OUTCOME")
    table = [header]
    for row in rows:
        table.append(
            (
                row.name,
                row.task,
                row.schedule,
                row.missed,
                row.next_due.isoformat(timespec="seconds"),
                row.last_due.isoformat(timespec="seconds") if row.last_due else "never",
                row.last_outcome or "-",
            )
        )
    if len(table) == 1:
        return "no periodic entries"
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )
