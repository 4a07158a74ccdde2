"""Every wait is bounded (issue 7): a peer that stops answering without closing the connection
(a frozen server, a dead link without a FIN) ends in a typed error within the configured time,
never a hang. The peers are real servers behind a loopback proxy that the test freezes.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import AMQP_URL, REDIS_URL, delete_prefixed, require_server
from faultproxy import FaultProxy

from aioqueue import App, ResultTimeout

pytestmark = pytest.mark.timeout(30)


async def test_a_result_wait_on_a_frozen_backend_ends_at_its_timeout(key_prefix: str) -> None:
    require_server(REDIS_URL, "Redis")
    async with FaultProxy(6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/15"
        app = App("frozen-wait", broker=url, key_prefix=key_prefix)
        try:
            async with app:
                handle = app.AsyncResult("never-sent")
                proxy.freeze()
                started = time.monotonic()
                with pytest.raises(ResultTimeout):
                    await handle.get(timeout=1.0)
                assert time.monotonic() - started < 3.0
                proxy.thaw()
        finally:
            await delete_prefixed(REDIS_URL, key_prefix)


async def test_a_publish_rabbitmq_never_confirms_fails_within_its_timeout(key_prefix: str) -> None:
    require_server(AMQP_URL, "RabbitMQ")
    from aioqueue import BrokerError
    from aioqueue.brokers.amqp import AmqpBroker

    async with FaultProxy(5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        broker = AmqpBroker(
            url,
            key_prefix=key_prefix,
            publish_timeout=1.0,
            channel_pool_size=1,  # the frozen publish goes to the channel that is open
            delete_queues_on_close=True,
        )
        try:
            await broker.connect()
            await broker.publish("default", b"{}")  # declared and confirmed while it flows
            proxy.freeze()
            started = time.monotonic()
            with pytest.raises(BrokerError, match=r"did not confirm a publish within 1.0s"):
                await broker.publish("default", b"{}")
            assert time.monotonic() - started < 3.0
            proxy.thaw()
            await broker.publish("default", b"{}")  # the channel still works afterwards
            # the unconfirmed one may or may not have been queued, as the error says
            assert await broker.queue_length("default") in (2, 3)
        finally:
            proxy.thaw()
            await asyncio.wait_for(broker.aclose(), 10)
