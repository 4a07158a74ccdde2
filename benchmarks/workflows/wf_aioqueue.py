"""aioqueue's side: chain of 10 no-op steps, group of 10,000, chord of 1,000 (see run.py)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from wf_common import (
    AMQP_URL,
    CHAIN_RUNS,
    CHAIN_STEPS,
    CHORD_SIZE,
    GROUP_SIZE,
    REDIS_URL,
    REPS,
    WorkerProcess,
    emit,
    summary,
)

from aioqueue import App, chain, chord, group

app = App("wfbench")


@app.task
async def step(previous: Any = None) -> int:
    return 1


@app.task
async def noop() -> None:
    return None


@app.task
async def count(values: list[Any]) -> int:
    return len(values)


async def floor_enqueue(count: int, key: str) -> float:
    """The pipelined floor of the main benchmark (``floor-redis-batch``): per task a JSON body
    with an id and a waiter future, LPUSHed 100 per round trip (raw redis.asyncio)."""
    import json

    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    loop = asyncio.get_running_loop()
    waiters: dict[str, asyncio.Future[None]] = {}
    try:
        await client.ping()
        started = time.perf_counter()
        for first in range(0, count, 100):
            pipe = client.pipeline(transaction=False)
            for number in range(first, min(count, first + 100)):
                tid = f"{os.getpid()}-{number}"
                waiters[tid] = loop.create_future()
                pipe.lpush(key, json.dumps({"id": tid, "t": "noop", "a": [], "r": "c"}).encode())
            await pipe.execute()
        took = time.perf_counter() - started
        await client.delete(key)
        return took * 1000
    finally:
        await client.aclose()


async def measure() -> dict[str, Any]:
    chain_ms: list[float] = []
    groups: list[dict[str, float]] = []
    chords: list[float] = []
    async with app:
        for _ in range(3):  # warm up the connections and the worker
            await (await chain(step.s(), step.s()).send()).get(timeout=30)
        for _ in range(CHAIN_RUNS):
            started = time.perf_counter()
            result = await chain(step.s(), *[step.s() for _ in range(CHAIN_STEPS - 1)]).send()
            await result.get(timeout=60)
            chain_ms.append((time.perf_counter() - started) * 1000)
        for _ in range(REPS):
            members = [noop.s() for _ in range(GROUP_SIZE)]
            started = time.perf_counter()
            handle = await group(members).send()
            sent = time.perf_counter()
            await handle.get(timeout=300)
            done = time.perf_counter()
            entry = {"enqueue": (sent - started) * 1000, "done": (done - started) * 1000}
            if app.conf.broker_url.startswith("redis"):
                floor_key = f"wfbench-floor-{uuid.uuid4().hex}"
                entry["floor"] = await floor_enqueue(GROUP_SIZE, floor_key)
            groups.append(entry)
        for _ in range(REPS):
            started = time.perf_counter()
            handle = await chord(group(noop.s() for _ in range(CHORD_SIZE)), count.s()).send()
            assert await handle.get(timeout=300) == CHORD_SIZE
            chords.append((time.perf_counter() - started) * 1000)
    return summary(chain_ms, groups, chords)


def run(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """On uvloop, as the main benchmark's clients (the worker's ``--loop auto`` picks it too)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main() -> None:
    broker = sys.argv[1] if len(sys.argv) > 1 else "redis"
    prefix = f"wfbench-{uuid.uuid4().hex[:8]}"
    env = {
        "AIOQUEUE_BROKER_URL": AMQP_URL if broker == "amqp" else REDIS_URL,
        "AIOQUEUE_RESULT_BACKEND": REDIS_URL,
        "AIOQUEUE_KEY_PREFIX": prefix,
        "AIOQUEUE_AMQP_DELETE_QUEUES_ON_CLOSE": "true",
    }
    os.environ.update(env)
    app.config_from_object(
        {
            "broker_url": env["AIOQUEUE_BROKER_URL"],
            "result_backend": REDIS_URL,
            "key_prefix": prefix,
        }
    )
    worker = WorkerProcess(
        [
            sys.executable,
            "-m",
            "aioqueue.cli",
            "worker",
            "wf_aioqueue:app",
            "--concurrency",
            "200",
            "--processes",
            "1",
            "--loglevel",
            "info",
        ],
        env,
        "consuming",
    )
    try:
        worker.wait_ready()
        result = run(measure())
        result["library"] = f"aioqueue-{broker}"
        emit(result)
    finally:
        worker.stop()
        asyncio.run(_cleanup(prefix))


async def _cleanup(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


if __name__ == "__main__":
    main()
