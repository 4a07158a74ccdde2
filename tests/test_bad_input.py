"""Bad input reaching a worker: malformed envelopes fail at decode, are recorded and kept.

Runs on the memory transport (the decode and reject path is the same for every broker; the
contract suite covers the transports themselves).
"""

from __future__ import annotations

import orjson
import pytest
from conftest import running_worker, wait_until

from aioqueue import App, ProtocolError, States
from aioqueue.brokers.memory import MemoryBroker

pytestmark = pytest.mark.timeout(20)


@pytest.mark.parametrize(
    ("field", "value"),
    [("eta", "soon"), ("result_ttl", "60"), ("sent_at", "yesterday"), ("headers", [1])],
)
async def test_malformed_field_is_a_failure_and_a_dead_letter(field: str, value: object) -> None:
    app = App("bad-input")
    broker = app.broker
    assert isinstance(broker, MemoryBroker)

    @app.task
    async def work() -> str:
        return "ran"

    body = {"v": 1, "id": f"bad-{field}", "task": work.name, "queue": "default", field: value}
    async with running_worker(app):
        await broker.publish("default", orjson.dumps(body))
        result = app.AsyncResult(f"bad-{field}")
        with pytest.raises(ProtocolError, match=repr(field)):
            await result.get(timeout=5)

        async def dead_lettered() -> bool:
            return len(await broker.dead_letters("default")) == 1

        await wait_until(dead_lettered, timeout=5)
    assert await result.state() == States.FAILURE
    (dead,) = await broker.dead_letters("default")
    assert f"ProtocolError: message field {field!r}" in dead.reason
    assert await broker.queue_length("default") == 0  # not redelivered to crash again
