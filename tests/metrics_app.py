"""The app tests/test_metrics.py runs in a real ``aioqueue worker --metrics-port`` subprocess.

Broker, backend and key prefix come from the ``AIOQUEUE_*`` variables the test sets. ``gate``
holds its slot until the test creates the file it names, so the test can see a queue fill up.
"""

from __future__ import annotations

import asyncio
import os

from aioqueue import App, Context

app = App("metrics-app")


@app.task(name="metrics_app.ok")
async def ok(n: int) -> int:
    return n


@app.task(name="metrics_app.boom")
async def boom() -> None:
    raise ValueError("boom")


@app.task(name="metrics_app.flaky", bind=True, max_retries=3)
async def flaky(ctx: Context) -> str:
    if ctx.retries == 0:
        ctx.retry(countdown=0.05)
    return "done"


@app.task(name="metrics_app.square", executor="process")
def square(n: int) -> int:
    return n * n


@app.task(name="metrics_app.gate")
async def gate(path: str) -> str:
    async with asyncio.timeout(30):  # the test creates the file; never hang a worker
        while not await asyncio.to_thread(os.path.exists, path):  # noqa: ASYNC110 - a file
            await asyncio.sleep(0.01)
    return "opened"
