"""The task's own context (bind=True, current_context), Task base-class hooks and app
middleware, over every transport; their typing under mypy --strict."""

from __future__ import annotations

import asyncio
import dataclasses
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import (
    App,
    ConfigurationError,
    Context,
    Message,
    Middleware,
    Outcome,
    States,
    Task,
    current_context,
)

pytestmark = pytest.mark.timeout(60)


class Flaky(OSError):
    pass


async def test_bound_task_sees_its_own_run(make_app: AppFactory) -> None:
    app = make_app()
    seen: dict[str, Any] = {}

    @app.task(bind=True, queue="ctx-q")
    async def charge(ctx: Context, customer: str, cents: int) -> str:
        seen.update(
            id=ctx.id,
            name=ctx.name,
            queue=ctx.queue,
            attempt=ctx.attempt,
            retries=ctx.retries,
            headers=ctx.headers,
            parent=ctx.parent_id,
            root=ctx.root_id,
            worker=ctx.worker_id,
            eager=ctx.is_eager,
            expires=ctx.expires,
            args=ctx.args,
            same=current_context() is not None and current_context().id == ctx.id,  # type: ignore[union-attr]
        )
        return f"{customer}:{cents}"

    async with app, running_worker(app, queues=["ctx-q"]) as worker:
        options = charge.options(headers={"trace": "t-1"}, parent_id="p-1", expires=60)
        result = await options.send("c-1", cents=500)
        assert await result.get(timeout=10) == "c-1:500"
    assert seen["id"] == result.id and seen["name"] == charge.name
    assert seen["queue"] == "ctx-q" and seen["attempt"] == 1 and seen["retries"] == 0
    assert seen["headers"] == {"trace": "t-1"} and seen["parent"] == "p-1"
    assert seen["worker"] == worker.id and seen["eager"] is False
    assert seen["expires"] is not None and seen["args"] == ("c-1",) and seen["same"]


async def test_current_context_in_plain_async_and_thread_tasks(make_app: AppFactory) -> None:
    app = make_app()

    @app.task
    async def on_loop() -> str | None:
        ctx = current_context()
        return ctx.id if ctx is not None else None

    @app.task
    def on_thread() -> str | None:
        ctx = current_context()
        return ctx.id if ctx is not None else None

    assert current_context() is None
    async with app, running_worker(app):
        first = await on_loop.send()
        assert await first.get(timeout=10) == first.id
        second = await on_thread.send()
        assert await second.get(timeout=10) == second.id
    assert current_context() is None


async def test_update_state_is_readable_until_the_outcome(make_app: AppFactory) -> None:
    app = make_app()
    go_on = asyncio.Event()

    @app.task(bind=True)
    async def long_job(ctx: Context) -> str:
        await ctx.update_state("PROGRESS", {"done": 40})
        await go_on.wait()
        return "done"

    @app.task(bind=True)
    def thread_job(ctx: Context) -> str:
        ctx.update_state_blocking("PROGRESS", {"done": 7})
        return "thread done"

    async with app, running_worker(app):
        result = await long_job.send()

        async def progressing() -> bool:
            return await result.state() == "PROGRESS"

        await wait_until(progressing)
        assert await result.info() == {"done": 40}
        go_on.set()
        assert await result.get(timeout=10) == "done"
        assert await (await thread_job.send()).get(timeout=10) == "thread done"


async def test_update_state_refuses_final_states() -> None:
    ctx = Context(id="x", name="t", queue="q", update=None)
    with pytest.raises(ConfigurationError, match="no result backend"):
        await ctx.update_state("PROGRESS")

    async def write(state: str, meta: Any) -> None:
        raise AssertionError("not reached")

    ctx = Context(id="x", name="t", queue="q", update=write)
    with pytest.raises(ConfigurationError, match="intermediate state"):
        await ctx.update_state(States.SUCCESS)


async def test_bound_process_task_gets_its_context_and_retries(make_app: AppFactory) -> None:
    import process_tasks

    app = make_app()
    app.import_path = "process_tasks:app"
    bound = app.task(executor="process", bind=True, max_retries=2)(process_tasks.bound_retry)
    async with app, running_worker(app, processes=1):
        result = await bound.send(5)
        assert await result.get(timeout=30) == (5, result.id, 2, False)  # as annotated
        assert await result.retries() == 2


def test_bind_needs_a_context_parameter() -> None:
    app = App("bind-check", broker="memory://")
    with pytest.raises(ConfigurationError, match="first parameter must take the Context"):

        @app.task(bind=True)
        async def no_params() -> None: ...


async def test_calling_a_bound_task_directly_gives_an_eager_context() -> None:
    app = App("direct", broker="memory://")

    @app.task(bind=True)
    async def whoami(ctx: Context, x: int) -> tuple[bool, int]:
        return ctx.is_eager, x

    assert await whoami(3) == (True, 3)
    assert await (await whoami.apply(4)).get() == (True, 4)


# -- hooks ------------------------------------------------------------------------------------


class Audited(Task[Any, Any]):
    """Records every hook call; async and sync hooks mixed on purpose."""

    calls: ClassVar[list[tuple[Any, ...]]] = []

    async def on_success(
        self, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.calls.append(("success", retval, task_id, args))

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> None:
        self.calls.append(("failure", type(exc).__name__, task_id, einfo is not None))

    async def on_retry(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> None:
        self.calls.append(("retry", type(exc).__name__, task_id))

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> None:
        self.calls.append(("after", status, task_id))


class Broken(Task[Any, Any]):
    async def on_success(self, *args: Any) -> None:
        raise RuntimeError("hook bug")

    def after_return(self, *args: Any) -> None:
        raise RuntimeError("another hook bug")


async def test_base_class_hooks_see_success_retry_and_failure(make_app: AppFactory) -> None:
    app = make_app()
    Audited.calls = []

    @app.task(base=Audited, retry_for=(Flaky,), max_retries=1, default_retry_delay=0.05)
    async def flaky(x: int) -> int:
        if x < 0:
            raise Flaky("negative")
        return x * 2

    assert isinstance(flaky, Audited)
    async with app, running_worker(app):
        ok = await flaky.send(4)
        assert await ok.get(timeout=10) == 8
        bad = await flaky.send(-1)
        with pytest.raises(Flaky):
            await bad.get(timeout=20)
    assert Audited.calls == [
        ("success", 8, ok.id, (4,)),
        ("after", States.SUCCESS, ok.id),
        ("retry", "Flaky", bad.id),
        ("after", States.RETRY, bad.id),
        ("failure", "Flaky", bad.id, True),
        ("after", States.FAILURE, bad.id),
    ]


async def test_a_hook_that_raises_loses_nothing(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    @app.task(base=Broken)
    async def fine() -> str:
        return "kept"

    async with app, running_worker(app):
        assert await (await fine.send()).get(timeout=10) == "kept"
    assert "hook Broken.on_success raised" in caplog.text
    assert "hook Broken.after_return raised" in caplog.text


class Tracing(Middleware):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    async def before_send(self, message: Message) -> Message:
        return dataclasses.replace(message, headers={**message.headers, "trace": "tr-1"})

    def before_execute(self, ctx: Context) -> None:
        self.events.append(("before", ctx.name, ctx.headers.get("trace")))

    async def after_execute(self, ctx: Context, outcome: Outcome) -> None:
        self.events.append(("after", ctx.id, outcome.state))

    def on_error(self, ctx: Context, exc: BaseException) -> None:
        self.events.append(("error", ctx.id, type(exc).__name__))


class Faulty(Middleware):
    def before_send(self, message: Message) -> Message:
        raise RuntimeError("middleware bug")

    def after_execute(self, ctx: Context, outcome: Outcome) -> None:
        raise RuntimeError("middleware bug")


async def test_middleware_sees_sends_and_runs(make_app: AppFactory) -> None:
    tracing = Tracing()
    app = make_app(middleware=[tracing])

    @app.task
    async def traced(fail: bool) -> str | None:
        ctx = current_context()
        assert ctx is not None
        if fail:
            raise ValueError("boom")
        return ctx.headers.get("trace")

    async with app, running_worker(app):
        ok = await traced.send(False)
        assert await ok.get(timeout=10) == "tr-1"
        [via_batch] = await traced.send_many([(False,)])
        assert await via_batch.get(timeout=10) == "tr-1"
        bad = await app.send_task(traced.name, [True])
        with pytest.raises(ValueError):
            await bad.get(timeout=10)
    name = traced.name
    assert tracing.events == [
        ("before", name, "tr-1"),
        ("after", ok.id, States.SUCCESS),
        ("before", name, "tr-1"),
        ("after", via_batch.id, States.SUCCESS),
        ("before", name, "tr-1"),
        ("error", bad.id, "ValueError"),
        ("after", bad.id, States.FAILURE),
    ]


async def test_faulty_middleware_is_logged_and_loses_nothing(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    app.add_middleware(Faulty())

    @app.task
    async def fine() -> int:
        return 1

    async with app, running_worker(app):
        assert await (await fine.send()).get(timeout=10) == 1
    assert "hook Faulty.before_send raised" in caplog.text
    assert "hook Faulty.after_execute raised" in caplog.text


def test_middleware_and_base_must_be_ours() -> None:
    with pytest.raises(ConfigurationError, match="Middleware instance"):
        App("m", broker="memory://", middleware=[object()])  # type: ignore[list-item]
    app = App("b", broker="memory://")
    with pytest.raises(ConfigurationError, match=r"subclass of aioqueue\.Task"):
        app.task(base=dict)  # type: ignore[call-overload]


def test_mypy_keeps_bound_tasks_exactly_typed(tmp_path: Path) -> None:
    from mypy import api

    snippet = tmp_path / "typed_bound.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from aioqueue import App, AsyncResult, Context, Task

            app = App("typed")

            @app.task(bind=True, max_retries=5)
            async def charge(ctx: Context, customer: str, cents: int) -> str:
                if cents < 0:
                    await ctx.retry(countdown=1)
                return customer

            @app.task(bind=True, executor="thread")
            def blocking(ctx: Context, n: int) -> float:
                return 1.0

            @app.task(bind=True, executor="async")
            async def looped(ctx: Context) -> bytes:
                return b""

            a: Task[[str, int], str] = charge
            b: Task[[int], float] = blocking
            c: Task[[], bytes] = looped

            async def use() -> None:
                good: AsyncResult[str] = await charge.send("c-1", 500)
                await charge.send("c-1", "500")
            """
        )
    )
    out, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out
    assert len(errors) == 1, out
    assert 'Argument 2 to "send" of "Task" has incompatible type "str"' in errors[0], out
