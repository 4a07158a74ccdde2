"""Remote control in process, on every transport: ``app.control.inspect()``, ping, shutdown."""

from __future__ import annotations

import asyncio

import pytest
from conftest import AppFactory, wait_until

pytestmark = pytest.mark.timeout(60)


async def test_inspect_answers_from_a_running_worker(make_app: AppFactory) -> None:
    app = make_app("inspected")
    gate = asyncio.Event()

    @app.task(name="inspect.wait")
    async def wait(password: str, dsn: str) -> str:
        await gate.wait()
        return "done"

    @app.task(name="inspect.other", queue="other")
    async def other() -> None:
        return None

    async with app:
        worker = app.worker(concurrency=3, processes=1)
        async with worker:
            control = app.control
            assert await control.ping(timeout=0.5) == {worker.id: "pong"}
            result = await wait.send(password="hunter2", dsn="redis://:s3cret@db:6379/0")

            async def running() -> bool:
                return bool((await control.inspect(worker.id).active()).get(worker.id))

            await wait_until(running, timeout=10)
            (row,) = (await control.inspect(worker.id).active())[worker.id]
            assert row["id"] == result.id and row["name"] == "inspect.wait"
            assert row["kwargs"]["password"] == "********"
            assert "s3cret" not in row["kwargs"]["dsn"] and row["kwargs"]["dsn"].endswith(
                "db:6379/0"
            )
            assert row["attempt"] == 1 and row["runtime"] >= 0

            registered = (await control.inspect(worker.id).registered())[worker.id]
            assert {"name": "inspect.other", "queue": "other", "executor": "async"} in registered
            stats = (await control.inspect(worker.id).stats())[worker.id]
            assert stats["concurrency"] == 3 and stats["slots_free"] == 2
            assert set(stats["queues"]) == {"default", "other"}
            conf = (await control.inspect(worker.id).conf())[worker.id]
            assert conf["default_queue"] == "default"
            assert (await control.inspect(worker.id).scheduled()) == {worker.id: []}

            # a request to nobody is a bounded wait with no answer
            assert await control.inspect("no-such-worker", timeout=0.3).ping() == {}
            gate.set()
            assert await result.get(timeout=10) == "done"

            assert await control.shutdown(worker.id) == {worker.id: "shutting down"}
            await asyncio.wait_for(worker._run_task, timeout=20)


async def test_cancel_and_add_consumer(make_app: AppFactory) -> None:
    app = make_app("switching")
    gate = asyncio.Event()

    @app.task(name="switch.slow")
    async def slow() -> str:
        await gate.wait()
        return "slow"

    @app.task(name="switch.other", queue="other")
    async def other() -> str:
        return "other"

    async with app:
        worker = app.worker(concurrency=4, processes=1)
        async with worker:
            control = app.control
            running = await slow.send()  # runs through the switch on the retired consumer

            async def started() -> bool:
                return bool((await control.inspect(worker.id).active())[worker.id])

            await wait_until(started, timeout=10)
            assert await control.cancel_consumer("other", worker.id) == {worker.id: ["default"]}
            assert worker.queues == ("default",)
            answer = await control.cancel_consumer("other", worker.id)
            assert "not consuming 'other'" in answer[worker.id]["error"]
            answer = await control.cancel_consumer("default", worker.id)
            assert "only queue" in answer[worker.id]["error"]

            waiting = await other.send()
            stats = (await control.inspect(worker.id).stats())[worker.id]
            assert stats["queues"] == ["default"]
            gate.set()
            assert await running.get(timeout=10) == "slow"
            assert not await waiting.ready()

            added = await control.add_consumer("other", worker.id)
            assert added == {worker.id: ["default", "other"]}
            assert await waiting.get(timeout=10) == "other"
            assert worker.processed == 2
        assert worker.returned == 0


async def test_asking_every_worker_returns_once_each_live_one_answered(
    make_app: AppFactory,
) -> None:
    """Redis counts the control channel's subscribers, RabbitMQ the consumers of the roll-call
    queue: a request to every worker returns as soon as each live one answered (with none, at
    once), not after its whole timeout."""
    app = make_app("counted")
    loop = asyncio.get_running_loop()
    async with app:
        began = loop.time()
        nobody = await app.control.inspect(timeout=20).ping()
        assert nobody == {} and nobody.everyone
        assert loop.time() - began < 10
        async with (
            app.worker(concurrency=2, processes=1) as one,
            app.worker(concurrency=2, processes=1) as two,
        ):
            began = loop.time()
            answers = await app.control.inspect(timeout=20).ping()
            assert answers == {one.id: "pong", two.id: "pong"} and answers.everyone
            assert loop.time() - began < 10
            holding = await app.control.inspect(timeout=20).holding()
            assert holding == {one.id: {}, two.id: {}} and holding.everyone


# two apps are two processes' view of one broker: memory:// brokers are each app's own
@pytest.mark.parametrize("transport", ["redis", "amqp-redis", "amqp-rpc"])
async def test_a_shutdown_is_answered_before_the_worker_closes_its_connections(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``aioqueue worker`` does, the worker's app is closed as soon as ``run()`` returns:
    the reply to the shutdown that stopped it must have gone out by then, even when it is slow
    to send (CI once saw ``aioqueue control shutdown`` get no reply on RabbitMQ)."""
    worker_app, client = make_app("stopped"), make_app("stopper")
    bus = worker_app.control.bus()
    reply = bus.reply

    async def slow_reply(to: str, payload: dict[str, object]) -> None:
        await asyncio.sleep(0.3)  # the worker's run() returns meanwhile
        await reply(to, payload)

    monkeypatch.setattr(bus, "reply", slow_reply)
    worker = worker_app.worker(concurrency=2, processes=1)

    async def serve() -> None:  # aioqueue.cli._run_worker's shape
        async with worker_app:
            await worker.run()

    async with client:
        serving = asyncio.get_running_loop().create_task(serve())
        await asyncio.wait_for(worker.ready.wait(), timeout=20)
        answers = await client.control.shutdown(worker.id, timeout=10)
        assert answers == {worker.id: "shutting down"}
        await asyncio.wait_for(serving, timeout=20)
