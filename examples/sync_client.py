"""Sending from sync code (a Flask or Django view, a script): `python examples/sync_client.py`.

On memory:// unless AIOQUEUE_BROKER_URL is set (for example redis://127.0.0.1:6379/0). The
worker runs on a thread here so the script is whole; in production it is its own process
(`aioqueue worker examples.sync_client:app`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from aioqueue import App, SyncCallInEventLoop

app = App(
    "sync-demo",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"),
    key_prefix=os.environ.get("AIOQUEUE_KEY_PREFIX", "aioqueue"),
)


@app.task
async def add(x: int, y: int) -> int:
    return x + y


def checkout_view(order: int) -> str:
    """What a sync web view does: send, and (here) wait for the answer."""
    result = add.send_sync(order, 100)  # a SyncResult: get / state / ready / revoke
    return f"order {order}: {result.get(timeout=10)} ({result.state()})"


async def serve(stop: threading.Event) -> None:
    async with app, app.worker(concurrency=10):
        await asyncio.to_thread(stop.wait)


async def inside_a_loop() -> None:
    try:
        add.send_sync(1, 2)
    except SyncCallInEventLoop as exc:
        print(f"in async code: {exc}")


def main() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=asyncio.run, args=(serve(stop),))
    worker.start()
    try:
        with ThreadPoolExecutor(4) as pool:  # like a threaded web server's request threads
            for line in pool.map(checkout_view, range(4)):
                print(line)
        many = add.send_many_sync([(1, 1), (2, 2)])
        print("send_many_sync:", [r.get(timeout=10) for r in many])
        print("send_task_sync:", app.send_task_sync(add.name, (20, 22)).get(timeout=10))
        asyncio.run(inside_a_loop())
    finally:
        stop.set()
        worker.join()


if __name__ == "__main__":
    main()
