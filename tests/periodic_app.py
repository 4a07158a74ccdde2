"""The app tests/test_periodic_workers.py runs in ``aioqueue worker`` and ``aioqueue beat``.

Broker, backend and key prefix come from ``AIOQUEUE_*`` variables. Every tick appends one JSON
``{"id", "attempt"}`` to the Redis list ``<prefix>:t:ticks`` at ``PERIODIC_RECORD_URL`` (Redis
even when the transport is AMQP), which the test reads.
"""

from __future__ import annotations

import os

import orjson
import redis.asyncio as aioredis

from aioqueue import App, Context

app = App("periodic-app")
_clients: list[aioredis.Redis] = []


@app.periodic(every=1, name="heartbeat")
@app.task(name="periodic_app.tick", bind=True)
async def tick(ctx: Context) -> None:
    if not _clients:
        _clients.append(aioredis.Redis.from_url(os.environ["PERIODIC_RECORD_URL"]))
    entry = orjson.dumps({"id": ctx.id, "attempt": ctx.attempt})
    await _clients[0].rpush(f"{app.conf.key_prefix}:t:ticks", entry)
