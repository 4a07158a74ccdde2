"""Tests of shop.py with the aioqueue pytest plugin: no broker, no sleeping.

`pytest -p aioqueue.testing --aioqueue-app shop:app examples/plugin` (with pytest-asyncio in
auto mode). Each test gets the app on a fresh memory transport and a virtual clock.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import shop
from shop import app, charge, checkout, reserve

from aioqueue import InvalidArguments, States, TaskNotRegistered


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[None]:
    shop.inventory.clear()
    shop.payment_attempts.clear()
    yield


async def test_a_countdown_runs_when_its_time_comes(aioqueue_worker, aioqueue_clock):
    result = await reserve.options(countdown=120).send("apple", 2)
    assert await aioqueue_worker.run_due() == 0  # not yet: the clock has not moved
    aioqueue_clock.advance(119)
    assert await aioqueue_worker.run_due() == 0
    aioqueue_clock.advance(1)
    assert await aioqueue_worker.run_due() == 1
    assert await result.get(timeout=0) == 2


async def test_retries_with_backoff_happen_in_virtual_time(aioqueue_worker, aioqueue_sent):
    result = await checkout.send("order-1", "apple")
    await aioqueue_worker.drain()  # runs checkout, what it sent, and charge's retries
    assert await result.get(timeout=0) == "order-1"
    aioqueue_sent.assert_sent(reserve, args=("apple", 1), times=1)
    charged = aioqueue_sent(charge)[0]
    assert await app.AsyncResult(charged.id).get(timeout=0) == "charged order-1"
    assert await app.AsyncResult(charged.id).retries() == 2
    assert len(aioqueue_sent(charge, retries=True)) == 3  # the first send and two retries


async def test_expired_messages_are_revoked_not_run(aioqueue_worker, aioqueue_clock):
    result = await reserve.options(countdown=60, expires=30).send("apple", 1)
    aioqueue_clock.advance(3600)
    await aioqueue_worker.run_due()
    assert await result.state() == States.REVOKED
    assert shop.inventory == {}


async def test_the_periodic_entry_ticks_with_the_clock(
    aioqueue_worker, aioqueue_clock, aioqueue_sent
):
    await reserve.send("apple", 1)
    await aioqueue_worker.run_due()
    aioqueue_clock.advance(3600)  # an hour: six restocks, each at its own time
    await aioqueue_worker.run_due()
    assert len(aioqueue_sent("shop.restock")) == 6
    assert shop.inventory == {"apple": 61}


async def test_mistakes_fail_as_on_a_real_worker(aioqueue_worker):
    unknown = await app.send_task("shop.refund", ("order-1",))
    wrong = await app.send_task("shop.reserve", ("apple",))  # count is missing
    await aioqueue_worker.drain()
    with pytest.raises(TaskNotRegistered):
        await unknown.get(timeout=0)
    with pytest.raises(InvalidArguments):
        await wrong.get(timeout=0)
