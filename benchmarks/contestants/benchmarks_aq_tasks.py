"""aioqueue tasks for the benchmarks (the worker imports ``benchmarks_aq_tasks:app``)."""

from __future__ import annotations

import os

from _common import (
    AMQP_URL,
    REDIS_URL,
    RESULT_TTL,
    TRANSPORT,
    multi_queues,
    payload_size,
    queue_name,
    sleep_ms,
    spin_ms,
)

from aioqueue import App

QUEUE = queue_name("aq") if TRANSPORT == "amqp" else "bench"
QUEUES = multi_queues(QUEUE)  # the many-queues row: noop sent round robin over these
app = App(
    "bench",
    broker=AMQP_URL if TRANSPORT == "amqp" else REDIS_URL,
    backend=REDIS_URL,
    key_prefix="aqbench",
    default_queue=QUEUE,
    result_ttl=float(RESULT_TTL),
    # the "aioqueue-amqp-noconfirm" row: publishes not confirmed (at-most-once on a broker crash)
    amqp_publisher_confirms=os.environ.get("BENCH_VARIANT") != "noconfirm",
)


@app.task
async def noop() -> None:
    return None


@app.task(executor="process")
def cpu(ms: float) -> int:
    return spin_ms(ms)


@app.task(executor="thread")
def block(ms: float) -> None:
    sleep_ms(ms)


@app.task
async def payload(data: str) -> int:
    return payload_size(data)
