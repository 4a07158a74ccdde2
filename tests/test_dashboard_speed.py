"""The dashboard's pages answer in under 100 ms with 10,000 recent tasks kept and 100,000
messages queued on the real Redis (the issue's bar), pages timed through the TestClient; a
task page with a workflow tree of 500 tasks (the outline's most: 500 state reads) included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis
from conftest import REDIS_URL, require_server
from starlette.testclient import TestClient

from aioqueue import App, group
from aioqueue.canvas.nodes import freeze
from aioqueue.canvas.outline import outline
from aioqueue.dashboard import Live, create_dashboard
from aioqueue.events import Event

pytestmark = pytest.mark.timeout(120)

QUEUED = 100_000
TASKS = 10_000


@pytest.fixture
def loaded(key_prefix: str) -> Iterator[tuple[TestClient, Live]]:
    require_server(REDIS_URL, "Redis")
    app = App("dash-speed", broker=REDIS_URL, backend=REDIS_URL, key_prefix=key_prefix)

    @app.task(name="dash.noop")
    async def noop(i: int) -> int:
        return i

    async def fill() -> None:
        async with app:
            for start in range(0, QUEUED, 10_000):
                await noop.send_many((i,) for i in range(start, start + 10_000))

    asyncio.run(fill())
    live = Live(app, poll_interval=0.5)
    now = time.time()
    for i in range(TASKS):
        kind = ("task-succeeded", "task-failed", "task-started")[i % 3]
        for k in ("task-sent", kind):
            live.apply(
                Event(
                    k,
                    now + i * 1e-4,
                    task_id=f"t{i}",
                    name=f"dash.n{i % 7}",
                    queue="default",
                    worker=f"w{i % 4}",
                    runtime=0.001,
                )
            )
    # a group of 600 (ids wf0..wf599): its outline keeps 500, the most a tree page reads
    shape, nodes = outline(freeze(group(noop.s(i).set(task_id=f"wf{i}") for i in range(600))))
    live.apply(Event("workflow-sent", now, fields={"workflow": shape, "nodes": nodes}))
    try:
        with TestClient(create_dashboard(app, live=live, close_app=True)) as client:
            deadline = time.monotonic() + 20
            while "default" not in live.queues and time.monotonic() < deadline:
                time.sleep(0.05)
            yield client, live
    finally:
        client_ = redis.Redis.from_url(REDIS_URL)
        keys = list(client_.scan_iter(match=f"{key_prefix}*", count=1000))
        if keys:
            client_.delete(*keys)
        client_.close()


def _slowest(client: TestClient, url: str, times: int = 10) -> float:
    client.get(url)  # warm
    worst = 0.0
    for _ in range(times):
        started = time.perf_counter()
        response = client.get(url)
        worst = max(worst, time.perf_counter() - started)
        assert response.status_code == 200
    return worst


def test_pages_answer_fast_with_10k_tasks_and_100k_queued(
    loaded: tuple[TestClient, Live],
) -> None:
    client, live = loaded
    assert len(live.index) == TASKS
    assert live.queues["default"].stats.depth == QUEUED
    pages = [
        "/",
        "/tasks",
        "/tasks?state=FAILURE",
        "/tasks?name=dash.n3&worker=w1",
        "/tasks?limit=1000",
        "/tasks/t5000",
        "/tasks/wf7",
        "/dead-letters",
    ]
    times = {url: _slowest(client, url) for url in pages}
    print({url: f"{t * 1000:.1f} ms" for url, t in times.items()})
    slow = {url: t for url, t in times.items() if t >= 0.1}
    assert not slow, f"pages over 100 ms: {slow}"
    assert client.get("/tasks/wf7").text.count('href="/tasks/wf') == 500
