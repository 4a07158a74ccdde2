"""Rate limits and concurrency caps across workers, changeable at run time (issue 9, items 3-5).

Contract tests over every transport. Two workers of one app share the limiter on memory, Redis
and AMQP with Redis results; with rpc:// results there is no shared store and each worker
counts alone (documented), so there the tests run one worker.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace
from typing import Any

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import App, BrokerConnectionError, ConfigurationError, Context
from aioqueue._limiter import MemoryLimiter
from aioqueue.limits import TaskLimits, parse_rate
from aioqueue.message import Message
from aioqueue.worker.handler import Park
from aioqueue.worker.limiting import Gate, Permit

pytestmark = pytest.mark.timeout(60)


def _workers(transport: str) -> int:
    return 1 if transport == "amqp-rpc" else 2


class _Two:
    """One or two workers of ``app`` running at once (see the module docstring)."""

    def __init__(self, app: App, count: int, **options: Any) -> None:
        self._contexts = [running_worker(app, **options) for _ in range(count)]
        self.workers: list[Any] = []

    async def __aenter__(self) -> list[Any]:
        for context in self._contexts:
            self.workers.append(await context.__aenter__())
        return self.workers

    async def __aexit__(self, *exc: object) -> None:
        for context in reversed(self._contexts):
            await context.__aexit__(None, None, None)


@pytest.mark.parametrize(
    ("value", "shown"),
    [("10/x", "'10/x'"), ("0/s", "'0/s'"), ("ten/m", "'ten/m'"), (10, "10"), ("5/s burst 0", "")],
)
def test_a_bad_rate_limit_is_refused_naming_it(value: Any, shown: str) -> None:
    app = App("bad-rate")
    with pytest.raises(ConfigurationError, match=shown or "burst"):

        @app.task(rate_limit=value)
        async def job() -> None: ...


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_a_bad_concurrency_limit_is_refused_naming_it(value: Any) -> None:
    app = App("bad-cap")
    with pytest.raises(ConfigurationError, match=repr(value).replace(".", r"\.")):

        @app.task(concurrency_limit=value)
        async def job() -> None: ...


async def test_control_refuses_bad_limits_before_any_io() -> None:
    app = App("bad-control", broker_url="redis://127.0.0.1:1/0")  # nothing listens there
    with pytest.raises(ConfigurationError, match="'fast'"):
        await app.control.rate_limit("proj.add", "fast")
    with pytest.raises(ConfigurationError, match="0"):
        await app.control.concurrency_limit("proj.add", 0)


def test_rates_parse_with_their_units_and_burst() -> None:
    assert parse_rate("10/m").interval == pytest.approx(6.0)
    assert parse_rate("2/h").interval == pytest.approx(1800.0)
    rate = parse_rate("100/s burst 20")
    assert (rate.interval, rate.burst) == (pytest.approx(0.01), 20)


async def test_a_rate_limit_spaces_starts_across_workers_without_burning_retries(
    make_app: AppFactory, transport: str
) -> None:
    """8/s with a 1 s horizon: the first 9 are reserved and parked, the rest re-sent (deferred)
    and reserved when they come back: all spaced by 1/8 s, on attempt 1 with no retry counted."""
    app = make_app()
    starts: list[tuple[float, int, int, int]] = []

    @app.task(bind=True, rate_limit="8/s", max_retries=0)
    async def limited(ctx: Context, n: int) -> int:
        starts.append((time.monotonic(), n, ctx.attempt, ctx.retries))
        return n

    async with app:
        handles = [await limited.send(n) for n in range(14)]
        async with _Two(app, _workers(transport)):
            assert [await h.get(timeout=30) for h in handles] == list(range(14))
    assert {(attempt, retries) for _, _, attempt, retries in starts} == {(1, 0)}
    starts.sort()
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.125 * 0.8, gaps  # timer and clock jitter, never a burst
    elapsed = starts[-1][0] - starts[0][0]
    assert 13 * 0.125 * 0.9 <= elapsed <= 13 * 0.125 * 1.6, elapsed


async def test_deferred_tasks_keep_their_order_on_a_worker(make_app: AppFactory) -> None:
    """Parked (reserved) and re-sent (beyond the horizon) alike start in the order sent."""
    app = make_app()
    order: list[int] = []

    @app.task(rate_limit="10/s")
    async def limited(n: int) -> None:
        order.append(n)

    async with app:
        handles = [await limited.send(n) for n in range(18)]
        async with running_worker(app, concurrency=20):
            for handle in handles:
                await handle.get(timeout=30)
    assert order == list(range(18))


async def test_a_rate_limited_task_does_not_hold_up_plain_ones(make_app: AppFactory) -> None:
    app = make_app()

    @app.task(rate_limit="2/s")
    async def slow(n: int) -> int:
        return n

    @app.task
    async def plain(n: int) -> int:
        return n

    async with app:
        limited = [await slow.send(n) for n in range(6)]
        async with running_worker(app, concurrency=2):
            begun = time.monotonic()
            assert await (await plain.send(7)).get(timeout=10) == 7
            assert time.monotonic() - begun < 1.0  # not behind the 2.5 s of limited ones
            assert [await h.get(timeout=20) for h in limited] == list(range(6))


async def test_a_concurrency_cap_holds_across_workers(make_app: AppFactory, transport: str) -> None:
    app = make_app()
    running = 0
    most = 0

    @app.task(concurrency_limit=2)
    async def capped(n: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.15)
        running -= 1
        return n

    async with app:
        handles = [await capped.send(n) for n in range(10)]
        async with _Two(app, _workers(transport), concurrency=5) as workers:
            assert [await h.get(timeout=30) for h in handles] == list(range(10))
    # Read after the workers stopped: a result is readable before its settle is counted.
    assert sum(w.processed for w in workers) == 10
    assert most == 2


async def test_limits_change_at_run_time_and_are_kept_for_later_workers(
    make_app: AppFactory,
) -> None:
    app = make_app()
    running = 0
    most = 0
    starts: list[float] = []

    @app.task
    async def job(pause: float) -> None:
        nonlocal running, most
        starts.append(time.monotonic())
        running += 1
        most = max(most, running)
        await asyncio.sleep(pause)
        running -= 1

    async with app:
        # Set before any worker runs: a worker started later loads it.
        await app.control.concurrency_limit(job.name, 1)
        async with running_worker(app, concurrency=10) as worker:
            await wait_until(lambda: _has(worker, job.name, cap=1), timeout=10)
            await asyncio.gather(*[(await job.send(0.05)).get(timeout=20) for _ in range(5)])
            assert most == 1
            # Pushed to the running worker: no cap, a rate instead.
            await app.control.concurrency_limit(job.name, None)
            await app.control.rate_limit(job.name, "5/s")
            await wait_until(lambda: _has(worker, job.name, cap=None, rate="5/s"), timeout=10)
            starts.clear()
            await asyncio.gather(*[(await job.send(0.0)).get(timeout=20) for _ in range(4)])
            assert starts[-1] - starts[0] >= 3 * 0.2 * 0.8
            await app.control.rate_limit(job.name, None)
            await wait_until(lambda: _has(worker, job.name, gone=True), timeout=10)


async def test_reset_limits_goes_back_to_the_declared_ones_also_for_later_workers(
    make_app: AppFactory,
) -> None:
    app = make_app()

    @app.task(concurrency_limit=1)
    async def job() -> None: ...

    async with app:
        await app.control.concurrency_limit(job.name, 4)
        await app.control.rate_limit(job.name, "5/s")
        async with running_worker(app) as worker:
            await wait_until(lambda: _has(worker, job.name, cap=4, rate="5/s"), timeout=10)
            await app.control.reset_limits(job.name)
            await wait_until(lambda: _has(worker, job.name, cap=1), timeout=10)
        async with running_worker(app) as later:
            await wait_until(lambda: _has(later, job.name, cap=1), timeout=10)


async def test_a_rate_changed_at_run_time_starts_afresh_not_behind_the_old_schedule(
    make_app: AppFactory,
) -> None:
    """After a start at 1/m the next is a minute away; set to 20/s, new tasks start at once."""
    app = make_app()

    @app.task(rate_limit="1/m")
    async def job(n: int) -> int:
        return n

    async with app, running_worker(app) as worker:
        assert await (await job.send(0)).get(timeout=10) == 0
        await app.control.rate_limit(job.name, "20/s")
        await wait_until(lambda: _has(worker, job.name, rate="20/s"), timeout=10)
        begun = time.monotonic()
        handles = [await job.send(n) for n in range(1, 4)]
        assert [await h.get(timeout=10) for h in handles] == [1, 2, 3]
        assert time.monotonic() - begun < 5.0


async def _has(
    worker: Any, name: str, *, cap: int | None = None, rate: str | None = None, gone: bool = False
) -> bool:
    limits = worker._limits.active.get(name)
    if gone:
        return limits is None
    if limits is None:
        return False
    return limits.cap == cap and (limits.rate.text if limits.rate else None) == rate


async def test_a_capped_task_waiting_longer_than_the_broker_lets_a_worker_hold_it_goes_back() -> (
    None
):
    """AMQP closes a channel holding a message unacked past its consumer timeout: a task that
    waits that long for a permit is given back to its queue, untouched, before half of it."""
    gate = Gate(
        MemoryLimiter(shared=True), App("g").codec, worker_id="w", lease_ttl=30.0, max_hold=10.0
    )
    limits = TaskLimits(None, 1)
    running = await gate.enter(limits, "t", Message(id="a", task="t", queue="q"), None)
    assert isinstance(running, Permit)
    waiting = Message(id="b", task="t", queue="q")
    parked = await gate.enter(limits, "t", waiting, None)
    assert isinstance(parked, Park) and not parked.give_back and parked.held_since is not None
    parked = await gate.enter(limits, "t", waiting, parked)
    assert isinstance(parked, Park) and not parked.give_back  # held only a moment so far
    long_ago = replace(parked, held_since=time.time() - 5.0)
    given = await gate.enter(limits, "t", waiting, long_ago)
    assert isinstance(given, Park) and given.give_back
    await running.release()
    assert isinstance(await gate.enter(limits, "t", waiting, None), Permit)
    await gate.aclose()


class _Unreachable(MemoryLimiter):
    async def reserve(self, task: str, rate: Any, horizon: float) -> tuple[bool, float]:
        raise BrokerConnectionError("the limiter's Redis is away")


async def test_a_limiter_that_cannot_answer_keeps_the_task_aside_costing_no_attempt() -> None:
    gate = Gate(
        _Unreachable(shared=True), App("g").codec, worker_id="w", lease_ttl=30.0, max_hold=None
    )
    waited = await gate.enter(
        TaskLimits(parse_rate("5/s"), None), "t", Message(id="a", task="t", queue="q"), None
    )
    assert isinstance(waited, Park) and not waited.give_back and not waited.reserved
    assert waited.until > time.time() + 0.5  # asks again a while later, not in a loop


async def test_a_permit_is_renewed_while_its_task_runs_past_its_lease(
    make_app: AppFactory, transport: str
) -> None:
    """Leases of 0.3 s, tasks of 1 s, a cap of 1 on two workers: the running one's permit is
    renewed (every 0.1 s), so the second never starts while the first runs."""
    app = make_app(concurrency_lease_ttl=0.3)
    running = 0
    most = 0

    @app.task(concurrency_limit=1)
    async def long(n: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(1.0)
        running -= 1
        return n

    async with app:
        handles = [await long.send(n) for n in range(2)]
        async with _Two(app, _workers(transport), concurrency=2):
            assert [await h.get(timeout=20) for h in handles] == [0, 1]
    assert most == 1
