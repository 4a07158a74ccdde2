"""The example app from the README: one async, one thread and one process task.

Run a worker:   aioqueue worker examples.proj:app --concurrency 50
Send tasks:     python examples/send_many.py
The broker and backend come from AIOQUEUE_BROKER_URL / AIOQUEUE_RESULT_BACKEND when set.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from aioqueue import App, Context

app = App("proj", broker="redis://127.0.0.1:6379/0", backend="redis://127.0.0.1:6379/0")


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task(executor="thread")
def resize(path: str) -> str:
    """Blocking I/O stands here: it runs on the worker's thread pool."""
    time.sleep(0.01)
    return f"{path}.thumb.png"


@app.task(executor="process")
def crunch(n: int) -> int:
    """CPU-bound work runs in a child process, so it never blocks the event loop."""
    digest = b""
    for i in range(n):
        digest = hashlib.sha256(digest + i.to_bytes(8, "little")).digest()
    return digest[0]


@app.task(bind=True)
async def count(ctx: Context, total: int) -> int:
    """Reports its progress as it goes; the web examples stream it to the browser."""
    for done in range(1, total + 1):
        await asyncio.sleep(0.1)  # the real work
        await ctx.update_state("PROGRESS", {"done": done, "total": total})
    return total
