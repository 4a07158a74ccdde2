"""The pytest plugin, used as a user would: an app module and a test file run by pytester."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

APP = """
from aioqueue import App

app = App("proj", broker="redis://127.0.0.1:1/0")  # never reached: tests run on memory://
calls = {"flaky": 0}


@app.task(name="proj.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(
    name="proj.flaky",
    retry_for=(ConnectionError,),
    retry_backoff=10,
    retry_jitter=False,
    max_retries=3,
)
async def flaky() -> str:
    calls["flaky"] += 1
    if calls["flaky"] < 3:
        raise ConnectionError("down")
    return "up"


@app.task(name="proj.unencodable")
async def unencodable() -> object:
    return object()


@app.task(name="proj.fan_out")
async def fan_out(n: int) -> int:
    for i in range(n):
        await add.send(i, i)
    return n
"""

TESTS = """
import time

import pytest

from aioqueue import InvalidArguments, SerializationError, States, TaskNotRegistered
from proj import add, app, calls, fan_out, flaky, unencodable


@pytest.fixture(autouse=True)
def fresh_calls():
    calls["flaky"] = 0


def test_sync_code_sends_and_drains(aioqueue_worker):
    result = add.send_sync(4, 4)
    assert aioqueue_worker.drain_sync() == 1
    assert result.get(timeout=0) == 8


async def test_send_and_drain(aioqueue_worker, aioqueue_sent):
    result = await add.send(2, 3)
    aioqueue_sent.assert_sent("proj.add", args=(2, 3), times=1)
    assert await result.state() == States.PENDING
    assert await aioqueue_worker.drain() == 1
    assert await result.get(timeout=0) == 5


async def test_countdown_waits_for_the_clock(aioqueue_worker, aioqueue_clock):
    result = await add.options(countdown=60).send(1, 1)
    assert await aioqueue_worker.run_due() == 0
    assert aioqueue_worker.delayed == 1
    aioqueue_clock.advance(59)
    assert await aioqueue_worker.run_due() == 0
    aioqueue_clock.advance(1)
    assert await aioqueue_worker.run_due() == 1
    assert await result.get(timeout=0) == 2


async def test_drain_moves_the_clock_until_nothing_is_delayed(aioqueue_worker, aioqueue_clock):
    start = aioqueue_clock.time()
    late = await add.options(countdown=7200).send(1, 1)
    assert await aioqueue_worker.drain() == 1
    assert aioqueue_clock.time() == start + 7200
    assert aioqueue_worker.delayed == 0
    assert await late.get(timeout=0) == 2


async def test_replayed_time_runs_each_retry_at_its_own_moment(aioqueue_worker, aioqueue_clock):
    # backoff 10 s then 20 s: after advance(3600) both retries ran within the hour, not once
    # at its end (each retry is planned from the time its attempt ran)
    result = await flaky.send()
    aioqueue_clock.advance(3600)
    await aioqueue_worker.run_due()
    assert await result.get(timeout=0) == "up"


async def test_a_send_after_advance_waits_for_its_own_time(aioqueue_worker, aioqueue_clock):
    aioqueue_clock.advance(100)
    result = await add.options(countdown=5).send(1, 2)
    assert await aioqueue_worker.run_due() == 0
    aioqueue_clock.advance(5)
    assert await aioqueue_worker.run_due() == 1
    assert await result.get(timeout=0) == 3


async def test_retries_with_backoff_in_virtual_time(aioqueue_worker, aioqueue_clock, aioqueue_sent):
    started = time.perf_counter()
    result = await flaky.send()
    await aioqueue_worker.run_due()
    assert await result.state() == States.RETRY
    aioqueue_clock.advance(10)
    await aioqueue_worker.run_due()
    assert await result.state() == States.RETRY
    await aioqueue_worker.drain()
    assert await result.get(timeout=0) == "up"
    assert await result.retries() == 2
    assert len(aioqueue_sent("proj.flaky", retries=True)) == 3
    assert len(aioqueue_sent("proj.flaky")) == 1
    assert time.perf_counter() - started < 1.0


async def test_expiry(aioqueue_worker, aioqueue_clock):
    result = await add.options(countdown=100, expires=50).send(1, 1)
    aioqueue_clock.advance(200)
    await aioqueue_worker.run_due()
    assert await result.state() == States.REVOKED


async def test_tasks_sent_by_tasks_run_in_the_same_drain(aioqueue_worker, aioqueue_sent):
    await fan_out.send(3)
    assert await aioqueue_worker.drain() == 4
    aioqueue_sent.assert_sent(add, times=3)
    aioqueue_sent.assert_sent("proj.add", args=(2, 2))


async def test_failures_as_on_a_real_worker(aioqueue_worker):
    unknown = await app.send_task("proj.nope", (1,))
    bad_args = await app.send_task("proj.add", (1, 2, 3))
    bad_result = await unencodable.send()
    await aioqueue_worker.drain()
    with pytest.raises(TaskNotRegistered):
        await unknown.get(timeout=0)
    with pytest.raises(InvalidArguments):
        await bad_args.get(timeout=0)
    with pytest.raises(SerializationError):
        await bad_result.get(timeout=0)
    assert len(aioqueue_worker.dead_letters()) == 3  # kept with their reasons, as a worker does


async def test_revoke(aioqueue_worker, aioqueue_clock):
    result = await add.options(countdown=10).send(1, 1)
    assert await result.revoke()
    assert await aioqueue_worker.drain() == 1
    assert await result.state() == States.REVOKED


def test_assert_sent_says_what_was_sent(aioqueue_sent):
    with pytest.raises(AssertionError, match="none"):
        aioqueue_sent.assert_sent("proj.add")


async def test_the_app_is_on_memory_in_every_test():
    assert app.broker.url == "memory://"
"""


def _ini(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        textwrap.dedent(
            """
            [pytest]
            asyncio_mode = auto
            asyncio_default_fixture_loop_scope = function
            """
        )
    )


def _project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(proj=APP, test_proj=TESTS)
    _ini(pytester)


def test_plugin_runs_the_app_on_memory_with_a_virtual_clock(pytester: pytest.Pytester) -> None:
    _project(pytester)
    result = pytester.runpytest_subprocess(
        "-p", "aioqueue.testing", "--aioqueue-app", "proj:app", "-p", "no:randomly"
    )
    result.assert_outcomes(passed=13)


def test_app_from_the_ini_option(pytester: pytest.Pytester) -> None:
    _project(pytester)
    pytester.makeini(
        textwrap.dedent(
            """
            [pytest]
            asyncio_mode = auto
            asyncio_default_fixture_loop_scope = function
            aioqueue_app = proj:app
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-k", "send_and_drain")
    result.assert_outcomes(passed=1)


def test_fixtures_without_an_app_say_how_to_name_one(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(aioqueue_worker):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.stdout.fnmatch_lines(["*--aioqueue-app module:app*"])
    assert result.ret != 0


SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugin"


def test_the_sample_test_file_runs_in_under_a_second(pytester: pytest.Pytester) -> None:
    """examples/plugin/test_shop.py: a countdown, retries with backoff, expiry and an hour of a
    periodic entry, all in virtual time."""
    for name in ("shop", "test_shop"):
        pytester.makepyfile(**{name: (SAMPLE / f"{name}.py").read_text()})
    _ini(pytester)
    result = pytester.runpytest_subprocess(
        "-p",
        "aioqueue.testing",
        "--aioqueue-app",
        "shop:app",
        "-p",
        "no:randomly",
        "--durations=0",
        "--durations-min=0",
    )
    result.assert_outcomes(passed=5)
    spent = [
        float(m.group(1))
        for m in re.finditer(r"^([0-9.]+)s (?:setup|call|teardown) ", result.stdout.str(), re.M)
    ]
    assert spent and sum(spent) < 1.0, result.stdout.str()
