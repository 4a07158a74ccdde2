"""Routes and priorities: the same behaviour on every transport (contract), plus validation."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson
import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import App, ConfigurationError, ProtocolError
from aioqueue.message import Message, MessageCodec, priority_of

pytestmark = pytest.mark.timeout(40)
PRIORITIES = {"amqp_priorities": True}  # RabbitMQ: opt in (memory and Redis need nothing)


async def lengths(app: App, *queues: str) -> dict[str, int]:
    return {queue: await app.broker.queue_length(queue) for queue in queues}


async def wait_lengths(app: App, expected: dict[str, int]) -> None:
    async def ok() -> bool:
        return await lengths(app, *expected) == expected

    await wait_until(ok, timeout=10)


def recorder(app: App) -> tuple[list[str], Any]:
    ran: list[str] = []

    @app.task(name="record")
    async def record(tag: str) -> str:
        ran.append(tag)
        return tag

    return ran, record


# -- routes (contract) ----------------------------------------------------------------------


async def test_routes_exact_glob_callable_and_list(make_app: AppFactory) -> None:
    def by_argument(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return "vip" if kwargs.get("customer") == "big" else None

    app = make_app(
        task_routes=[
            by_argument,
            {"billing.charge": "charges", "billing.*": {"queue": "billing"}},
        ]
    )

    @app.task(name="billing.charge")
    async def charge(customer: str) -> None: ...

    @app.task(name="billing.refund")
    async def refund(customer: str) -> None: ...

    @app.task(name="mail.send")
    async def mail() -> None: ...

    async with app:
        await charge.send(customer="small")  # exact beats the glob
        await refund.send(customer="small")  # glob
        await refund.send(customer="big")  # the callable comes first in the list
        await mail.send()  # no route: the default queue
        await wait_lengths(app, {"charges": 1, "billing": 1, "vip": 1, "default": 1})


async def test_route_precedence(make_app: AppFactory) -> None:
    """send options > route > @app.task(queue=) > default_queue."""
    app = make_app(task_routes={"routed": "from-route"})

    @app.task(name="routed", queue="from-task")
    async def routed() -> None: ...

    @app.task(name="unrouted", queue="from-task")
    async def unrouted() -> None: ...

    async with app:
        await routed.send()
        await routed.options(queue="from-options").send()
        await unrouted.send()
        await wait_lengths(app, {"from-route": 1, "from-options": 1, "from-task": 1})


async def test_routes_apply_to_send_many_and_send_task(make_app: AppFactory) -> None:
    app = make_app(task_routes={"jobs.*": "jobs", "other": "others"})

    @app.task(name="jobs.one")
    async def one(x: int) -> None: ...

    @app.task(name="other")
    async def other(x: int) -> None: ...

    async with app:
        await one.send_many([(1,), (2,), other.s(3)])
        await app.send_task("jobs.not-registered-here", (4,))
        await wait_lengths(app, {"jobs": 3, "others": 1})


async def test_a_route_set_on_the_config_later_is_used(make_app: AppFactory) -> None:
    app = make_app()

    @app.task(name="late")
    async def late() -> None: ...

    app.conf.task_routes = {"late": "later"}
    async with app:
        await late.send()
        await wait_lengths(app, {"later": 1, "default": 0})


# -- priorities (contract) ------------------------------------------------------------------


async def test_high_priority_sent_last_runs_first(make_app: AppFactory) -> None:
    app = make_app(**PRIORITIES)
    ran, record = recorder(app)
    async with app:
        for index in range(5):
            await record.send(f"low{index}")
        await record.options(priority=9).send("high")
        await record.options(priority=5).send("mid")
        await wait_lengths(app, {"default": 7})
        async with running_worker(app, concurrency=1):
            await wait_until(lambda: _done(ran, 7))
    assert ran == ["high", "mid", "low0", "low1", "low2", "low3", "low4"]


async def _done(ran: list[str], count: int) -> bool:
    return len(ran) >= count


async def test_lowest_level_gets_one_take_in_ten(make_app: AppFactory, transport: str) -> None:
    """Redis and memory: every 10th take goes to the lowest waiting level (no starvation).
    RabbitMQ has strict priority: there every high message goes first."""
    app = make_app(**PRIORITIES)
    ran, record = recorder(app)
    async with app:
        await record.send_many([record.s(f"low{i}") for i in range(12)])
        await record.options(priority=9).send_many([(f"high{i}",) for i in range(25)])
        await wait_lengths(app, {"default": 37})
        async with running_worker(app, concurrency=1):
            await wait_until(lambda: _done(ran, 37))
    kinds = "".join(tag[0] for tag in ran)
    if transport.startswith("amqp"):
        assert kinds == "h" * 25 + "l" * 12
    else:
        # takes 10 and 20 are the lowest level's turn; the rest of the highs go first
        assert kinds == "h" * 9 + "l" + "h" * 9 + "l" + "h" * 7 + "l" * 10
    lows = [tag for tag in ran if tag[0] == "l"]
    if not transport.startswith("amqp"):  # AMQP's send_many publishes concurrently
        assert lows == [f"low{i}" for i in range(12)]  # FIFO within a level


async def test_task_priority_and_route_priority(make_app: AppFactory) -> None:
    """Priority: send option > route > @app.task(priority=)."""
    app = make_app(task_routes={"routed": {"priority": 8}}, **PRIORITIES)
    ran: list[str] = []

    @app.task(name="plain")
    async def plain(tag: str) -> None:
        ran.append(tag)

    @app.task(name="urgent", priority=6)
    async def urgent(tag: str) -> None:
        ran.append(tag)

    @app.task(name="routed", priority=1)
    async def routed(tag: str) -> None:
        ran.append(tag)

    async with app:
        await plain.send("plain")
        await urgent.send("task-6")
        await routed.send("route-8")
        await routed.options(priority=9).send("option-9")
        await urgent.options(priority=0).send("option-0")
        await wait_lengths(app, {"default": 5})
        async with running_worker(app, concurrency=1):
            await wait_until(lambda: _done(ran, 5))
    assert ran == ["option-9", "route-8", "task-6", "plain", "option-0"]


async def test_idle_worker_takes_a_prioritised_message_at_once(make_app: AppFactory) -> None:
    """Redis: the worker waits in BLMOVE on the plain list; the notice must wake it (its
    fetch wait is 5 s, so a missed notice fails the 2.5 s bound)."""
    app = make_app(**PRIORITIES)
    _, record = recorder(app)
    async with app, running_worker(app, concurrency=1):
        first = await record.send("warm-up")
        assert await first.get(timeout=10) == "warm-up"
        await asyncio.sleep(0.3)  # let the worker settle into its blocking wait
        started = time.monotonic()
        result = await record.options(priority=7).send("urgent")
        assert await result.get(timeout=2.5) == "urgent"
        assert time.monotonic() - started < 2.5


async def test_delayed_prioritised_message_goes_ahead_when_due(
    make_app: AppFactory, transport: str
) -> None:
    app = make_app(**PRIORITIES)
    ran: list[str] = []
    gate = asyncio.Event()

    @app.task(name="gate")
    async def hold() -> None:
        await gate.wait()
        ran.append("gate")

    @app.task(name="record")
    async def record(tag: str) -> None:
        ran.append(tag)

    async with app:
        await hold.send()
        async with running_worker(app, concurrency=1):
            await wait_lengths(app, {"default": 0})  # the gate runs, holding the only slot
            for index in range(4):
                await record.send(f"low{index}")
            await record.options(priority=9, countdown=0.2).send("delayed-high")
            due = time.time() + 0.25

            async def moved() -> bool:
                # Redis and RabbitMQ move a due message into the queue on their own (RabbitMQ
                # may do it a little early: it is due only after its eta); the memory broker
                # moves it at the next take
                if time.time() < due:
                    return False
                return transport == "memory" or await app.broker.queue_length("default") == 5

            await wait_until(moved)
            gate.set()
            await wait_until(lambda: _done(ran, 6))
    assert ran[:3] == ["gate", "delayed-high", "low0"]


# -- several queues: the first is preferred -------------------------------------------------


async def test_first_queue_is_preferred(make_app: AppFactory, transport: str) -> None:
    app = make_app()
    ran, record = recorder(app)
    async with app:
        for index in range(3):
            await record.options(queue="b").send(f"b{index}")
        for index in range(3):
            await record.options(queue="a").send(f"a{index}")
        await wait_lengths(app, {"a": 3, "b": 3})
        if transport.startswith("amqp"):
            await _amqp_buffer_order(app)
            return
        async with running_worker(app, concurrency=1, queues=["a", "b"]):
            await wait_until(lambda: _done(ran, 6))
    assert ran == ["a0", "a1", "a2", "b0", "b1", "b2"]


async def _amqp_buffer_order(app: App) -> None:
    """RabbitMQ pushes from both queues; the consumer hands out queue a's deliveries first."""
    consumer: Any = app.broker.consumer(["a", "b"], worker_id="order-test", prefetch=10)
    await consumer.start()
    try:

        async def all_buffered() -> bool:
            return len(consumer._buffer) == 6

        await consumer._ensure_prefetch(10)
        await wait_until(all_buffered)
        first = await consumer.fetch(3, 0)
        assert [d.queue for d in first] == ["a", "a", "a"]
        rest = await consumer.fetch(3, 0)
        assert [d.queue for d in rest] == ["b", "b", "b"]
        for delivery in first + rest:
            await delivery.ack()
    finally:
        await consumer.close()


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [42, -1, 10, 1.5, True, "5"])
def test_bad_priority_option_is_refused_naming_it(bad: Any) -> None:
    app = App("v")

    @app.task
    async def job() -> None: ...

    with pytest.raises(ConfigurationError, match="priority.*" + re.escape(repr(bad))):
        job.options(priority=bad)


def test_bad_task_priority_is_refused() -> None:
    app = App("v")
    with pytest.raises(ConfigurationError, match=r"priority of 'job'.*11"):

        @app.task(name="job", priority=11)
        async def job() -> None: ...


@pytest.mark.parametrize(
    ("routes", "named"),
    [
        ({"x": 5}, "5"),
        ({"x": ""}, "''"),
        ({"x": {"queue": "q", "exchange": "e"}}, "exchange"),
        ({"x": {"priority": 11}}, "11"),
        ({"x": {"priority": True}}, "True"),
        ({"x": {"queue": 3}}, "3"),
        ({5: "q"}, "5"),
        ("billing", "'billing'"),
        ([{"x": "q"}, 7], "7"),
    ],
)
def test_bad_routes_are_refused_when_set(routes: Any, named: str) -> None:
    with pytest.raises(ConfigurationError, match=named.replace("(", r"\(")):
        App("v", task_routes=routes)
    app = App("v")
    with pytest.raises(ConfigurationError, match=named.replace("(", r"\(")):
        app.config_from_object({"task_routes": routes})
    assert app.conf.task_routes is None  # all or nothing


async def test_bad_callable_answer_is_refused_before_publishing() -> None:
    app = App("v", task_routes=lambda name, args, kwargs: {"queue": "q", "priority": 99})

    @app.task
    async def job() -> None: ...

    with pytest.raises(ConfigurationError, match="99"):
        await job.send()
    assert await app.broker.queue_length("q") == 0


async def test_static_routes_are_resolved_once_per_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from aioqueue import routing

    calls: list[str] = []
    match = routing._MapRoute.match

    def counting(self: Any, name: str) -> Any:
        calls.append(name)
        return match(self, name)

    monkeypatch.setattr(routing._MapRoute, "match", counting)
    app = App("v", task_routes={"a.*": "qa"})

    @app.task(name="a.job")
    async def job() -> None: ...

    async with app:
        for _ in range(5):
            await job.send()
        assert await app.broker.queue_length("qa") == 5
    assert calls == ["a.job"]


def test_routes_from_the_environment_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOQUEUE_TASK_ROUTES", '{"x.*": {"queue": "xs", "priority": 3}}')
    app = App("v")
    assert app.conf.task_routes == {"x.*": {"queue": "xs", "priority": 3}}
    monkeypatch.setenv("AIOQUEUE_TASK_ROUTES", "{not json")
    with pytest.raises(ConfigurationError, match="task_routes"):
        App("v")


async def test_amqp_refuses_priorities_it_would_ignore(amqp_url: str, key_prefix: str) -> None:
    quorum = {"amqp_queue_type": "quorum", "amqp_priorities": True}
    for settings in ({}, {"amqp_priorities": False}, quorum):
        app = App("v", broker=amqp_url, backend="rpc://", key_prefix=key_prefix, **settings)

        @app.task(name="job")
        async def job() -> None: ...

        try:
            with pytest.raises(ConfigurationError, match="priority 4"):
                await job.options(priority=4).send()
        finally:
            await app.close()


async def test_amqp_existing_queue_without_priorities_is_a_clear_error(
    amqp_url: str, key_prefix: str
) -> None:
    old = App(
        "old",
        broker=amqp_url,
        backend="rpc://",
        key_prefix=key_prefix,
        amqp_delete_queues_on_close=True,
    )

    @old.task(name="job")
    async def job() -> None: ...

    new = App("new", broker=amqp_url, backend="rpc://", key_prefix=key_prefix, amqp_priorities=True)
    new.task(name="job")(job.fn)
    try:
        await job.send()  # declares the queue without x-max-priority
        with pytest.raises(ConfigurationError, match=r"x-max-priority.*delete") as caught:
            await new.get_task("job").send()
        assert "amqp_priorities=False" in str(caught.value)
    finally:
        await new.close()
        await old.close()


# -- the envelope field -------------------------------------------------------------------------


def test_priority_is_the_envelopes_first_key_and_round_trips() -> None:
    codec = MessageCodec()
    body = codec.encode(Message(id="i", task="t", queue="q", priority=3))
    assert body.startswith(b'{"priority":3,"v":1,')
    assert codec.decode(body).priority == 3
    plain = codec.encode(Message(id="i", task="t", queue="q"))
    assert b"priority" not in plain and codec.decode(plain).priority is None
    assert priority_of(body) == 3 and priority_of(plain) == 0
    assert priority_of(b'{"attempt":12,' + body[1:]) == 3
    assert priority_of(b'{"attempt":2,' + plain[1:]) == 0
    assert priority_of(b'{"priority":') == 0  # cut short: no priority rather than an error


@pytest.mark.parametrize("bad", [10, -1, "5", True, 1.0, [1]])
def test_bad_priority_field_is_a_protocol_error(bad: Any) -> None:
    body = orjson.dumps({"v": 1, "id": "i", "task": "t", "queue": "q", "priority": bad})
    with pytest.raises(ProtocolError, match="priority"):
        MessageCodec().decode(body)


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_routing_example_runs_as_the_readme_says(broker: str, key_prefix: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REDIS_URL, require_server

    env = {**os.environ, "AIOQUEUE_BROKER_URL": "memory://"}
    if broker == "redis":
        require_server(REDIS_URL, "Redis")
        env.update(AIOQUEUE_BROKER_URL=REDIS_URL, AIOQUEUE_KEY_PREFIX=key_prefix)
    try:
        done = subprocess.run(
            [sys.executable, "examples/routing.py"],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        if broker == "redis":
            from conftest import delete_prefixed

            asyncio.run(delete_prefixed(REDIS_URL, key_prefix))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "charge small",
        "report urgent",
        "report mon",
        "report tue",
        "report by-name",
    ]


async def test_assigned_routes_are_checked_and_kept_read_only() -> None:
    app = App("v", task_routes={"a": "qa"})

    @app.task(name="a")
    async def job() -> None: ...

    with pytest.raises(TypeError):
        app.conf.task_routes["a"] = "elsewhere"  # would be ignored once cached: refused
    app.conf.task_routes = {"a": {"queue": "qb", "unknown": 1}}
    with pytest.raises(ConfigurationError, match="unknown"):
        await job.send()
    app.conf.task_routes = {"a": "qb"}
    async with app:
        await job.send()
        assert await app.broker.queue_length("qb") == 1
