"""A workflow step runs once per step id on RabbitMQ (results on Redis), even when two copies
of it are in the queue: what a worker that dies between publishing the next step and acking its
own leaves behind (the step comes back, its next step is published a second time).

The crash window is made without killing anything: a copy of the first step's message is
published again as a redelivery (attempt 2) while the second step runs, so the worker sends the
second step again, exactly as the redelivered step would after a real crash.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import App, Message, Middleware, chain
from aioqueue.backends.base import LeasesSteps
from aioqueue.canvas import flows

pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("transport", ["amqp-redis"])]

LEASE = 1.0  # short, so a copy waiting on a held step looks again within a second


@pytest.fixture(autouse=True)
def short_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows, "STEP_LEASE", LEASE)


class Keep(Middleware):
    """Keeps every message the client sends (a workflow's first step)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def before_send(self, message: Message) -> Message | None:
        self.sent.append(message)
        return None


def register(app: App) -> dict[str, Any]:
    runs: dict[str, list[Any]] = {"one": [], "slow": [], "last": []}
    gate = asyncio.Event()

    @app.task
    async def one(x: int) -> int:
        runs["one"].append(x)
        return x

    @app.task
    async def slow(x: int) -> int:
        runs["slow"].append(x)
        await gate.wait()
        return x + 1

    @app.task
    async def last(x: int) -> int:
        runs["last"].append(x)
        return x * 10

    return {"one": one, "slow": slow, "last": last, "runs": runs, "gate": gate}


async def test_a_step_sent_twice_runs_once(make_app: AppFactory) -> None:
    app = make_app()
    keep = Keep()
    app.add_middleware(keep)
    t = register(app)
    runs, gate = t["runs"], t["gate"]
    async with app, running_worker(app) as worker:
        result = await chain(t["one"].s(1), t["slow"].s(), t["last"].s()).send()
        await wait_until(lambda: _ran(runs["slow"], 1))
        # The first step again, as RabbitMQ redelivers it when its worker died after
        # publishing the second step and before its ack: the worker finds its outcome and
        # sends what it causes again, so a second copy of the (running) second step arrives.
        first = keep.sent[0]
        broker: Any = await app.ready_broker()
        await broker.republish(first.queue, app.codec.encode(first), 2)
        # that copy waits (parked) for the running one instead of running beside it
        try:
            await wait_until(lambda: _parked_or_ran_twice(worker, runs["slow"]))
            assert runs["slow"] == [1]
        finally:
            gate.set()  # else the worker's drain waits for a second copy on the gate
        assert await result.get(timeout=10) == 20
        # the parked copy looks again once the holder's lease would end: dropped, unrun,
        # and what follows the step is not sent again
        await wait_until(lambda: _idle(worker))
        assert runs == {"one": [1], "slow": [1], "last": [2]}
        assert await broker.queue_length(first.queue) == 0


async def test_a_step_whose_holder_died_runs_once_its_lease_lapses(make_app: AppFactory) -> None:
    app = make_app()
    t = register(app)
    runs = t["runs"]
    t["gate"].set()
    async with app:
        backend = app.backend
        assert isinstance(backend, LeasesSteps)
        # a worker that took the step's lease and died: nobody renews it
        await backend.connect()
        assert await backend.take_step("held-step", 0, "dead-worker", LEASE) == 0.0
        first = t["one"].s(5).set(task_id="held-step")
        async with running_worker(app) as worker:
            result = await chain(first, t["last"].s()).send()
            await wait_until(lambda: _parked(worker))
            assert runs["one"] == []  # not while the dead holder's lease lasts
            assert await result.get(timeout=10) == 50
        assert runs["one"] == [5] and runs["last"] == [5]


async def _ran(seen: list[Any], times: int) -> bool:
    return len(seen) >= times


async def _parked(worker: Any) -> bool:
    return bool(worker.parked)


async def _parked_or_ran_twice(worker: Any, seen: list[Any]) -> bool:
    return bool(worker.parked) or len(seen) > 1


async def _idle(worker: Any) -> bool:
    return worker.parked == 0 and worker.in_flight == 0
