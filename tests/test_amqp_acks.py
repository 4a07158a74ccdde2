"""AMQP acks sent together: one ``multiple`` ack where safe, never covering an unsettled message.

The worker's acks of one event-loop iteration go out in one flush (see
``aioqueue.brokers.amqp_consumer._Acks``). These tests pin what that must never do: ack a message
still running, parked or being given back (a ``multiple`` ack covers every tag below its own).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import AMQP_URL, fetch_exactly, require_server, wait_until

from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.amqp_consumer import _Acks, _AmqpDelivery

pytestmark = pytest.mark.timeout(30)


class RecordingChannel:
    """Just enough of an aiormq channel for _Acks: it records the acks queued on it."""

    def __init__(self) -> None:
        self.is_closed = False
        self.closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks: list[tuple[int, bool]] = []

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        await asyncio.sleep(0)  # as aiormq: queueing the frame may wait for room
        self.acks.append((tag, multiple))


async def test_a_multiple_ack_never_covers_an_unsettled_tag() -> None:
    channel = RecordingChannel()
    acks = _Acks(channel)  # type: ignore[arg-type]
    for tag in range(1, 8):
        acks.delivered(tag)
    # 1 is still running: 2, 3, 4 are acked one by one, together
    await asyncio.gather(acks.ack(2), acks.ack(3), acks.ack(4))
    assert channel.acks == [(2, False), (3, False), (4, False)]
    channel.acks.clear()
    # 1 and 5 settle together: nothing below 5 is unsettled any more, so one multiple ack
    await asyncio.gather(acks.ack(1), acks.ack(5))
    assert channel.acks == [(5, True)]
    channel.acks.clear()
    # 6 is being given back (its nack not queued yet): 7 alone, never a multiple ack over 6
    await acks.ack(7)
    assert channel.acks == [(7, False)]
    channel.acks.clear()
    # a tag never seen here (a gap) stops multiple acks below it too
    acks.delivered(9)
    acks.unsettled.discard(6)
    await asyncio.gather(acks.ack(9))
    assert channel.acks == [(9, False)]


async def test_deliveries_seen_out_of_order_still_allow_a_multiple_ack() -> None:
    channel = RecordingChannel()
    acks = _Acks(channel)  # type: ignore[arg-type]
    for tag in (1, 3, 4, 2):
        acks.delivered(tag)
    assert acks.contiguous == 4
    await asyncio.gather(*(acks.ack(tag) for tag in (1, 2, 3, 4)))
    assert channel.acks == [(4, True)]


async def test_acks_asked_for_during_a_flush_go_out_in_the_next_one() -> None:
    channel = RecordingChannel()
    acks = _Acks(channel)  # type: ignore[arg-type]
    for tag in range(1, 5):
        acks.delivered(tag)
    first = acks.ack(1)
    await asyncio.sleep(0)  # the flush has started: it is queueing the frame for 1
    second = asyncio.gather(acks.ack(2), acks.ack(3))
    await first
    await second
    assert channel.acks == [(1, False), (3, True)]


async def test_a_crash_gives_back_exactly_the_unacked_messages(key_prefix: str) -> None:
    """Nine of ten acked together, the first never: after the connection dies, RabbitMQ gives
    back that one only (no multiple ack covered it, and every other ack reached it)."""
    require_server(AMQP_URL, "RabbitMQ")
    broker = AmqpBroker(AMQP_URL, key_prefix=key_prefix, delete_queues_on_close=True)
    try:
        for i in range(10):
            await broker.publish("q", b'{"i":%d}' % i)
        consumer: Any = broker.consumer(["q"], worker_id="acks-test", prefetch=10)
        await consumer.start()
        deliveries: list[_AmqpDelivery] = await fetch_exactly(consumer, 10)
        deliveries.sort(key=lambda d: d._tag)
        assert [d.body for d in deliveries] == [b'{"i":%d}' % i for i in range(10)]
        await asyncio.gather(*(d.ack() for d in deliveries[1:]))
        # the worker dies: its connection goes without giving anything back
        connection, consumer._connection = consumer._connection, None
        await connection.close()

        async def one_back() -> bool:
            return await broker.queue_length("q") == 1

        await wait_until(one_back)
        again: Any = broker.consumer(["q"], worker_id="acks-test-2", prefetch=10)
        await again.start()
        try:
            back = await again.fetch(10, 5)
            assert [d.body for d in back] == [b'{"i":0}']
            assert back[0].redelivered
            await back[0].ack()

            # the copy carrying the raised attempt ran; the original is acked once its copy is
            # confirmed (a close before that would give the original back as well)
            async def recounted() -> bool:
                return not again._recounting

            await wait_until(recounted)
        finally:
            await again.close()
        assert await broker.queue_length("q") == 0
    finally:
        await broker.aclose()
