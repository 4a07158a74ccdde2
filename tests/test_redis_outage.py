"""A Redis that goes away and comes back: clear errors meanwhile, and the worker carries on.

Runs against a private redis-server on a free port (never the shared one), which the test
starts, kills and starts again by its own pid.
"""

from __future__ import annotations

import pytest
from conftest import PrivateRedis, port_open, wait_until

from aioqueue import App, BrokerConnectionError

pytestmark = pytest.mark.timeout(60)


async def test_worker_survives_a_redis_restart(private_redis: PrivateRedis) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    await wait_until(lambda: port_open(private_redis.port))
    app = App(
        "outage",
        broker=url,
        broker_connect_timeout=0.5,
        worker_heartbeat_interval=0.1,
        worker_heartbeat_ttl=1.0,
    )

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    async with app, app.worker(concurrency=4) as worker:
        assert await (await double.send(1)).get(timeout=5) == 2

        private_redis.kill()
        with pytest.raises(BrokerConnectionError, match=f"127.0.0.1:{private_redis.port}"):
            await double.send(2)

        private_redis.start()
        await wait_until(lambda: port_open(private_redis.port))

        async def sent_and_done() -> bool:
            try:
                result = await double.send(21)
                return bool(await result.get(timeout=2) == 42)
            except (BrokerConnectionError, TimeoutError):
                return False

        await wait_until(sent_and_done, timeout=20, interval=0.2)
        assert worker.ready.is_set()
