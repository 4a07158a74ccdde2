"""The floor's worker: only what a reliable queue must do per task, nothing else.

Redis (one-by-one): per task, LMOVE (BLMOVE when empty) queue -> processing list, then one
pipeline of SET result EX ttl + PUBLISH completion + LREM from the processing list.
Redis (batch): the same commands, 100 LMOVEs in one pipeline and 100 settles in the next.
AMQP: consume with manual ack and prefetch 100; results go to Redis like every other AMQP
contestant here (SET EX + PUBLISH, pipelined over whatever is waiting), then basic.ack.

    python floor_worker.py --transport redis|amqp --mode 1by1|batch --queue NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from typing import Any

import redis.asyncio as aioredis
from _common import AMQP_URL, REDIS_URL, RESULT_TTL

BATCH = 100
CONCURRENCY = 200


class State:
    def __init__(self) -> None:
        self.stopping = asyncio.Event()


def settle(pipe: Any, body: bytes, processing: str | None) -> None:
    msg = json.loads(body)
    pipe.set(f"floor:res:{msg['id']}", b"null", ex=RESULT_TTL)
    pipe.publish(msg["r"], msg["id"])
    if processing is not None:
        pipe.lrem(processing, 1, body)


async def redis_one_by_one(r: Any, queue: str, processing: str, st: State) -> None:
    while not st.stopping.is_set():
        body = await r.lmove(queue, processing, "RIGHT", "LEFT")
        if body is None:
            body = await r.blmove(queue, processing, 1, "RIGHT", "LEFT")
            if body is None:
                continue
        pipe = r.pipeline(transaction=False)
        settle(pipe, body, processing)
        await pipe.execute()


async def redis_batched(r: Any, queue: str, processing: str, st: State) -> None:
    while not st.stopping.is_set():
        pipe = r.pipeline(transaction=False)
        for _ in range(BATCH):
            pipe.lmove(queue, processing, "RIGHT", "LEFT")
        bodies = [b for b in await pipe.execute() if b is not None]
        if not bodies:
            body = await r.blmove(queue, processing, 1, "RIGHT", "LEFT")
            if body is None:
                continue
            bodies = [body]
        pipe = r.pipeline(transaction=False)
        for body in bodies:
            settle(pipe, body, processing)
        await pipe.execute()


async def run_redis(queue: str, mode: str, st: State) -> None:
    r = aioredis.Redis.from_url(REDIS_URL, max_connections=CONCURRENCY + 10)
    processing = f"floor:processing:{os.getpid()}"
    if mode == "batch":
        loops = [redis_batched(r, queue, processing, st) for _ in range(2)]
    else:
        loops = [redis_one_by_one(r, queue, processing, st) for _ in range(CONCURRENCY)]
    await asyncio.gather(*loops)


async def run_amqp(queue: str, st: State) -> None:
    import aio_pika

    r = aioredis.Redis.from_url(REDIS_URL)
    conn = await aio_pika.connect(AMQP_URL)
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=BATCH)
    q = await ch.declare_queue(queue, durable=True)
    waiting: list[Any] = []
    wake = asyncio.Event()

    async def on_message(message: Any) -> None:
        waiting.append(message)
        wake.set()

    await q.consume(on_message, no_ack=False)
    while not st.stopping.is_set():
        if not waiting:
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), 1.0)
            except TimeoutError:
                continue
        batch = waiting[:BATCH]
        del waiting[: len(batch)]
        pipe = r.pipeline(transaction=False)
        for m in batch:
            settle(pipe, m.body, None)
        await pipe.execute()
        for m in batch:
            await m.ack()
    await conn.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", default="redis")
    ap.add_argument("--mode", default="1by1")
    ap.add_argument("--queue", required=True)
    args = ap.parse_args()
    st = State()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, st.stopping.set)
    if args.transport == "amqp":
        await run_amqp(args.queue, st)
    else:
        await run_redis(args.queue, args.mode, st)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
