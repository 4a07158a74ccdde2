"""Delayed tasks must not make a worker spin: a real worker's CPU while 10,000 delayed tasks wait.

For each broker (Redis, RabbitMQ; results on Redis in both cases) this starts one
``aioqueue worker`` process (``python -m aioqueue.cli worker delayed_idle_cpu:app``) and reads
its CPU time (utime + stime of /proc/<pid>/stat, all its threads) over four phases:

1. idle: nothing queued, nothing delayed (the baseline: heartbeats, the delay mover's wake-ups);
2. waiting: 10,000 tasks sent with an eta spread over one second, ``--delay`` seconds ahead,
   measured from the end of the send until the first of them would leave its first RabbitMQ
   delay bucket (the largest power of two of seconds not over the time left when it was sent);
3. re-routing: from there until just before the first eta. On RabbitMQ the worker's consumer
   now receives every message early and publishes it to the next, shorter bucket (a few hops
   each, every hop halving the time left): work per message, not per second waited. On Redis
   this is more of the same waiting;
4. draining: from the first eta until every result is stored.

It prints CPU-seconds per wall-second for each phase and their ratio to idle (1.0 = waiting
costs nothing; a spinning worker shows tens to hundreds). /proc counts clock ticks (10 ms), so an
idle rate near 0.002 is one or two ticks (an idle worker that used none counts as one tick):
read the ratios with that grain.

Run it on its own (about 80 seconds)::

    .venv/bin/python benchmarks/delayed_idle_cpu.py [--count 10000] [--delay 20]
        [--brokers redis,amqp] [--idle 10]

Redis db 15 is used (``BENCH_REDIS_URL`` to change it), as the tests use it: only keys under
this run's own prefix are written and deleted. Not db 14: ``make bench`` flushes that one
between contestants, which would wipe this run's delayed messages and results. On RabbitMQ the
queues of this run's prefix (work, dead, delay buckets) are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from keyspace import delete_prefixed

from aioqueue import App
from aioqueue.brokers.amqp import delay_bucket

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASK = "delayed_idle_cpu.noop"
_TICK = os.sysconf("SC_CLK_TCK")

# The worker's app: broker, backend and prefix come from AIOQUEUE_* (set by main()).
app = App("delayed-idle-cpu")


@app.task(name=TASK)
async def noop(i: int) -> int:
    return i


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (every thread of it) in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of proc(5)


@dataclass
class Phase:
    cpu: float
    wall: float

    @property
    def rate(self) -> float:
        return self.cpu / self.wall if self.wall > 0 else 0.0


class Meter:
    """CPU time of one process between two points in time."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu = cpu_seconds(pid)
        self._wall = time.monotonic()

    def read(self) -> Phase:
        return Phase(cpu_seconds(self.pid) - self._cpu, time.monotonic() - self._wall)


def first_exit(sent: float, sent_end: float, start: float) -> float:
    """When the first message published between ``sent`` and ``sent_end`` leaves its first
    RabbitMQ delay bucket (from then on the worker re-routes them, one hop per bucket): one
    published at ``p`` goes to the bucket of ``start - p`` and leaves it that much later."""
    steps = max(1, int((sent_end - sent) / 0.01))
    moments = (sent + (sent_end - sent) * k / steps for k in range(steps + 1))
    return min(p + delay_bucket(start - p) / 1000 for p in moments)


async def sleep_until(unix: float) -> None:
    await asyncio.sleep(max(0.0, unix - time.time()))


async def run_one(
    broker: str, count: int, delay: float, idle: float, log: IO[bytes]
) -> dict[str, Phase]:
    url = AMQP_URL if broker == "amqp" else REDIS_URL
    prefix = f"bench-delayed-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOQUEUE_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")]),
        AIOQUEUE_BROKER_URL=url,
        AIOQUEUE_RESULT_BACKEND=REDIS_URL,
        AIOQUEUE_KEY_PREFIX=prefix,
        AIOQUEUE_AMQP_DELETE_QUEUES_ON_CLOSE="true",
    )
    command = [sys.executable, "-m", "aioqueue.cli", "worker", "delayed_idle_cpu:app"]
    command += ["--concurrency", "100", "--processes", "1", "--loglevel", "warning"]
    client = App(
        "client", broker=url, backend=REDIS_URL, key_prefix=prefix, amqp_delete_queues_on_close=True
    )
    task = client.task(name=TASK)(noop.fn)
    phases: dict[str, Phase] = {}
    worker = await asyncio.create_subprocess_exec(
        *command, cwd=HERE, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
    )
    try:
        async with client:
            # Ready when a task makes the round trip: then the worker consumes and is warm.
            await (await task.send(-1)).get(timeout=30)
            meter = Meter(worker.pid)
            await asyncio.sleep(idle)
            phases["idle"] = meter.read()

            start = time.time() + delay
            calls = [
                task.s(i).set(eta=datetime.fromtimestamp(start + i / count, UTC))
                for i in range(count)
            ]
            sent = time.time()
            results = await task.send_many(calls)
            sent_end = time.time()
            phases["send"] = Phase(0.0, sent_end - sent)
            first_hop = min(first_exit(sent, sent_end, start), start) - 0.3
            await asyncio.sleep(0.5)  # let the worker settle after the burst of wake notices
            if time.time() > first_hop - 1.0:
                raise SystemExit(f"{broker}: sending took too long for --delay {delay}")
            meter = Meter(worker.pid)
            await sleep_until(first_hop)
            phases["waiting"] = meter.read()
            meter = Meter(worker.pid)
            await sleep_until(start - 0.2)
            phases["re-routing"] = meter.read()

            await sleep_until(start)
            meter = Meter(worker.pid)
            await asyncio.gather(*(r.get(timeout=delay + 120) for r in results))
            phases["draining"] = meter.read()
    finally:
        if worker.returncode is None:
            worker.terminate()
        try:
            async with asyncio.timeout(30):
                await worker.wait()
        except TimeoutError:
            worker.kill()
            await worker.wait()
        await delete_prefixed(REDIS_URL, prefix)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=20.0, help="seconds until the first eta")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle baseline")
    parser.add_argument("--brokers", default="redis,amqp")
    args = parser.parse_args()
    print(
        f"{args.count} tasks due within 1 s, {args.delay:g} s ahead, one worker (concurrency "
        "100): CPU-seconds per wall-second of the worker process, and the ratio to idle"
    )
    print(
        f"{'broker':8} {'idle':>7} {'waiting':>8} {'ratio':>7} {'re-routing':>10} {'ratio':>7} "
        f"{'draining':>8} {'drain wall':>10}"
    )
    for broker in args.brokers.split(","):
        log_path = Path(f"/tmp/delayed_idle_cpu.{broker}.{os.getpid()}.log")
        with log_path.open("wb") as log:
            try:
                phases = asyncio.run(run_one(broker, args.count, args.delay, args.idle, log))
            except BaseException:
                print(f"worker output: {log_path}", file=sys.stderr)
                raise
        log_path.unlink()
        # An idle worker may use less than one clock tick in the whole baseline: count one.
        idle = max(phases["idle"].cpu, 1 / _TICK) / phases["idle"].wall

        def ratio(rate: float, idle: float = idle) -> str:
            return f"{rate / idle:6.1f}x"

        waiting, hops, drain = phases["waiting"], phases["re-routing"], phases["draining"]
        print(
            f"{broker:8} {idle:7.4f} {waiting.rate:8.4f} {ratio(waiting.rate)} "
            f"{hops.rate:10.4f} {ratio(hops.rate)} {drain.rate:8.3f} {drain.wall:9.2f}s"
            f"   (waited {waiting.wall:.1f} s on {waiting.cpu:.2f} CPU-s, then "
            f"{hops.wall:.1f} s on {hops.cpu:.2f}; sent in {phases['send'].wall:.2f} s)"
        )


if __name__ == "__main__":
    main()
