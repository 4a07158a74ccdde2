"""``aioqueue queues`` on RabbitMQ: wall time and CPU of the broker's counts for 20 queues.

Each queue has a message waiting and one delayed message (so one delay bucket exists); the
other 21 buckets of each queue do not exist, as on most deployments. Prints the median of
``--rounds`` calls of the broker's counts (no workers asked) for all the queues, wall and
process CPU, in milliseconds.

    python benchmarks/amqp_queue_stats.py [--queues 20] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from aioqueue import App
from aioqueue.brokers.amqp import AmqpBroker

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def counts(broker: AmqpBroker, names: list[str]) -> None:
    many = getattr(broker, "queue_stats_many", None)
    if many is not None:
        await many(names)
    else:
        for name in names:
            await broker.queue_stats(name)


async def main(queues: int, rounds: int) -> None:
    prefix = f"bench.qstats.{uuid.uuid4().hex[:8]}"
    app = App(
        "bench", broker=URL, backend="rpc://", key_prefix=prefix, amqp_delete_queues_on_close=True
    )
    names = [f"q{n}" for n in range(queues)]
    async with app:
        broker = await app.ready_broker()
        assert isinstance(broker, AmqpBroker)
        for name in names:
            await broker.publish(name, b'{"v":1,"id":"x","task":"t","queue":"q"}')
            await broker.publish(
                name, b'{"v":1,"id":"y","task":"t","queue":"q"}', eta=time.time() + 600
            )
        await counts(broker, names)  # warm: connection and channels
        walls, cpus = [], []
        for _ in range(rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            await counts(broker, names)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        print(
            f"{queues} queues: wall {statistics.median(walls) * 1000:.1f} ms, "
            f"cpu {statistics.median(cpus) * 1000:.1f} ms (median of {rounds})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--queues", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.queues, args.rounds))
