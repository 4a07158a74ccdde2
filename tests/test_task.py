"""Task registration, names, send options, direct calls, apply, and static typing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aioqueue import App, ConfigurationError, InvalidArguments, States, TaskNotRegistered

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
    # the outcome went through the codec, as a remote client would see it
    assert await (await pair.apply(4)).get() == [4, 4]
    failed = await broken.apply()
    assert await failed.state() == States.FAILURE
    with pytest.raises(KeyError):
        await failed.get()
    bad = await app.apply_task(add, (1,), {})
    with pytest.raises(InvalidArguments, match="missing a required argument: 'y'"):
        await bad.get()


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
