"""Periodic tasks, declared three ways: `python examples/periodic.py`.

On memory:// unless AIOQUEUE_BROKER_URL is set (for example redis://127.0.0.1:6379/0). Runs a
worker (which schedules too) until three heartbeats have run, then prints the schedule as
`aioqueue schedule examples.periodic:app` would.
"""

from __future__ import annotations

import asyncio
import os

from aioqueue import App, crontab
from aioqueue.periodic.listing import describe, format_rows

app = App("periodic-demo", broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"))
beats = asyncio.Queue[str]()


@app.periodic(every=1)
@app.task(name="demo.heartbeat")
async def heartbeat() -> None:
    await beats.put("tick")


@app.periodic(cron="0 7 * * mon-fri", tz="Asia/Shanghai", name="morning-report")
@app.task(name="demo.report")
async def report(kind: str = "daily") -> str:
    return f"{kind} report sent"


@app.task(name="demo.cleanup")
async def cleanup(days: int) -> str:
    return f"removed files older than {days} days"


# Celery's spellings work too: add_periodic_task with a signature, and beat_schedule.
app.add_periodic_task(crontab(minute=0, hour=0), cleanup.s(30), name="cleanup-at-midnight")
app.conf.beat_schedule = {
    "weekly-report": {
        "task": "demo.report",
        "schedule": crontab(minute=30, hour=8, day_of_week="mon"),
        "kwargs": {"kind": "weekly"},
        "missed": "catch_up",
        "catch_up_limit": 1,
    },
}


async def main() -> None:
    async with app, app.worker(concurrency=5):
        for n in range(3):
            await asyncio.wait_for(beats.get(), timeout=10)
            print(f"heartbeat {n + 1}")
    print(format_rows(await describe(app)))


if __name__ == "__main__":
    asyncio.run(main())
