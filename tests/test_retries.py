"""Retries, over every transport: retry_for, Retry / ctx.retry, backoff, the RETRY state, the
last error kept as FAILURE with the message in the dead letters, and eager ``apply``."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import (
    ConfigurationError,
    Context,
    MaxRetriesExceeded,
    Retry,
    States,
)
from aioqueue.retries import RetryPolicy

pytestmark = pytest.mark.timeout(60)


class Flaky(OSError):
    """Importable, so every client rebuilds it with its own type."""


async def test_retry_for_runs_again_until_it_succeeds(make_app: AppFactory) -> None:
    app = make_app()
    runs: Counter[str] = Counter()

    @app.task(retry_for=(OSError,), max_retries=3, default_retry_delay=0.05)
    async def fetch(url: str) -> str:
        runs[url] += 1
        if runs[url] < 3:
            raise Flaky(f"try {runs[url]} failed")
        return f"got {url}"

    async with app, running_worker(app):
        result = await fetch.send("a")
        assert await result.get(timeout=20) == "got a"
        assert runs["a"] == 3
        assert await result.retries() == 2
        assert await app.broker.dead_letters("default") == []


async def test_last_error_is_the_failure_and_the_message_is_kept(make_app: AppFactory) -> None:
    app = make_app()
    runs: Counter[str] = Counter()

    @app.task(retry_for=OSError, max_retries=2, default_retry_delay=0.05)
    async def always(key: str) -> None:
        runs[key] += 1
        raise Flaky(f"failure {runs[key]}")

    async with app, running_worker(app):
        result = await always.send("k")
        with pytest.raises(Flaky, match="failure 3"):
            await result.get(timeout=20)
        assert runs["k"] == 3  # the first try and two retries
        assert await result.state() == States.FAILURE
        assert await result.retries() == 2
        dead = await app.broker.dead_letters("default")
        assert len(dead) == 1
        assert "retries exhausted (2 of max_retries=2)" in dead[0].reason
        assert "Flaky: failure 3" in dead[0].reason
        assert b'"retries":2' in dead[0].body  # the copy that ran last


async def test_errors_not_listed_are_not_retried(make_app: AppFactory) -> None:
    app = make_app()
    runs: Counter[str] = Counter()

    @app.task(retry_for=(OSError,), default_retry_delay=0.05)
    async def picky() -> None:
        runs["picky"] += 1
        raise ValueError("not retried")

    async with app, running_worker(app):
        result = await picky.send()
        with pytest.raises(ValueError, match="not retried"):
            await result.get(timeout=20)
        assert runs["picky"] == 1
        assert await result.retries() == 0
        assert await app.broker.dead_letters("default") == []  # an ordinary failure


async def test_ctx_retry_shows_retry_state_while_it_waits(make_app: AppFactory) -> None:
    app = make_app()
    runs: Counter[str] = Counter()
    release = asyncio.Event()

    @app.task(bind=True)
    async def charge(ctx: Context, customer: str, cents: int) -> str:
        runs[ctx.id] += 1
        if ctx.retries == 0:
            ctx.retry(countdown=0.3, exc=Flaky("gateway busy"))
        await release.wait()
        return f"{customer}:{cents}:{ctx.retries}"

    async with app, running_worker(app):
        result = await charge.send("c-1", 500)

        async def retrying() -> bool:
            return await result.state() == States.RETRY

        await wait_until(retrying, timeout=10)
        info = await result.info()
        assert isinstance(info, Flaky) and "gateway busy" in str(info)
        assert await result.retries() == 1
        release.set()
        assert await result.get(timeout=20) == "c-1:500:1"
        assert runs[result.id] == 2


async def test_raise_retry_without_error_past_the_limit(make_app: AppFactory) -> None:
    app = make_app()
    runs: Counter[str] = Counter()

    @app.task(max_retries=1)
    async def again() -> None:
        runs["again"] += 1
        raise Retry(countdown=0.05)

    async with app, running_worker(app):
        result = await again.send()
        with pytest.raises(MaxRetriesExceeded, match="max_retries=1"):
            await result.get(timeout=20)
        assert runs["again"] == 2


async def test_retry_max_retries_overrides_the_task(make_app: AppFactory) -> None:
    app = make_app()
    runs: Counter[str] = Counter()

    @app.task(bind=True, max_retries=0)
    async def stubborn(ctx: Context) -> int:
        runs["s"] += 1
        if ctx.retries < 3:
            await ctx.retry(countdown=0.01, max_retries=5)  # the awaited spelling works too
        return ctx.retries

    async with app, running_worker(app):
        assert await (await stubborn.send()).get(timeout=20) == 3
        assert runs["s"] == 4


async def test_thread_task_retries_and_sees_its_context(make_app: AppFactory) -> None:
    app = make_app()
    runs: Counter[str] = Counter()

    @app.task(bind=True, retry_for=(Flaky,), default_retry_delay=0.05)
    def blocking(ctx: Context, n: int) -> tuple[int, int]:
        runs["b"] += 1
        if ctx.retries < 2:
            raise Flaky("not yet")
        return n, ctx.retries

    async with app, running_worker(app):
        assert await (await blocking.send(7)).get(timeout=20) == (7, 2)
        assert runs["b"] == 3


async def test_retry_keeps_reply_ids_headers_and_limits(make_app: AppFactory) -> None:
    app = make_app()
    seen: list[tuple[object, ...]] = []

    @app.task(bind=True)
    async def look(ctx: Context) -> str:
        seen.append((ctx.id, ctx.headers.get("tenant"), ctx.parent_id, ctx.root_id, ctx.retries))
        if ctx.retries == 0:
            ctx.retry(countdown=0.05)
        return "ok"

    async with app, running_worker(app):
        options = look.options(headers={"tenant": "t1"}, parent_id="p", root_id="r", timeout=30)
        result = await options.send()
        assert await result.get(timeout=20) == "ok"  # the sender's waiter is woken by the retry
    assert seen == [(result.id, "t1", "p", "r", 0), (result.id, "t1", "p", "r", 1)]


async def test_retry_after_an_early_ack(make_app: AppFactory) -> None:
    app = make_app(acks_late=False)
    runs: Counter[str] = Counter()

    @app.task(retry_for=(Flaky,), default_retry_delay=0.05)
    async def early() -> int:
        runs["e"] += 1
        if runs["e"] == 1:
            raise Flaky("first")
        return runs["e"]

    async with app, running_worker(app):
        assert await (await early.send()).get(timeout=20) == 2


async def test_backoff_spreads_the_retries() -> None:
    policy = RetryPolicy(backoff=1.0, backoff_max=5.0, jitter=False)
    assert [policy.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.delay(10_000) == 5.0  # no overflow far past the cap
    jittered = RetryPolicy(backoff=2.0, backoff_max=600.0, jitter=True)
    delays = [jittered.delay(3) for _ in range(200)]
    assert all(0 <= d <= 16.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100  # spread, not one instant
    assert RetryPolicy(default_delay=7.0).delay(3) == 7.0


async def test_apply_runs_the_retries_here() -> None:
    from aioqueue import App

    app = App("eager-retries", broker="memory://")
    runs: Counter[str] = Counter()

    @app.task(bind=True, retry_for=(Flaky,), max_retries=2, default_retry_delay=60)
    async def eager(ctx: Context) -> tuple[bool, int]:
        runs["e"] += 1
        if ctx.retries < 2:
            raise Flaky("again")
        return ctx.is_eager, ctx.retries

    result = await eager.apply()
    assert await result.get() == (True, 2)  # the 60 s delay is not slept out here
    assert await result.retries() == 2
    assert runs["e"] == 3

    @app.task(retry_for=(Flaky,), max_retries=1)
    async def never() -> None:
        raise Flaky("always")

    failed = await never.apply()
    with pytest.raises(Flaky, match="always"):
        await failed.get()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"retry_for": (ValueError, "OSError")}, "retry_for"),
        ({"retry_for": 42}, "retry_for"),
        ({"retry_backoff": -1}, "retry_backoff"),
        ({"retry_backoff_max": 0}, "retry_backoff_max"),
        ({"retry_jitter": "yes"}, "retry_jitter"),
        ({"default_retry_delay": float("nan")}, "default_retry_delay"),
    ],
)
def test_bad_retry_options_are_refused(options: dict[str, object], match: str) -> None:
    from aioqueue import App

    app = App("bad-retries", broker="memory://")
    with pytest.raises(ConfigurationError, match=match):
        app.task(**options)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "kwargs",
    [{"countdown": -1}, {"countdown": float("inf")}, {"eta": "soon"}, {"max_retries": -2}],
)
def test_bad_retry_values_fail_where_raised(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="Retry"):
        Retry(**kwargs)  # type: ignore[arg-type]
