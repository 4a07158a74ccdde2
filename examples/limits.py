"""Rate limits, concurrency caps and changing them at run time: `python examples/limits.py`.

On memory:// unless AIOQUEUE_BROKER_URL is set (for example redis://127.0.0.1:6379/0): on Redis
the limits hold across every worker of the app, in every process.
"""

from __future__ import annotations

import asyncio
import os
import time

from aioqueue import App

app = App(
    "limits-demo",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"),
    key_prefix=os.environ.get("AIOQUEUE_KEY_PREFIX", "aioqueue-demo"),
)
running = most = 0


@app.task(rate_limit="5/s")  # also "10/m", "2/h", "100/s burst 20"
async def call_api(n: int) -> float:
    return time.time()  # when it started


@app.task(concurrency_limit=2)  # at most 2 running at once, across all workers
async def render(n: int) -> int:
    global running, most
    running += 1
    most = max(most, running)
    await asyncio.sleep(0.05)
    running -= 1
    return n


async def spread(count: int) -> float:
    """Seconds from the first start of ``count`` call_api tasks to the last."""
    results = [await call_api.send(n) for n in range(count)]
    starts = [await result.get(timeout=30) for result in results]
    return max(starts) - min(starts)


async def main() -> None:
    global most
    async with app, app.worker(concurrency=10):
        print(f"6 calls at 5/s: {await spread(6):.0f} s from the first start to the last")
        await asyncio.gather(*[(await render.send(n)).get(timeout=30) for n in range(8)])
        print(f"render: at most {most} at once")

        # Every worker, running now or started later, takes the new limits (no restart).
        await app.control.rate_limit(call_api.name, "50/s")
        await app.control.concurrency_limit(render.name, None)  # None: no cap
        await asyncio.sleep(0.2)  # pushed to running workers within milliseconds
        print(f"6 calls at 50/s: under a second: {await spread(6) < 1.0}")
        most = 0
        await asyncio.gather(*[(await render.send(n)).get(timeout=30) for n in range(8)])
        print(f"render without a cap: more than 2 at once: {most > 2}")


if __name__ == "__main__":
    asyncio.run(main())
