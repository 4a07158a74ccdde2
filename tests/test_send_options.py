"""Send options for time (issue 8, items 1 and 2): countdown, eta, expires, and the REVOKED state.

Timing tests run over every transport (conftest.TRANSPORTS). They assert that a task never ran
before it was due; the upper bound is generous because the test machine is small and shared.
Bad values are refused by an app whose broker is a closed port: a ConfigurationError (rather
than a connection error) shows the check came before any I/O.
"""

from __future__ import annotations

import math
import socket
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import (
    AioQueueError,
    App,
    BrokerConnectionError,
    ConfigurationError,
    Message,
    States,
    TaskExpired,
    TaskRevoked,
)
from aioqueue.task import SendOptions, send_times

pytestmark = pytest.mark.timeout(40)

LATE = 5.0
"""How late a delayed task may run on this loaded 2-core machine before the test fails."""


def _stamps(app: App) -> tuple[Any, dict[str, float]]:
    ran_at: dict[str, float] = {}

    @app.task
    async def stamp(name: str) -> str:
        ran_at[name] = time.time()
        return name

    return stamp, ran_at


async def test_countdown_and_eta_delay_a_task(make_app: AppFactory) -> None:
    app = make_app()
    stamp, ran_at = _stamps(app)
    plus_five = timezone(timedelta(hours=5))  # any zone: the eta is an instant
    async with app, running_worker(app):
        before = time.time()
        by_countdown = await stamp.options(countdown=1.0).send("countdown")
        eta = datetime.now(plus_five) + timedelta(seconds=1.2)
        by_eta = await stamp.options(eta=eta).send("eta")
        at_once = await stamp.send("now")
        assert await at_once.get(timeout=10) == "now"
        assert await by_countdown.get(timeout=15) == "countdown"
        assert await by_eta.get(timeout=15) == "eta"
    assert ran_at["now"] < before + 1.0
    assert before + 1.0 <= ran_at["countdown"] < before + 1.0 + LATE
    assert eta.timestamp() <= ran_at["eta"] < eta.timestamp() + LATE


async def test_expired_task_is_revoked_and_never_runs(make_app: AppFactory) -> None:
    app = make_app()
    ran: list[str] = []

    @app.task
    async def job(name: str) -> str:
        ran.append(name)
        return name

    past = datetime.now(UTC) - timedelta(seconds=5)
    async with app, running_worker(app):
        expired = await job.options(expires=past).send("past")
        # relative expiry shorter than the delay: it would expire before it is due
        too_late = await job.options(countdown=1.0, expires=0.2).send("before-eta")
        in_time = await job.options(expires=60.0).send("in-time")
        for result in (expired, too_late):
            with pytest.raises(TaskRevoked, match="expired") as caught:
                await result.get(timeout=15)
            assert caught.value.reason == "expired"
            assert await result.state() == States.REVOKED
            assert await result.ready() and await result.revoked()
            assert not await result.failed()
            assert await app.AsyncResult(result.id).state() == States.REVOKED
            assert isinstance(await result.get(timeout=5, propagate=False), TaskRevoked)
        assert await in_time.get(timeout=10) == "in-time"
        assert await (await app.ready_broker()).dead_letters("default") == []
    assert ran == ["in-time"]


async def test_send_many_with_per_signature_and_batch_countdowns(make_app: AppFactory) -> None:
    app = make_app()
    stamp, ran_at = _stamps(app)
    async with app, running_worker(app):
        before = time.time()
        results = await stamp.send_many(
            [
                stamp.s("sig-1.0").set(countdown=1.0),
                ("plain",),
                stamp.options(countdown=0.6).s("opt-0.6"),
                stamp.s("expired").set(expires=datetime.now(UTC) - timedelta(1)),
            ]
        )
        batch = await stamp.options(countdown=0.8).send_many([("batch-a",), ("batch-b",)])
        for result in results[:3] + batch:
            await result.get(timeout=15)
        with pytest.raises(TaskRevoked):
            await results[3].get(timeout=10)
    assert ran_at["plain"] < before + 0.6
    for name, delay in [("sig-1.0", 1.0), ("opt-0.6", 0.6), ("batch-a", 0.8), ("batch-b", 0.8)]:
        assert before + delay <= ran_at[name] < before + delay + LATE, name
    assert "expired" not in ran_at


async def test_send_task_takes_the_time_options(make_app: AppFactory) -> None:
    app = make_app()
    stamp, ran_at = _stamps(app)
    async with app, running_worker(app):
        before = time.time()
        delayed = await app.send_task(stamp.name, ["by-name"], countdown=1.0, expires=60)
        eta = datetime.now(UTC) + timedelta(seconds=0.7)
        at_eta = await app.send_task(stamp.name, ["by-eta"], eta=eta)
        expired = await app.send_task(
            stamp.name, ["expired"], expires=datetime.now(UTC) - timedelta(seconds=1)
        )
        assert await delayed.get(timeout=15) == "by-name"
        assert await at_eta.get(timeout=15) == "by-eta"
        with pytest.raises(TaskRevoked, match="expired"):
            await expired.get(timeout=10)
    assert before + 1.0 <= ran_at["by-name"] < before + 1.0 + LATE
    assert eta.timestamp() <= ran_at["by-eta"] < eta.timestamp() + LATE
    assert "expired" not in ran_at


# -- what goes into the envelope -----------------------------------------------------------


async def test_countdown_counts_from_the_send_not_from_options() -> None:
    app = App("envelope", broker="memory://")
    sent: list[Message] = []

    @app.task
    async def job() -> None: ...

    async def capture(queue: str, body: bytes, *, eta: float | None = None) -> None:
        message = app.codec.decode(body)
        assert eta == message.eta  # the broker is told the same due time as the envelope
        sent.append(message)

    delayed = job.options(countdown=30, expires=90)
    async with app:
        app.broker.publish = capture  # type: ignore[method-assign]
        await delayed.send()
        await delayed.send()
        await job.send()
    first, second, plain = sent
    for message in (first, second):
        assert message.eta == message.sent_at + 30
        assert message.expires == message.sent_at + 90
    assert second.sent_at > first.sent_at  # each send counts from its own time
    assert plain.eta is None and plain.expires is None


def test_send_times_converts_datetimes_to_unix_times() -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-7)))
    assert send_times(SendOptions(eta=at, expires=at), 0.0) == (at.timestamp(), at.timestamp())
    assert send_times(SendOptions(countdown=2.5, expires=10), 100.0) == (102.5, 110.0)
    ancient = datetime(1900, 1, 1, tzinfo=UTC)
    assert send_times(SendOptions(eta=ancient), 5.0) == (0.0, None)  # past: due at once


# -- bad values, before any I/O ------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NAIVE = datetime(2030, 1, 1, 12, 0)
BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"countdown": -1}, "-1"),
    ({"countdown": math.nan}, "nan"),
    ({"countdown": math.inf}, "inf"),
    ({"countdown": True}, "True"),
    ({"countdown": "5"}, "'5'"),
    ({"countdown": 1e12}, "1000000000000.0"),
    ({"eta": NAIVE}, "datetime.datetime(2030, 1, 1, 12, 0)"),
    ({"eta": 1_900_000_000.0}, "1900000000.0"),
    ({"eta": "2030-01-01T00:00:00Z"}, "'2030-01-01T00:00:00Z'"),
    ({"expires": 0}, "0"),
    ({"expires": -5.0}, "-5.0"),
    ({"expires": math.nan}, "nan"),
    ({"expires": "soon"}, "'soon'"),
    ({"expires": NAIVE}, "datetime.datetime(2030, 1, 1, 12, 0)"),
    ({"expires": timedelta(seconds=5)}, "datetime.timedelta(seconds=5)"),
    ({"countdown": 5, "eta": datetime(2030, 1, 1, tzinfo=UTC)}, "countdown (5.0)"),
]


@pytest.fixture(params=["redis", "amqp"])
def unreachable_app(request: pytest.FixtureRequest) -> App:
    port = _closed_port()
    if request.param == "redis":
        return App("closed", broker=f"redis://127.0.0.1:{port}/0")
    return App("closed", broker=f"amqp://guest:guest@127.0.0.1:{port}/", backend="rpc://")


@pytest.mark.parametrize(("options", "named"), BAD_OPTIONS)
async def test_bad_time_options_raise_before_any_io(
    unreachable_app: App, options: dict[str, Any], named: str
) -> None:
    app = unreachable_app

    @app.task
    async def job(x: int) -> int:
        return x

    ways = {
        "options": lambda: job.options(**options),
        "chained options": lambda: job.options(queue="q").options(**options),
        "Signature.set": lambda: job.s(1).set(**options),
        "batch options": lambda: job.options(**options).send_many([(1,), (2,)]),
        "signature in a batch": lambda: job.options(**options).s(1),
    }
    for way, call in ways.items():
        with pytest.raises(ConfigurationError) as caught:
            call()
        assert named in str(caught.value), (way, str(caught.value))
    with pytest.raises(ConfigurationError) as caught:
        await app.send_task(job.name, [1], **options)
    assert named in str(caught.value)
    with pytest.raises(ConfigurationError):
        await job.options(**options).apply(1)


async def test_countdown_then_eta_in_two_steps_is_refused(unreachable_app: App) -> None:
    app = unreachable_app

    @app.task
    async def job() -> None: ...

    aware = datetime.now(UTC) + timedelta(minutes=1)
    with pytest.raises(ConfigurationError, match="countdown"):
        job.options(countdown=5).options(eta=aware)
    with pytest.raises(ConfigurationError, match="countdown"):
        job.s().set(eta=aware).set(countdown=5)
    cleared = job.options(countdown=5).options(countdown=None, eta=aware)  # replacing is fine
    assert cleared._options.eta == aware
    # the control: good options do reach the network, and this broker is not there
    with pytest.raises(BrokerConnectionError):
        await cleared.send()


# -- apply (eager) --------------------------------------------------------------------------


async def test_apply_runs_at_once_but_honours_expires() -> None:
    app = App("eager", broker="memory://")
    ran: list[str] = []

    @app.task
    async def job(name: str) -> str:
        ran.append(name)
        return name

    started = time.monotonic()
    eager = await job.options(countdown=60, expires=120).apply("delayed")
    assert await eager.get() == "delayed"
    assert time.monotonic() - started < 30  # the countdown was not waited for
    past = datetime.now(UTC) - timedelta(seconds=1)
    revoked = await job.options(expires=past).apply("expired")
    assert await revoked.state() == States.REVOKED
    with pytest.raises(TaskRevoked, match="expired"):
        await revoked.get()
    assert ran == ["delayed"]


def test_task_revoked_is_in_the_tree_and_task_expired_is_its_old_name() -> None:
    assert issubclass(TaskRevoked, AioQueueError)
    assert TaskExpired is TaskRevoked
    assert States.REVOKED in States.READY


async def test_a_revoked_outcome_survives_the_codec() -> None:
    from aioqueue import Outcome

    app = App("codec", broker="memory://")
    outcome = app.codec.decode_outcome(app.codec.encode_outcome(Outcome.revoked("t-1", "expired")))
    assert outcome.state == States.REVOKED and outcome.ready
    assert outcome.exc_type == "aioqueue.errors.TaskRevoked"


async def test_an_expired_message_stays_revoked_for_a_waiter_that_comes_later() -> None:
    app = App("late-reader", broker="memory://")

    @app.task
    async def job() -> None: ...

    async with app, running_worker(app) as worker:
        result = await job.options(expires=datetime.now(UTC) - timedelta(1)).send()

        async def done() -> bool:
            return worker.processed == 1

        await wait_until(done)
        handle = app.AsyncResult(result.id)
        assert await handle.state() == States.REVOKED
        with pytest.raises(TaskRevoked):
            await handle.get(timeout=5)


async def test_a_task_due_within_the_hold_never_starts_before_its_eta_by_the_wall_clock() -> None:
    """A message due within ETA_HOLD is waited out in its slot on the loop's monotonic clock;
    etas are wall-clock times. A wall clock running behind the monotonic one (slewed by NTP,
    here 10% slow) used to start the task before its eta; the wait looks at the clock again."""
    from aioqueue.message import Message

    app = App("eta-hold", broker="memory://")
    m0, base = time.monotonic(), time.time()
    app.clock = lambda: base + (time.monotonic() - m0) * 0.9
    started: list[float] = []

    @app.task
    async def mark() -> None:
        started.append(app.clock())

    async with app, running_worker(app):
        eta = app.clock() + 0.2
        queue = app.conf.default_queue
        message = Message(id="hold-1", task=mark.name, queue=queue, eta=eta)
        await app.broker.publish(queue, app.codec.encode(message))  # straight to the queue

        async def ran() -> bool:
            return bool(started)

        await wait_until(ran, timeout=10)
    assert started[0] >= eta, f"started {eta - started[0]:.4f}s before its eta"
