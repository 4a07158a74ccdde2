"""What worker metrics and tracing cost: drain and round trip with them off and on.

    .venv/bin/python benchmarks/observability_overhead.py [--n 5000] [--rounds 5] [--amqp]

One process, Redis db 14 (keys under a per-run prefix, deleted at the end), or RabbitMQ with
results in Redis db 14. Each round runs every mode once, in turn, so drift on a shared machine
hits them alike; the medians are printed with their ratio to "off".

* drain: ``n`` no-op tasks are queued first (``send_many``), then a worker (concurrency 200)
  is started and timed from the moment it consumes until it has settled them all: the
  worker's cost per task alone (its start-up, paid once, is left out, as in ``make bench``).
* round trip: ``n / 10`` sequential ``send`` + ``get`` with the worker running.

"off" runs on older checkouts too (``PYTHONPATH=<an older tree> ... --modes off``): compare the
hot path before and after a change.

Modes: off (nothing installed), metrics (``metrics_port`` set: served on a free port, queue
depth sampled at the default interval, 15 s), tracing (the ``Tracing`` middleware with a
no-op tracer: the cost of the hooks and the header), both, events (task events and worker
heartbeats to the event stream, ``events=True``), ops (events and metrics: what the operations
issue bounds at +20%).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time
import uuid
from typing import Any

from keyspace import delete_prefixed

from aioqueue import App

REDIS = "redis://127.0.0.1:6379/14"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
MODES = ("off", "metrics", "tracing", "both", "events", "ops")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_app(mode: str, prefix: str, amqp: bool) -> tuple[App, Any]:
    middleware = []
    if mode in ("tracing", "both"):
        from aioqueue.tracing import Tracing

        middleware.append(Tracing())
    app = App(
        "bench",
        broker=AMQP if amqp else REDIS,
        backend=REDIS,
        key_prefix=prefix,
        result_ttl=600,
        amqp_delete_queues_on_close=True,
        middleware=middleware,
        events=mode in ("events", "ops"),
    )

    @app.task(name="bench.noop")
    async def noop() -> None:
        return None

    return app, noop


def worker_options(mode: str) -> dict[str, Any]:
    options: dict[str, Any] = {"concurrency": 200, "schedule": False}
    if mode in ("metrics", "both", "ops"):
        options.update(metrics_port=free_port(), metrics_addr="127.0.0.1")
    return options


async def drain(mode: str, n: int, amqp: bool) -> tuple[float, float]:
    prefix = f"aqobs-{uuid.uuid4().hex[:8]}"
    app, noop = make_app(mode, prefix, amqp)
    try:
        async with app:
            for start in range(0, n, 500):
                await noop.send_many([() for _ in range(min(500, n - start))])
            worker = app.worker(**worker_options(mode))
            run = asyncio.get_running_loop().create_task(worker.run())
            # timed from the moment it consumes, as make bench's drain rate: a start-up cost
            # (the metrics server's thread, the event stream) is paid once, not per task
            await worker.ready.wait()
            began, cpu = time.perf_counter(), time.process_time()
            while worker.processed < n:  # noqa: ASYNC110 - no event for it; 2 ms is noise
                await asyncio.sleep(0.002)
            elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
            worker.stop()
            await run
            return elapsed, cpu
    finally:
        await delete_prefixed(REDIS, prefix)


async def round_trip(mode: str, n: int, amqp: bool) -> tuple[float, float]:
    prefix = f"aqobs-{uuid.uuid4().hex[:8]}"
    app, noop = make_app(mode, prefix, amqp)
    try:
        async with app, app.worker(**worker_options(mode)):
            for _ in range(20):  # warm up connections
                await (await noop.send()).get(timeout=10)
            began, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                await (await noop.send()).get(timeout=10)
            return (time.perf_counter() - began) / n, (time.process_time() - cpu) / n
    finally:
        await delete_prefixed(REDIS, prefix)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--amqp", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    modes = args.modes.split(",")
    runs: dict[str, dict[str, list[float]]] = {
        m: {"drain": [], "drain_cpu": [], "rtt": [], "rtt_cpu": []} for m in modes
    }
    for _ in range(args.rounds):
        for mode in modes:
            wall, cpu = await drain(mode, args.n, args.amqp)
            runs[mode]["drain"].append(wall)
            runs[mode]["drain_cpu"].append(cpu / args.n)
            wall, cpu = await round_trip(mode, max(50, args.n // 10), args.amqp)
            runs[mode]["rtt"].append(wall)
            runs[mode]["rtt_cpu"].append(cpu)
    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in runs.items()}
    base = med[modes[0]]
    print("time ratios to the first mode (>1 is slower); cpu = this process's CPU per task")
    print(
        f"{'mode':<9}{'drain/s':>9}{'ratio':>7}{'cpu us':>8}{'ratio':>7}"
        f"{'rtt ms':>8}{'ratio':>7}{'cpu us':>8}{'ratio':>7}"
    )
    for mode in modes:
        m = med[mode]
        print(
            f"{mode:<9}{args.n / m['drain']:>9.0f}{m['drain'] / base['drain']:>7.3f}"
            f"{m['drain_cpu'] * 1e6:>8.1f}{m['drain_cpu'] / base['drain_cpu']:>7.3f}"
            f"{m['rtt'] * 1000:>8.3f}{m['rtt'] / base['rtt']:>7.3f}"
            f"{m['rtt_cpu'] * 1e6:>8.1f}{m['rtt_cpu'] / base['rtt_cpu']:>7.3f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
