"""The app tests/test_cli_ops.py points the operator commands and a burst worker at.

Broker, backend and key prefix come from the ``AIOQUEUE_*`` variables the test sets. Only this
app registers ``ops_app.late``: the test's own in-process worker does not, so what it sends
there ends in the dead letters, and a worker of this app runs it once requeued.
"""

from __future__ import annotations

import asyncio

from aioqueue import App, Context, Retry

app = App("ops-app")


@app.task(name="ops_app.late")
async def late(n: int) -> int:
    return n * 10


@app.task(name="ops_app.nap")
async def nap(seconds: float, password: str = "", dsn: str = "") -> float:
    """Runs long enough to be seen by ``aioqueue inspect active`` (secrets in its arguments)."""
    await asyncio.sleep(seconds)
    return seconds


@app.task(name="ops_app.flaky", bind=True)
async def flaky(ctx: Context) -> int:
    """Asks to be retried once, reporting progress each time (for the events' order)."""
    await ctx.update_state("PROGRESS", {"retries": ctx.retries})
    if ctx.retries == 0:
        raise Retry(countdown=0.05)
    return ctx.retries


@app.task(name="ops_app.boom")
async def boom(text: str) -> None:
    """Fails, for the failure's log line and its traceback."""
    raise ValueError(text)
