"""saq: Redis only. Worker: ``saq c_saq.settings``.

Speed settings: concurrency=200 (default 10); uvloop policy set here; results pushed over
saq's pub/sub multiplexer (Job.refresh(until_complete=...)), not polled. No batch enqueue API
(Queue.map gathers single enqueues). No process executor: sync functions run in the worker's
ThreadPoolExecutor() (default size min(32, cpus+4) = 6 here; not configurable).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, ClassVar

import redis.asyncio as aioredis
from _common import (
    REDIS_URL,
    Contestant,
    payload,
    payload_size,
    sleep_ms,
    use_uvloop,
    venv_bin,
)
from saq.queue.redis import RedisQueue

LOOP = use_uvloop()
CONCURRENCY = 200
# redis-py 8 caps an asyncio pool at 100 connections by default and raises past it; saq holds
# one connection per concurrent dequeue, so give it the unbounded pool redis-py < 8 had.
MAX_CONN = 5000
RECHECK = 0.2
queue = RedisQueue(aioredis.from_url(REDIS_URL, max_connections=MAX_CONN))


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def payload_task(ctx: dict[str, Any], *, data: str) -> int:
    return payload_size(data)


def block(ctx: dict[str, Any], *, ms: float) -> None:
    sleep_ms(ms)


settings = {
    "queue": queue,
    "functions": [noop, payload_task, block],
    "concurrency": CONCURRENCY,
}


class Saq(Contestant):
    name: ClassVar[str] = "saq"
    dists: ClassVar[tuple[str, ...]] = ("saq", "redis", "hiredis", "uvloop")
    unsupported: ClassVar[dict[str, str]] = {
        "enqueue_batch": "no batch enqueue API (Queue.map gathers single enqueues)",
        "cpu": "no process executor (sync functions run in a thread pool)",
        "queues": "a worker consumes one queue (settings['queue'])",
    }

    def __init__(self, transport: str) -> None:
        super().__init__(transport)
        self.settings = {
            "worker": f"saq c_saq.settings; concurrency={CONCURRENCY}, other defaults "
            "(Queue max_concurrent_ops=20)",
            "redis_pool": f"max_connections={MAX_CONN} (redis-py 8 default of 100 makes saq "
            "fail with 'Too many connections' at concurrency 200)",
            "client": f"Queue.enqueue(); Job.refresh(until_complete={RECHECK}) in a loop "
            "(pub/sub; the loop covers saq's lost-wakeup race, see c_saq.py)",
            "loop": LOOP,
            "sync": "block: sync function -> saq's ThreadPoolExecutor() (6 threads here)",
            "serializer": "json (default)",
        }

    async def start(self) -> None:
        await queue.connect()

    async def stop(self) -> None:
        await queue.disconnect()

    async def send(self, kind: str = "noop", ms: float = 0.0) -> Any:
        if kind == "noop":
            return await queue.enqueue("noop")
        if kind == "payload":
            return await queue.enqueue("payload_task", data=payload())
        return await queue.enqueue(kind, ms=ms)

    async def wait(self, handle: Any, timeout: float) -> None:
        # Job.refresh(until_complete=t) reads the job, then subscribes: a completion published
        # in between is lost and the call hangs until t. Re-check every RECHECK seconds.
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            with contextlib.suppress(TimeoutError):
                await handle.refresh(until_complete=RECHECK)
            if handle.completed or asyncio.get_running_loop().time() > deadline:
                return

    async def count_remaining(self, handles: Any) -> int:
        return int(await queue.count("incomplete"))

    def worker_argv(self, kind: str) -> tuple[list[str], dict[str, str]]:
        return [venv_bin("saq"), "c_saq.settings", "--workers", "1"], {"BENCH_KIND": kind}


def make(transport: str) -> Contestant:
    return Saq(transport)
