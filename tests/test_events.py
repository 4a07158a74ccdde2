"""Task events and worker heartbeats (``events=True``), on every transport."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import AppFactory

from aioqueue import App, Context, Retry
from aioqueue.events import Event, EventFeed, EventsMiddleware

pytestmark = pytest.mark.timeout(60)


async def read_until(feed: EventFeed, task_id: list[str], until: str) -> list[Event]:
    """Every event, up to ``until`` for the task."""
    seen = []
    async for event in feed:
        seen.append(event)  # filtered by the caller: the id is known only once sent
        if event.type == until and event.task_id in task_id:
            return seen
    raise AssertionError("the feed ended")


def test_events_are_off_by_default() -> None:
    app = App("quiet", broker="memory://")
    assert not any(isinstance(m, EventsMiddleware) for m in app.middleware)
    assert App("loud", broker="memory://", events=True).middleware


async def test_event_order_of_a_retried_task(make_app: AppFactory) -> None:
    app = make_app("evented", events=True, worker_heartbeat_interval=0.2, worker_heartbeat_ttl=2.0)
    calls = []

    @app.task(name="events.flaky", bind=True)
    async def flaky(ctx: Context, password: str) -> str:
        calls.append(ctx.attempt)
        await ctx.update_state("PROGRESS", {"done": len(calls)})
        if len(calls) == 1:
            raise Retry(countdown=0.05)
        return "ok"

    async with app, app.events() as feed:
        ids: list[str] = []
        reader = asyncio.get_running_loop().create_task(read_until(feed, ids, "task-succeeded"))
        async with app.worker(concurrency=2, processes=1) as worker:
            result = await flaky.send(password="hunter2")
            ids.append(result.id)
            assert await result.get(timeout=10) == "ok"
            seen = await asyncio.wait_for(reader, timeout=15)
    kinds = [e.type for e in seen if e.task_id == result.id]
    assert kinds == [
        "task-sent",
        "task-received",
        "task-started",
        "task-progress",
        "task-retried",
        "task-received",
        "task-started",
        "task-progress",
        "task-succeeded",
    ], kinds
    by_kind = {e.type: e for e in seen if e.task_id == result.id}
    assert by_kind["task-succeeded"].worker == worker.id
    assert by_kind["task-succeeded"].runtime is not None
    assert by_kind["task-succeeded"].name == "events.flaky"
    assert by_kind["task-retried"].fields["retries"] == 1
    assert "hunter2" not in repr(seen)
    assert any(e.type == "worker-online" and e.worker == worker.id for e in seen)


async def test_failed_and_revoked_events(make_app: AppFactory) -> None:
    app = make_app("evented", events=True)

    @app.task(name="events.boom")
    async def boom() -> None:
        raise KeyError("nope")

    @app.task(name="events.never")
    async def never() -> None:
        raise AssertionError("revoked: must not run")

    async with app, app.events() as feed:
        ids: list[str] = []
        reader = asyncio.get_running_loop().create_task(read_until(feed, ids, "task-failed"))
        skipped = await never.send()
        await app.control.revoke(skipped.id)
        failing = await boom.send()
        ids.extend([failing.id])
        async with app.worker(concurrency=1, processes=1):
            with pytest.raises(KeyError):
                await failing.get(timeout=10)
            seen = await asyncio.wait_for(reader, timeout=15)
    kinds = {(e.task_id, e.type) for e in seen}
    assert (skipped.id, "task-revoked") in kinds  # taken off the queue in order, before boom
    assert (skipped.id, "task-started") not in kinds
    (failed,) = [e for e in seen if e.type == "task-failed"]
    assert failed.task_id == failing.id and "KeyError" in failed.fields["exception"]
    assert failed.runtime is not None


@pytest.mark.parametrize("transport", ["memory", "redis", "amqp-rpc"])
def test_operations_example_runs(transport: str, key_prefix: str) -> None:
    from conftest import AMQP_URL, REDIS_URL, delete_prefixed, require_server
    from test_examples import run_example

    urls = {"memory": "memory://", "redis": REDIS_URL, "amqp-rpc": AMQP_URL}
    if transport != "memory":
        require_server(urls[transport], transport)
    env = {
        "AIOQUEUE_BROKER_URL": urls[transport],
        "AIOQUEUE_KEY_PREFIX": key_prefix,
        "AIOQUEUE_AMQP_DELETE_QUEUES_ON_CLOSE": "true",
    }
    try:
        out = run_example("examples/operations.py", env)
    finally:
        if transport == "redis":
            asyncio.run(delete_prefixed(REDIS_URL, key_prefix))
    assert "{'api_token': '********'}" in out and "s3cret" not in out
    assert [line.split(": ")[1] for line in out.splitlines() if line.startswith("event:")] == [
        "task-sent",
        "task-received",
        "task-started",
        "task-progress",
        "task-succeeded",
    ]


async def test_a_burst_worker_with_events_ends_and_says_offline(make_app: AppFactory) -> None:
    app = make_app("burst", events=True)

    @app.task(name="events.noop")
    async def noop() -> None:
        return None

    async with app, app.events() as feed:
        await noop.send()
        worker = app.worker(concurrency=2, processes=1, burst=True)
        await asyncio.wait_for(worker.run(), timeout=20)
        async with asyncio.timeout(15):
            async for event in feed:
                if event.type == "worker-offline" and event.worker == worker.id:
                    break


@pytest.mark.parametrize("transport", ["redis"])
async def test_a_send_with_events_costs_no_round_trip_of_its_own(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broker and results on one Redis: the task-sent event rides in the publish's round trip
    (ahead of the message, so it is still first in the stream), not in one of its own before."""
    app = make_app(events=True)

    @app.task(name="events.quiet")
    async def quiet() -> None:
        return None

    async with app:
        broker, backend = await app.ready_broker(), await app.ready_backend()
        await quiet.send()  # connections and the stream are set up
        trips = {"broker": 0, "backend": 0}
        batchers = {"broker": broker.batcher, "backend": backend.batcher}  # type: ignore[attr-defined]
        for name, batcher in batchers.items():
            roundtrip = batcher._roundtrip

            async def counted(*args: Any, _name: str = name, _trip: Any = roundtrip) -> Any:
                trips[_name] += 1
                return await _trip(*args)

            monkeypatch.setattr(batcher, "_roundtrip", counted)
        sent = await quiet.send()
        assert trips == {"broker": 1, "backend": 0}
        many = await quiet.send_many([() for _ in range(300)])  # 300 events, one stage
        assert trips == {"broker": 2, "backend": 0}
        async with EventFeed(app, from_start=True) as feed:
            seen = await read_until(feed, [many[-1].id], "task-sent")
        # up to 16 events share a stream entry: one XADD for them, not one each
        entries = await backend.client.xlen(f"{backend.key_prefix}:events")  # type: ignore[attr-defined]
        assert entries <= 2 + -(-300 // 16)
    sent_ids = [e.task_id for e in seen if e.type == "task-sent"]
    assert sent_ids[-301:] == [sent.id, *(r.id for r in many)]
