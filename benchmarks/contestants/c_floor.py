"""The floor: raw redis.asyncio / aio-pika doing only what a reliable queue must do per task.

Variant (env BENCH_VARIANT): "1by1" (one network operation per send, per fetch, per settle)
or "batch" (100 per round trip); on Redis also "raw": the 1-by-1 floor whose sends skip
redis-py, an LPUSH written as RESP on an asyncio protocol and its reply awaited (the least a
Python client can do per one-at-a-time send; issue 15 compares aioqueue's lone send with it).
On AMQP: publisher confirms awaited one by one ("1by1") or with a window of 100 in flight
("batch"); the worker consumes with manual ack, prefetch 100.
Completion is pushed to the client over one Redis pub/sub connection (no polling).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import urllib.parse
from typing import Any, ClassVar

import redis.asyncio as aioredis
from _common import AMQP_URL, HERE, PY, REDIS_URL, RESULT_TTL, Contestant, queue_name

VARIANT = os.environ.get("BENCH_VARIANT", "1by1")


class _RawLPush(asyncio.Protocol):
    """One connection speaking just enough RESP: SELECT, then LPUSHes whose one-line replies
    (``+OK``, ``:<length>``) resolve the waiters in order."""

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            waiter = self.waiters.popleft()
            if line[:1] == b"-":
                waiter.set_exception(RuntimeError(line.decode()))
            else:
                waiter.set_result(line)

    def command(self, *parts: bytes) -> asyncio.Future[bytes]:
        assert self.transport is not None
        payload = [b"*%d\r\n" % len(parts)]
        for part in parts:
            payload.append(b"$%d\r\n%b\r\n" % (len(part), part))
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.transport.write(b"".join(payload))
        return waiter


async def _raw_connect(url: str) -> _RawLPush:
    parsed = urllib.parse.urlsplit(url)
    _, protocol = await asyncio.get_running_loop().create_connection(
        _RawLPush, parsed.hostname or "127.0.0.1", parsed.port or 6379
    )
    await protocol.command(b"SELECT", (parsed.path.strip("/") or "0").encode())
    return protocol


class Floor(Contestant):
    name: ClassVar[str] = "floor"
    dists: ClassVar[tuple[str, ...]] = ("redis", "hiredis", "aio-pika", "uvloop")
    batch_size: ClassVar[int | None] = 100

    def __init__(self, transport: str) -> None:
        super().__init__(transport)
        self.queue = "floor:queue" if transport == "redis" else queue_name("floor")
        self.channel = f"floor:done:{os.getpid()}"
        self.ids = itertools.count()
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.r: Any = None
        self.pubsub: Any = None
        self.listener: asyncio.Task[None] | None = None
        self.amqp: Any = None
        self.exchange: Any = None
        self.raw: _RawLPush | None = None
        if transport != "redis":
            client = "aio-pika, publisher confirms, persistent messages, uvloop"
        elif VARIANT == "raw":
            client = "sends: RESP LPUSH on an asyncio protocol; batch and results: redis.asyncio"
        else:
            client = "redis.asyncio (hiredis), BlockingConnectionPool(64), uvloop"
        self.settings = {
            "variant": VARIANT,
            "client": client,
            "worker": "floor_worker.py: 200 coroutines one-by-one, or 2 loops x 100 per round trip"
            if transport == "redis"
            else "aio-pika consume, manual ack, prefetch 100",
            "result": f"SET floor:res:<id> EX {RESULT_TTL} + PUBLISH to the client's channel",
            "reliable_fetch": "LMOVE/BLMOVE into a per-worker processing list, LREM on ack"
            if transport == "redis"
            else "manual ack after the result is stored",
        }

    async def start(self) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=64)
        self.r = aioredis.Redis(connection_pool=pool)
        self.pubsub = self.r.pubsub()
        await self.pubsub.subscribe(self.channel)
        self.listener = asyncio.create_task(self._listen())
        if VARIANT == "raw":
            self.raw = await _raw_connect(REDIS_URL)
        if self.transport == "amqp":
            import aio_pika

            self.amqp = await aio_pika.connect(AMQP_URL)
            ch = await self.amqp.channel(publisher_confirms=True)
            await ch.declare_queue(self.queue, durable=True)
            self.exchange = ch.default_exchange

    async def _listen(self) -> None:
        async for msg in self.pubsub.listen():
            if msg["type"] != "message":
                continue
            fut = self.waiters.pop(msg["data"].decode(), None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def stop(self) -> None:
        if self.listener:
            self.listener.cancel()
        if self.amqp:
            await self.amqp.close()
        if self.raw is not None and self.raw.transport is not None:
            self.raw.transport.close()
        await self.pubsub.aclose()
        await self.r.aclose()

    def _body(self) -> tuple[str, bytes]:
        tid = f"{os.getpid()}-{next(self.ids)}"
        return tid, json.dumps({"id": tid, "t": "noop", "a": [], "r": self.channel}).encode()

    async def send(self, kind: str = "noop", ms: float = 0.0) -> Any:
        tid, body = self._body()
        self.waiters[tid] = asyncio.get_running_loop().create_future()
        if self.raw is not None:
            await self.raw.command(b"LPUSH", self.queue.encode(), body)
        elif self.transport == "redis":
            await self.r.lpush(self.queue, body)
        else:
            await self._publish(body)
        return tid

    async def _publish(self, body: bytes) -> None:
        import aio_pika

        msg = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self.exchange.publish(msg, routing_key=self.queue)

    async def send_batch(self, count: int) -> list[Any]:
        pairs = [self._body() for _ in range(count)]
        loop = asyncio.get_running_loop()
        for tid, _ in pairs:
            self.waiters[tid] = loop.create_future()
        if self.transport == "redis":
            pipe = self.r.pipeline(transaction=False)
            for _, body in pairs:
                pipe.lpush(self.queue, body)
            await pipe.execute()
        else:
            await asyncio.gather(*(self._publish(body) for _, body in pairs))
        return [tid for tid, _ in pairs]

    async def wait(self, handle: Any, timeout: float) -> None:
        fut = self.waiters.get(handle)
        if fut is None:  # already resolved and popped
            return
        await asyncio.wait_for(fut, timeout)

    def result_key(self, handle: Any) -> str | None:
        return f"floor:res:{handle}"

    def worker_argv(self, kind: str) -> tuple[list[str], dict[str, str]]:
        argv = [
            PY,
            os.path.join(HERE, "floor_worker.py"),
            "--transport",
            self.transport,
            "--mode",
            "1by1" if VARIANT == "raw" else VARIANT,
            "--queue",
            self.queue,
        ]
        return argv, {}

    async def purge(self) -> None:
        self.waiters.clear()
        await super().purge()
        if self.transport == "amqp":
            from _common import purge_amqp_queues

            await purge_amqp_queues([self.queue])

    async def cleanup(self) -> None:
        await super().cleanup()
        if self.transport == "amqp":
            from _common import delete_amqp_queues

            await delete_amqp_queues([self.queue])


def make(transport: str) -> Contestant:
    return Floor(transport)
