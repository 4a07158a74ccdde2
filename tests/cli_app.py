"""The app that tests/test_worker_processes.py runs in real ``aioqueue worker`` subprocesses.

Broker, backend, key prefix and heartbeat timings come from the ``AIOQUEUE_*`` variables the
test puts in the worker's environment (process-pool children inherit them). Tasks that record
what happened write under ``<key_prefix>:t:`` so the test's prefix cleanup removes them:

    <prefix>:t:runs:<token>     counter  executions of record(token, ...)
    <prefix>:t:log:<token>      list     one JSON {"pid", "attempt", "run"} per execution
    <prefix>:t:child:<token>    string   pid of the process-pool child running process_sleep
    <prefix>:t:gate:<gate>      string   set by the test to let gated(token, gate) finish
    <prefix>:t:stamp:<token>    list     one JSON {"pid", "at"} per execution of stamp(token)

stamp() and hold() use the results' Redis, not the broker's, so they also work when the test
points the worker at RabbitMQ (``AIOQUEUE_BROKER_URL=amqp://...``, results still on Redis).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from aioqueue import App, Context
from aioqueue.brokers.base import attempt_of

app = App("cli-app")


def record_key(kind: str, token: str, prefix: str | None = None) -> str:
    """A key this app's tasks record under (the test computes the same names)."""
    return f"{prefix or app.conf.key_prefix}:t:{kind}:{token}"


async def _find_attempt(client: aioredis.Redis, token: str) -> int:
    """The attempt number of the message carrying ``token``, read from a processing list.

    A task cannot see its own delivery; the worker holds the message in its processing list
    while the task runs, so the body (which contains the token in its args) is found there.
    """
    pattern = f"{app.conf.key_prefix}:{{{app.conf.default_queue}}}:processing:*"
    async for key in client.scan_iter(match=pattern, count=1000):
        for body in await client.lrange(key, 0, -1):
            if isinstance(body, bytes) and token.encode() in body:
                return attempt_of(body)
    return 0  # not found: the test asserts on it, so this shows up as a failure


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
async def record(token: str, first_sleep: float, later_sleep: float = 0.0) -> dict[str, Any]:
    """Count this execution and log it, then sleep (``first_sleep`` on the first run only)."""
    entry = await _record(token)
    await asyncio.sleep(first_sleep if entry["run"] == 1 else later_sleep)
    return entry


@app.task
async def gated(token: str, gate: str, limit: float = 30.0) -> dict[str, Any]:
    """Count this execution and log it, then wait until the test sets the ``gate`` key."""
    entry = await _record(token)
    client = aioredis.Redis.from_url(app.conf.broker_url)
    try:
        deadline = time.monotonic() + limit
        while not await client.exists(record_key("gate", gate)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} not opened within {limit}s")
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()
    return entry


async def _record(token: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(app.conf.broker_url)
    try:
        attempt = await _find_attempt(client, token)
        run = int(await client.incr(record_key("runs", token)))
        entry = {"pid": os.getpid(), "attempt": attempt, "run": run}
        await client.rpush(record_key("log", token), orjson.dumps(entry))
    finally:
        await client.aclose()
    return entry


def _record_sync(token: str) -> dict[str, Any]:
    client = redis.Redis.from_url(app.conf.broker_url)
    try:
        attempt = 0
        pattern = f"{app.conf.key_prefix}:{{{app.conf.default_queue}}}:processing:*"
        for key in client.scan_iter(match=pattern, count=1000):
            for body in client.lrange(key, 0, -1):
                if isinstance(body, bytes) and token.encode() in body:
                    attempt = attempt_of(body)
        run = int(client.incr(record_key("runs", token)))
        entry = {"pid": os.getpid(), "attempt": attempt, "run": run}
        client.rpush(record_key("log", token), orjson.dumps(entry))
    finally:
        client.close()
    return entry


def record_sync(token: str, first_sleep: float, later_sleep: float = 0.0) -> dict[str, Any]:
    """record() for a thread or a child process: blocks in time.sleep."""
    entry = _record_sync(token)
    time.sleep(first_sleep if entry["run"] == 1 else later_sleep)
    return entry


def gated_sync(token: str, gate: str, limit: float = 30.0) -> dict[str, Any]:
    """gated() for a thread or a child process."""
    entry = _record_sync(token)
    client = redis.Redis.from_url(app.conf.broker_url)
    try:
        deadline = time.monotonic() + limit
        while not client.exists(record_key("gate", gate)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} not opened within {limit}s")
            time.sleep(0.01)
    finally:
        client.close()
    return entry


thread_record = app.task(name="cli_app.thread_record", executor="thread")(record_sync)
process_record = app.task(name="cli_app.process_record", executor="process")(record_sync)
thread_gated = app.task(name="cli_app.thread_gated", executor="thread")(gated_sync)
process_gated = app.task(name="cli_app.process_gated", executor="process")(gated_sync)


@app.task(executor="thread")
def thread_add(x: int, y: int) -> list[Any]:
    return [x + y, threading.current_thread() is not threading.main_thread()]


@app.task(executor="process")
def process_pid() -> int:
    return os.getpid()


@app.task(executor="process")
def process_nap(seconds: float) -> list[Any]:
    time.sleep(seconds)
    return [seconds, os.getpid()]


@app.task(executor="process")
def process_sleep(token: str, seconds: float) -> int:
    """Publish this child's pid under the token, then sleep long enough to be killed."""
    client = redis.Redis.from_url(app.conf.broker_url)
    try:
        client.set(record_key("child", token), os.getpid())
    finally:
        client.close()
    time.sleep(seconds)
    return os.getpid()


def _results_redis() -> aioredis.Redis:
    """The Redis the results live on (the broker may be RabbitMQ)."""
    return aioredis.Redis.from_url(app.conf.result_backend or app.conf.broker_url)


@app.task
async def stamp(token: str) -> float:
    """Log this execution's start (unix time) and pid under ``token``; return the start."""
    at = time.time()
    client = _results_redis()
    try:
        await client.rpush(record_key("stamp", token), orjson.dumps({"pid": os.getpid(), "at": at}))
    finally:
        await client.aclose()
    return at


@app.task(bind=True)
async def retry_stamp(ctx: Context, token: str, pause: float = 0.0, countdown: float = 2.0) -> int:
    """Log this execution (with its retry count) under ``token`` as stamp() does; the first try
    waits ``pause`` seconds, then asks to be retried ``countdown`` seconds later; the retry
    returns its retry count."""
    client = _results_redis()
    try:
        entry = {"pid": os.getpid(), "at": time.time(), "retries": ctx.retries}
        await client.rpush(record_key("stamp", token), orjson.dumps(entry))
    finally:
        await client.aclose()
    if ctx.retries == 0:
        await asyncio.sleep(pause)
        ctx.retry(countdown=countdown)
    return ctx.retries


@app.task
async def hold(gate: str, limit: float = 60.0) -> int:
    """Take a slot until the test sets the ``gate`` key: a worker busy on purpose. Logs its
    start under the gate's name as stamp() does; returns the pid."""
    client = _results_redis()
    try:
        entry = {"pid": os.getpid(), "at": time.time()}
        await client.rpush(record_key("stamp", gate), orjson.dumps(entry))
        deadline = time.monotonic() + limit
        while not await client.exists(record_key("gate", gate)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} not opened within {limit}s")
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()
    return os.getpid()


async def _log_entry(kind: str, run: str, entry: dict[str, Any]) -> None:
    client = _results_redis()
    try:
        await client.rpush(record_key(kind, run), orjson.dumps(entry))
    finally:
        await client.aclose()


@app.task(rate_limit="10/s")
async def rated(run: str) -> float:
    """Log this start ({"pid", "at"}) under ``run`` (one list for all the test's tasks): 10/s
    across every worker (tests/test_cli_limits.py)."""
    at = time.time()
    await _log_entry("stamp", run, {"pid": os.getpid(), "at": at})
    return at


@app.task(concurrency_limit=2)
async def capped(run: str, n: int, seconds: float) -> int:
    """At most 2 at once across every worker: logs its start under ``stamp:<run>`` and its end
    under ``done:<run>`` ({"pid", "n", "at"}), sleeping ``seconds`` between."""
    await _log_entry("stamp", run, {"pid": os.getpid(), "n": n, "at": time.time()})
    await asyncio.sleep(seconds)
    await _log_entry("done", run, {"pid": os.getpid(), "n": n, "at": time.time()})
    return n


@app.task
async def collect(values: list[Any], token: str) -> list[Any]:
    """A chord callback: log this execution under ``token`` as stamp() does; return the
    members' results it was given."""
    client = _results_redis()
    try:
        entry = {"pid": os.getpid(), "at": time.time()}
        await client.rpush(record_key("stamp", token), orjson.dumps(entry))
    finally:
        await client.aclose()
    return values
