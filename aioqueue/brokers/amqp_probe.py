"""Counting RabbitMQ queues fast: passive declares, many at once, on a connection of their own.

``aioqueue queues`` needs a passive declare of every queue, its dead letters and each of its 22
delay buckets. Most buckets do not exist, and RabbitMQ answers a passive declare of a missing
queue by closing the channel (404), so each declare gets a short-lived channel of its own, and up
to :data:`PROBE_CHANNELS` of them are in flight at once, opened on the AMQP layer (aiormq) under
the robust connection: a third of the cost of an aio-pika channel.

A connection of their own, whose channel numbers are never used twice: aiormq answers a
server's channel.close by queueing a close-ok it drops when the connection's frame queue is full
(as it is with many channels at once), and frees the number all the same; RabbitMQ, still waiting
for that close-ok, takes a later channel.open with the number as a connection error ("second
'channel.open' seen"). So each probe takes the next number, and once the connection's numbers are
used up it is closed (which ends the half-closed channels on the server too) and a new one opened.
A failure costs this connection only, never the publishing one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import aiormq
from aio_pika.abc import AbstractRobustConnection

from .._amqp import close_quietly, guarded

__all__ = ["CHANNEL_MAX", "PROBE_CHANNELS", "Prober"]

PROBE_CHANNELS = 8
"""Passive declares in flight at once."""
CHANNEL_MAX = 2047
"""Channel numbers used per connection at most (RabbitMQ's default ``channel_max``)."""


class Prober:
    """Passive declares on a connection opened on first use; ``aclose()`` closes it.

    A connection whose numbers ran out is replaced, and closed once the probes still running
    on it (another caller's) are done.
    """

    def __init__(
        self, connect: Callable[[], Awaitable[AbstractRobustConnection]], timeout: float
    ) -> None:
        self._connect = connect
        self._timeout = timeout
        self._connection: AbstractRobustConnection | None = None
        self._users: dict[AbstractRobustConnection, int] = {}
        self._lock = asyncio.Lock()
        self._next = 1
        self._limit = CHANNEL_MAX

    async def _take(
        self, count: int
    ) -> tuple[AbstractRobustConnection, aiormq.abc.AbstractConnection, range]:
        """The connection, its AMQP layer, and up to ``count`` numbers never used on it."""
        async with self._lock:
            if self._connection is not None and self._next > self._limit:
                stale, self._connection = self._connection, None
                if not self._users.get(stale):
                    await self._close(stale)
            if self._connection is None:
                self._connection = await self._connect()
                self._next = 1
            robust = self._connection
            async with asyncio.timeout(self._timeout):
                await robust.ready()
            transport = robust.transport
            if transport is None:
                raise aiormq.exceptions.ConnectionClosed(0, "reconnecting")
            tune = transport.connection.connection_tune
            self._limit = min(CHANNEL_MAX, tune.channel_max or CHANNEL_MAX)
            numbers = range(self._next, min(self._next + count, self._limit + 1))
            self._next = numbers.stop
            self._users[robust] = self._users.get(robust, 0) + 1
            return robust, transport.connection, numbers

    async def _release(self, robust: AbstractRobustConnection) -> None:
        self._users[robust] -= 1
        if not self._users[robust] and robust is not self._connection:
            await self._close(robust)

    async def _close(self, robust: AbstractRobustConnection) -> None:
        self._users.pop(robust, None)
        await close_quietly(robust, self._timeout)

    async def probe(self, names: Sequence[str]) -> dict[str, tuple[int, int] | None]:
        """(messages, consumers) of each queue, None for one that does not exist."""
        unique = list(dict.fromkeys(names))
        found: dict[str, tuple[int, int] | None] = {}
        lanes = asyncio.Semaphore(PROBE_CHANNELS)
        async with asyncio.timeout(self._timeout):
            while len(found) < len(unique):
                todo = unique[len(found) :]
                robust, connection, numbers = await self._take(len(todo))
                try:
                    counts = await asyncio.gather(
                        *(
                            _declare(lanes, connection, number, name)
                            for name, number in zip(todo, numbers, strict=False)
                        )
                    )
                finally:
                    await self._release(robust)
                found.update(zip(todo, counts, strict=False))
        return {name: found[name] for name in names}

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        for robust in {*self._users, *([connection] if connection is not None else [])}:
            await self._close(robust)


async def _declare(
    lanes: asyncio.Semaphore, connection: aiormq.abc.AbstractConnection, number: int, name: str
) -> tuple[int, int] | None:
    async with lanes:
        return await _declare_on(connection, number, name)


async def _declare_on(
    connection: aiormq.abc.AbstractConnection, number: int, name: str
) -> tuple[int, int] | None:
    channel = await connection.channel(number, publisher_confirms=False)
    try:
        with guarded(channel):
            declared = await channel.queue_declare(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
    return declared.message_count or 0, declared.consumer_count or 0
