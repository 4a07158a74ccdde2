"""A rate limit across worker processes: the rate it holds, and the CPU it costs the workers.

For each broker (Redis; RabbitMQ with results on Redis, where the limiter counts in the
results' Redis) this starts two ``aioqueue worker`` processes
(``python -m aioqueue.cli worker rate_limited_drain:app``, concurrency 100 each) and drains:

1. ``--count`` plain no-op tasks (no limit): the workers' CPU per task, the baseline;
2. ``--count`` tasks limited to ``--rate`` (``"2000/s"`` by default, burst 1) across both
   workers, sent at once with ``send_many``: each returns the unix time it started, so the rate
   is measured where it is enforced, at the start of each task.

It prints the measured rate (starts - 1 over the time from the first start to the last) and its
ratio to the limit, the most starts in any one-second window against the limit plus its burst,
and the two workers' CPU: CPU-seconds per wall-second, microseconds per task, and the ratio to
the plain drain's per task (what deferring costs: a reservation script per task, parking, and
re-sending the tasks beyond the reservation horizon through the delayed set / delay buckets).

Run it on its own (about 30 seconds per broker with the defaults)::

    .venv/bin/python benchmarks/rate_limited_drain.py [--count 20000] [--rate 2000]
        [--brokers redis,amqp]

Redis db 15 under a prefix of this run (``BENCH_REDIS_URL`` to change it), not db 14, which
``make bench`` flushes; only this run's keys are deleted, and on RabbitMQ the queues of this
run's prefix (the workers declare them with ``amqp_delete_queues_on_close``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from keyspace import delete_prefixed

from aioqueue import App

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PLAIN = "rate_limited_drain.plain"
LIMITED = "rate_limited_drain.limited"
RATE = os.environ.get("BENCH_RATE_LIMIT", "2000/s")
_TICK = os.sysconf("SC_CLK_TCK")

# The workers' app: broker, backend and prefix come from AIOQUEUE_*, the rate from
# BENCH_RATE_LIMIT (set by main()).
app = App("rate-limited-drain")


@app.task(name=PLAIN)
async def plain(i: int) -> float:
    return time.time()


@app.task(name=LIMITED, rate_limit=RATE)
async def limited(i: int) -> float:
    return time.time()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (every thread of them) in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / _TICK


@dataclass
class Drain:
    count: int
    wall: float
    cpu: float
    starts: list[float]

    @property
    def us_per_task(self) -> float:
        return self.cpu / self.count * 1e6

    @property
    def rate(self) -> float:
        """Starts per second from the first start to the last."""
        span = self.starts[-1] - self.starts[0]
        return (len(self.starts) - 1) / span if span > 0 else float("inf")

    def busiest_second(self) -> int:
        """The most starts in any one-second window (each window opening at a start)."""
        starts = self.starts
        return max(bisect.bisect_left(starts, at + 1.0) - i for i, at in enumerate(starts))


async def drain(client: App, name: str, count: int, pids: list[int]) -> Drain:
    task = client.task(name=name)(plain.fn)
    before, began = cpu_seconds(pids), time.monotonic()
    results = await task.send_many([task.s(i) for i in range(count)])
    starts = await asyncio.gather(*(r.get(timeout=count / 100 + 60) for r in results))
    return Drain(count, time.monotonic() - began, cpu_seconds(pids) - before, sorted(starts))


async def run_one(broker: str, count: int, log: IO[bytes]) -> tuple[Drain, Drain]:
    url = AMQP_URL if broker == "amqp" else REDIS_URL
    prefix = f"bench-rate-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOQUEUE_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")]),
        AIOQUEUE_BROKER_URL=url,
        AIOQUEUE_RESULT_BACKEND=REDIS_URL,
        AIOQUEUE_KEY_PREFIX=prefix,
        AIOQUEUE_AMQP_DELETE_QUEUES_ON_CLOSE="true",
        BENCH_RATE_LIMIT=RATE,
    )
    command = [sys.executable, "-m", "aioqueue.cli", "worker", "rate_limited_drain:app"]
    command += ["--concurrency", "100", "--processes", "1", "--loglevel", "warning"]
    client = App(
        "client", broker=url, backend=REDIS_URL, key_prefix=prefix, amqp_delete_queues_on_close=True
    )
    workers = [
        await asyncio.create_subprocess_exec(
            *command, cwd=HERE, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
        )
        for _ in range(2)
    ]
    pids = [worker.pid for worker in workers]
    try:
        async with client:
            # Ready when both consume: warm-up tasks until each worker ran some.
            await drain(client, PLAIN, 200, pids)
            baseline = await drain(client, PLAIN, count, pids)
            limited_drain = await drain(client, LIMITED, count, pids)
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.terminate()
        for worker in workers:
            try:
                async with asyncio.timeout(30):
                    await worker.wait()
            except TimeoutError:
                worker.kill()
                await worker.wait()
        await delete_prefixed(REDIS_URL, prefix)
    return baseline, limited_drain


def main() -> None:
    global RATE
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=2000, help="the limit, tasks per second")
    parser.add_argument("--brokers", default="redis,amqp")
    args = parser.parse_args()
    RATE = f"{args.rate}/s"
    limit = float(args.rate)
    print(
        f"{args.count} tasks limited to {RATE} (burst 1) across two workers (concurrency 100 "
        f"each), after {args.count} plain ones; CPU is both workers' together"
    )
    print(
        f"{'broker':8} {'rate/s':>8} {'/limit':>7} {'max 1s':>7} {'limit+burst':>11} "
        f"{'CPU-s/s':>8} {'us/task':>8} {'plain us/task':>13} {'/plain':>7}"
    )
    for broker in args.brokers.split(","):
        log_path = Path(f"/tmp/rate_limited_drain.{broker}.{os.getpid()}.log")
        with log_path.open("wb") as log:
            try:
                baseline, limited_drain = asyncio.run(run_one(broker, args.count, log))
            except BaseException:
                print(f"worker output: {log_path}", file=sys.stderr)
                raise
        log_path.unlink()
        cpu_rate = limited_drain.cpu / limited_drain.wall
        print(
            f"{broker:8} {limited_drain.rate:8.1f} {limited_drain.rate / limit:6.3f}x "
            f"{limited_drain.busiest_second():7d} {int(limit) + 1:11d} {cpu_rate:8.3f} "
            f"{limited_drain.us_per_task:8.0f} {baseline.us_per_task:13.0f} "
            f"{limited_drain.us_per_task / baseline.us_per_task:6.2f}x"
            f"   (limited drain {limited_drain.wall:.2f} s; plain {baseline.wall:.2f} s, "
            f"{baseline.count / baseline.wall:,.0f}/s)"
        )


if __name__ == "__main__":
    main()
