"""The batcher's own Redis connection (``aioqueue._redis_link``) and task ids, on the send path.

The link is an asyncio protocol feeding hiredis: these pin what the stream it replaced gave for
free (notices kept while nobody reads, a closed connection failing the waiter, a cancelled read
keeping what is unread) and the id format senders rely on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from conftest import REDIS_URL, require_server
from hiredis import pack_command
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from aioqueue._redis_link import RedisLink, link_settings
from aioqueue.message import new_task_id

pytestmark = pytest.mark.timeout(30)


def test_task_ids_are_uuid4_hex() -> None:
    ids = {new_task_id() for _ in range(2000)}
    assert len(ids) == 2000
    for task_id in list(ids)[:200]:
        parsed = uuid.UUID(task_id)
        assert parsed.hex == task_id and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.fixture
async def client() -> AsyncIterator[Redis]:
    require_server(REDIS_URL, "Redis")
    redis = Redis.from_url(REDIS_URL)
    yield redis
    await redis.aclose()


async def test_round_trips_and_notices_kept_until_read(client: Redis, key_prefix: str) -> None:
    link = await RedisLink.open(link_settings(client))
    try:
        assert await link.roundtrip(pack_command(("PING",)) * 3, 3) == [b"PONG"] * 3
        channel = f"{key_prefix}:notices"
        await link.roundtrip(pack_command(("SUBSCRIBE", channel)), 1)
        await client.publish(channel, b"one")
        await client.publish(channel, b"two")
        await asyncio.sleep(0.05)  # both arrive while nobody reads: the parser keeps them
        # a read cut short by its deadline loses nothing
        assert (await link.roundtrip(b"", 1))[0][2] == b"one"
        assert (await link.roundtrip(b"", 1))[0][2] == b"two"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await link.roundtrip(b"", 1)
        await client.publish(channel, b"three")
        assert (await link.roundtrip(b"", 1))[0][2] == b"three"
        assert link.usable
    finally:
        await link.aclose()


async def test_a_connection_closed_by_the_server_fails_the_waiter(client: Redis) -> None:
    link = await RedisLink.open(link_settings(client))
    try:
        await link.roundtrip(pack_command(("CLIENT", "SETNAME", "aqtest-link-kill")), 1)
        (my_id,) = await link.roundtrip(pack_command(("CLIENT", "ID")), 1)
        waiting = asyncio.create_task(link.roundtrip(pack_command(("BLPOP", "aqtest:nokey", 5)), 1))
        await asyncio.sleep(0.05)
        await client.execute_command("CLIENT", "KILL", "ID", my_id)
        with pytest.raises(redis_errors.ConnectionError):
            await asyncio.wait_for(waiting, 5)
        assert not link.usable
        with pytest.raises(redis_errors.ConnectionError):
            await link.roundtrip(pack_command(("PING",)), 1)
    finally:
        await link.aclose()
