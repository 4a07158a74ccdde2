"""Operating a queue from Python: inspect a running worker and follow its events.

On memory:// unless AIOQUEUE_BROKER_URL is set (then on that broker, e.g. Redis or RabbitMQ).
The same questions from a shell: ``aioqueue inspect active proj:app``, ``aioqueue events proj:app``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aioqueue import App, Context

app = App(
    "operations",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"),
    key_prefix=os.environ.get("AIOQUEUE_KEY_PREFIX", "aioqueue-ops-demo"),
    events=True,  # workers emit task events and heartbeats (off by default)
)
release = asyncio.Event()


@app.task(bind=True)
async def import_file(ctx: Context, path: str, api_token: str) -> int:
    await ctx.update_state("PROGRESS", {"path": path})
    await release.wait()
    return len(path)


async def main() -> None:
    async with app, app.events() as feed, app.worker(concurrency=4) as worker:
        result = await import_file.send("/data/2026-12.csv", api_token="s3cret")

        async def running() -> list[dict[str, Any]]:
            while True:
                active = await app.control.inspect(worker.id).active()
                if active[worker.id]:
                    return list(active[worker.id])
                await asyncio.sleep(0.05)

        (row,) = await asyncio.wait_for(running(), timeout=10)
        print("active:", row["name"], row["kwargs"])  # the token comes back masked
        release.set()
        print("result:", await result.get(timeout=10))
        async for event in feed:
            if event.task_id == result.id:
                print("event:", event.type)
            if event.type == "task-succeeded":
                break


if __name__ == "__main__":
    asyncio.run(main())
