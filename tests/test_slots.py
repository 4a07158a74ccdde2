"""Slots, the worker's one concurrency bound, on its own: waiting, cancelling, handing over."""

from __future__ import annotations

import asyncio

import pytest

from aioqueue.worker.slots import Slots

pytestmark = pytest.mark.timeout(10)


async def test_a_waiter_cancelled_then_passed_over_by_a_release_leaves_no_error() -> None:
    """The waiter's task is cancelled, and a release() runs before the task resumes: the
    release passes over the cancelled waiter, and the cancelled acquire must not fail."""
    slots = Slots(1)
    await slots.acquire()
    waiting = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)  # queued
    waiting.cancel()
    slots.release()  # before the cancelled task runs its cleanup
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # the released slot was not lost: it can be taken at once, and only once
    await asyncio.wait_for(slots.acquire(), 1)
    assert slots.take_up_to(1) == 0


async def test_slots_are_handed_to_waiters_in_order() -> None:
    slots = Slots(1)
    await slots.acquire()
    order: list[int] = []

    async def take(n: int) -> None:
        await slots.acquire()
        order.append(n)

    tasks = [asyncio.ensure_future(take(n)) for n in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        slots.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_is_given_back() -> None:
    slots = Slots(1)
    await slots.acquire()
    waiting = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # handed to the waiter ...
    waiting.cancel()  # ... which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert slots.take_up_to(1) == 1  # the slot came back
