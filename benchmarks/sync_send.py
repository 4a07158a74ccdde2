"""What a lone sync send costs over the async one: ``add.send_sync()`` vs ``await add.send()``.

The sync client (aioqueue/sync.py) runs the app on a loop thread of its own; a call from sync
code hands the send to that thread and waits for it. The promise: that hop costs at most one
broker round trip more than the async send. For each broker this measures, one at a time and
awaited in turn (no overlap, no batching):

1. ``await add.send(i)`` from an asyncio loop (the app connected beforehand);
2. ``add.send_sync(i)`` from the main thread (the sync client started beforehand);
3. a broker round trip: ``PING`` on Redis; on RabbitMQ a passive declare of the work queue
   (a channel RPC, the cheapest full round trip aio-pika offers).

It prints the median and p99 of each, the bare hop to the loop thread and back (no I/O: the
sync client's own cost), and the ratios (sync - async) / round trip and hop / round trip: under
1.0 keeps the promise. On a busy machine every thread wake-up waits for a core, so read the
ratios of a quiet run (``uptime``'s load under the core count). Nothing consumes the
messages; they are deleted with their keys and queues.

Run it on its own (about 10 seconds)::

    .venv/bin/python benchmarks/sync_send.py [--n 2000] [--brokers redis,amqp]

Redis db 14 (``BENCH_REDIS_URL``), only keys under this run's own prefix, deleted after; on
RabbitMQ (``BENCH_AMQP_URL``) this run's queues are deleted when the app closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import redis.asyncio as aioredis
from keyspace import delete_prefixed

from aioqueue import App
from aioqueue.sync import sync_client

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def build(broker: str, prefix: str) -> App:
    url = REDIS_URL if broker == "redis" else AMQP_URL
    app = App(
        f"sync-bench-{broker}",
        broker=url,
        backend=REDIS_URL,
        key_prefix=prefix,
        amqp_delete_queues_on_close=True,
    )

    @app.task(name="bench.noop")
    async def noop(i: int) -> None:
        return None

    return app


def summary(samples: list[float]) -> tuple[float, float]:
    """(median, p99) in microseconds."""
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99) - 1] * 1e6


async def timed(n: int, step: Callable[[int], Awaitable[object]]) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        await step(i)
        out.append(time.perf_counter() - start)
    return out


async def async_sends(app: App, n: int) -> list[float]:
    noop = app.tasks["bench.noop"]
    async with app:
        await timed(min(n, 200), noop.send)  # warm up
        return await timed(n, noop.send)


async def round_trips(broker: str, prefix: str, n: int) -> list[float]:
    if broker == "redis":
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return await timed(n, lambda i: client.ping())
        finally:
            await client.aclose()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        name = f"{prefix}.rtt"
        await channel.declare_queue(name, auto_delete=True)
        return await timed(n, lambda i: channel.declare_queue(name, passive=True))
    finally:
        await connection.close()


async def _nothing() -> None:
    return None


def sync_sends(app: App, n: int) -> tuple[list[float], list[float]]:
    """(sync sends, bare hops to the loop thread and back with no I/O)."""
    noop = app.tasks["bench.noop"]
    client = sync_client(app)  # started and connected, as after a web worker's first request
    for i in range(min(n, 200)):
        noop.send_sync(i)
    out = []
    for i in range(n):
        start = time.perf_counter()
        noop.send_sync(i)
        out.append(time.perf_counter() - start)
    hops = []
    for _ in range(n):
        start = time.perf_counter()
        client.run(_nothing())
        hops.append(time.perf_counter() - start)
    client.close()
    return out, hops


def run(broker: str, n: int) -> str:
    prefix = f"aqsyncbench-{uuid.uuid4().hex[:8]}"
    app = build(broker, prefix)
    try:
        async_samples = asyncio.run(async_sends(app, n))
        sync_samples, hop_samples = sync_sends(app, n)
        rtt_samples = asyncio.run(round_trips(broker, prefix, n))
    finally:
        asyncio.run(delete_prefixed(REDIS_URL, prefix))
    (a50, a99), (s50, s99), (r50, r99), (h50, _) = map(
        summary, (async_samples, sync_samples, rtt_samples, hop_samples)
    )
    return (
        f"{broker:6} {a50:9.0f} {a99:9.0f} {s50:9.0f} {s99:9.0f} {r50:9.0f} {r99:9.0f}"
        f" {h50:7.0f} {(s50 - a50) / r50:18.2f} {h50 / r50:8.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="sends per measurement")
    parser.add_argument("--brokers", default="redis,amqp")
    args = parser.parse_args()
    print(
        f"{'broker':6} {'async p50':>9} {'p99':>9} {'sync p50':>9} {'p99':>9} {'rtt p50':>9}"
        f" {'p99':>9} {'hop p50':>7} {'(sync-async)/rtt':>18} {'hop/rtt':>8}"
        f"   (microseconds; n={args.n})"
    )
    for broker in args.brokers.split(","):
        print(run(broker.strip(), args.n), flush=True)


if __name__ == "__main__":
    main()
