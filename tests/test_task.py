"""Task registration, names, send options, direct calls, apply, and static typing."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import running_worker

from aioqueue import App, ConfigurationError, InvalidArguments, States, TaskNotRegistered
from aioqueue.message import MAX_RESULT_TTL

ROOT = Path(__file__).resolve().parent.parent


def test_default_name_is_module_and_qualname() -> None:
    app = App("names")

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    assert add.name == "test_task.test_default_name_is_module_and_qualname.<locals>.add"
    assert app.get_task(add.name) is add
    with pytest.raises(TaskNotRegistered, match="'nope' is not registered in app 'names'"):
        app.get_task("nope")


def test_main_module_gets_its_real_name(tmp_path: Path) -> None:
    script = tmp_path / "jobs.py"
    script.write_text(
        textwrap.dedent(
            """
            from aioqueue import App
            app = App("jobs")
            @app.task
            async def work() -> None: ...
            if __name__ == "__main__":
                print(work.name)
            """
        )
    )
    as_script = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True
    ).stdout.strip()
    as_module = subprocess.run(
        [sys.executable, "-c", "import jobs; print(jobs.work.name)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert as_script == as_module == "jobs.work"


def test_each_app_has_its_own_registry() -> None:
    first, second = App("one"), App("two")

    @first.task(name="shared.name")
    async def a() -> None: ...

    assert "shared.name" in first.tasks and "shared.name" not in second.tasks


def test_conflicting_explicit_names_are_refused() -> None:
    app = App("dupes")

    @app.task(name="same")
    async def a() -> None: ...

    with pytest.raises(ConfigurationError, match="already named 'same'"):

        @app.task(name="same")
        async def b() -> None: ...


def test_async_function_cannot_ask_for_a_thread() -> None:
    app = App("exec")
    with pytest.raises(ConfigurationError, match="coroutine function"):

        @app.task(executor="thread")
        async def wrong() -> None: ...

    with pytest.raises(ConfigurationError, match="executor must be one of"):
        app.task(executor="gpu")(lambda: None)  # type: ignore[call-overload]


def test_plain_function_defaults_to_the_thread_executor() -> None:
    app = App("default-exec")

    @app.task
    def blocking(x: int) -> int:
        return x

    @app.task(queue="q")
    def also_blocking() -> None: ...

    @app.task
    async def nonblocking() -> None: ...

    assert blocking.executor == "thread" and also_blocking.executor == "thread"
    assert nonblocking.executor == "async"


def test_plain_function_cannot_ask_for_the_event_loop() -> None:
    app = App("exec-async")
    with pytest.raises(ConfigurationError, match=r'executor="thread".*executor="process"'):

        @app.task(executor="async")  # type: ignore[arg-type]
        def wrong() -> int:
            return 1


async def test_plain_function_task_runs_on_a_worker_thread() -> None:
    app = App("sync-default")

    @app.task
    def where(x: int) -> list[object]:
        return [x, threading.current_thread() is not threading.main_thread()]

    async with running_worker(app):
        result = await where.send(7)
        assert await result.get(timeout=5) == [7, True]
    assert await (await where.apply(8)).get() == [8, True]


def test_unknown_send_option_is_an_error() -> None:
    app = App("opts")

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ConfigurationError, match="unknown send option"):
        add.options(countdownn=5)
    chained = add.options(queue="a", headers={"h": 1}).options(headers={"k": 2})
    assert chained._options.queue == "a" and chained._options.headers == {"h": 1, "k": 2}


async def test_direct_call_runs_the_function_here() -> None:
    app = App("direct")

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(executor="thread")
    def mul(x: int, y: int) -> int:
        return x * y

    assert await add(2, 3) == 5
    assert mul(2, 3) == 6
    assert add.__doc__ is None and add.__wrapped__ is not None


async def test_apply_uses_the_worker_path() -> None:
    app = App("eager")

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(executor="process")
    def pair(x: int) -> tuple[int, int]:
        return (x, x)

    @app.task
    async def broken() -> None:
        raise KeyError("missing")

    ok = await add.apply(2, 3)
    assert await ok.get() == 5 and await ok.state() == States.SUCCESS
    # the outcome went through the codec, as a remote client would see it, and was rebuilt
    # from the return annotation as a handle that knows the task does
    assert await (await pair.apply(4)).get() == (4, 4)
    failed = await broken.apply()
    assert await failed.state() == States.FAILURE
    with pytest.raises(KeyError):
        await failed.get()
    bad = await app.apply_task(add, (1,), {})
    with pytest.raises(InvalidArguments, match="missing a required argument: 'y'"):
        await bad.get()


def test_mypy_types_sync_and_async_tasks(tmp_path: Path) -> None:
    """A sync fn gives Task[P, R]; an async fn Task[P, R] with R the awaited type; a plain
    function given executor="async" is a type error as well as a runtime one."""
    from mypy import api

    snippet = tmp_path / "typed_exec.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from aioqueue import App, Task

            app = App("typed")

            @app.task
            def plain(x: int) -> str:
                return str(x)

            @app.task(queue="q")
            def plain_opts(x: int) -> str:
                return str(x)

            @app.task
            async def coro(x: int) -> bytes:
                return b""

            @app.task(executor="async", queue="q")
            async def coro_opts(x: int) -> bytes:
                return b""

            @app.task(executor="thread")
            def threaded(x: int) -> float:
                return 1.0

            a: Task[[int], str] = plain
            b: Task[[int], str] = plain_opts
            c: Task[[int], bytes] = coro
            d: Task[[int], bytes] = coro_opts
            e: Task[[int], float] = threaded

            async def use() -> None:
                s: str = await (await plain.send(1)).get()
                y: bytes = await (await coro.send(1)).get()

            @app.task(executor="async")
            def on_the_loop(x: int) -> int:
                return x
            """
        )
    )
    out, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out
    assert len(errors) == 1, out
    line = snippet.read_text().splitlines().index("def on_the_loop(x: int) -> int:")
    assert f"typed_exec.py:{line}: error:" in errors[0], out  # the decorator's line
    assert '"_AsyncTaskDecorator" has incompatible type "Callable[[int], int]"' in errors[0], out


def test_mypy_rejects_wrong_argument_types(tmp_path: Path) -> None:
    from mypy import api

    snippet = tmp_path / "typed_use.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from aioqueue import App, AsyncResult

            app = App("typed")

            @app.task
            async def add(x: int, y: int) -> int:
                return x + y

            @app.task(executor="thread")
            def shout(word: str) -> str:
                return word

            async def use() -> None:
                good: AsyncResult[int] = await add.send(2, 3)
                value: int = await good.get()
                await shout.send("fine")
                await add.send("x", 3)
                await add.options(queue="q").send(1, y="no")
            """
        )
    )
    out, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out
    assert len(errors) == 2, out
    assert 'Argument 1 to "send" of "Task" has incompatible type "str"' in errors[0]
    assert '"send" of "TaskOptions" has incompatible type "str"' in errors[1]


BAD_TTLS = ["60", 0, -1, math.nan, math.inf, 1e300, True, [60]]


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
def test_bad_result_ttl_is_refused_before_sending(ttl: object) -> None:
    app = App("ttl")

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    shown = re.escape(repr(ttl))
    with pytest.raises(ConfigurationError, match=rf"result_ttl.*{shown}"):
        add.options(result_ttl=ttl)
    with pytest.raises(ConfigurationError, match=rf"result_ttl.*{shown}"):
        add.s(1, 2).set(result_ttl=ttl)
    with pytest.raises(ConfigurationError, match=rf"result_ttl.*{shown}"):
        app.task(result_ttl=ttl)(add.fn)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match=rf"result_ttl.*{shown}"):
        App("ttl", result_ttl=ttl)
    with pytest.raises(ConfigurationError, match=rf"result_ttl.*{shown}"):
        App("ttl").config_from_object({"result_ttl": ttl})


async def test_bad_send_options_fail_before_any_io() -> None:
    app = App("opts-io", broker="redis://127.0.0.1:1/0")  # nothing listens: I/O would fail

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    for options in (
        {"result_ttl": -1},
        {"task_id": 5},
        {"task_id": ""},
        {"queue": ["q"]},
        {"headers": "h"},
        {"parent_id": 1},
        {"root_id": b"r"},
    ):
        with pytest.raises(ConfigurationError, match=next(iter(options))):
            await add.options(**options).send(1, 2)
        with pytest.raises(ConfigurationError, match=next(iter(options))):
            await app.send_task(add.name, [1, 2], **options)


def test_good_result_ttls_are_kept() -> None:
    app = App("ttl-ok", result_ttl=60)

    @app.task(result_ttl=0.5)
    async def add(x: int, y: int) -> int:
        return x + y

    assert add.result_ttl == 0.5 and app.conf.result_ttl == 60
    assert add.options(result_ttl=MAX_RESULT_TTL)._options.result_ttl == MAX_RESULT_TTL
    assert add.options(result_ttl=3)._options.result_ttl == 3.0
