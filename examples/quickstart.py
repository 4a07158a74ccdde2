"""`make demo`: a worker and a client in one process.

On memory:// unless AIOQUEUE_BROKER_URL is set (then on that broker, e.g. Redis).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

from aioqueue import App

app = App("quickstart", broker="memory://", key_prefix="aioqueue-demo")


@app.task
async def add(x: int, y: int) -> int:
    await asyncio.sleep(0.01)
    return x + y


@app.task(executor="thread")
def shout(word: str) -> str:
    time.sleep(0.01)  # blocking work belongs on a thread
    return f"{word.upper()}! (from {threading.current_thread().name})"


@app.task(executor="process")
def fingerprint(n: int) -> str:
    digest = b""
    for i in range(n):
        digest = hashlib.sha256(digest + i.to_bytes(8, "little")).digest()
    return f"{digest.hex()[:12]} (computed in pid {os.getpid()})"


async def main() -> None:
    print(f"broker: {app.broker.url}  (parent pid {os.getpid()})")
    async with app, app.worker(concurrency=20, processes=2):
        sums = [await add.send(i, i) for i in range(5)]
        words = [await shout.send(w) for w in ("hello", "asyncio", "queue")]
        prints = [await fingerprint.send(n) for n in (10_000, 20_000)]
        for label, results in (("async", sums), ("thread", words), ("process", prints)):
            values = await asyncio.gather(*(r.get(timeout=30) for r in results))
            for value in values:
                print(f"  {label:8} -> {value}")
        assert [await r.get() for r in sums] == [0, 2, 4, 6, 8]


if __name__ == "__main__":
    asyncio.run(main())
