"""The dashboard over every transport, with a worker in process and events on: what a running
worker shows (slots, tasks, queue depth), the task page of a dead-lettered failure, its Retry
and a dead letter's Drop as CSRF-carrying POSTs (httpx against the ASGI app, same loop)."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from conftest import AppFactory, wait_until

from aioqueue.dashboard import Live, create_dashboard

pytestmark = pytest.mark.timeout(60)


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF field on the page"
    return found.group(1)


async def test_dashboard_follows_a_worker(make_app: AppFactory) -> None:
    app = make_app("dash-contract", events=True)
    fixed: list[bool] = []

    @app.task(name="dash.double")
    async def double(x: int) -> int:
        return 2 * x

    @app.task(name="dash.fragile", retry_for=(ValueError,), max_retries=0)
    async def fragile(token: str) -> str:
        if not fixed:
            raise ValueError("not yet")
        return "ran"

    async with app:
        live = Live(app, poll_interval=0.2, inspect_timeout=0.3)
        await live.start()
        dashboard = create_dashboard(app, live=live)
        transport = httpx.ASGITransport(app=dashboard)
        try:
            async with (
                app.worker(concurrency=3) as worker,
                httpx.AsyncClient(
                    transport=transport, base_url="http://dash", follow_redirects=True
                ) as web,
            ):
                results = [await double.send(i) for i in range(5)]
                for i, result in enumerate(results):
                    assert await result.get(timeout=10) == 2 * i
                broken = await fragile.send("sesame")
                with pytest.raises(ValueError):
                    await broken.get(timeout=10)
                spare = await fragile.send("other")
                with pytest.raises(ValueError):
                    await spare.get(timeout=10)

                async def seen() -> bool:
                    done = live.index.page({"state": "SUCCESS"}, limit=10)
                    return (
                        len(done) == 5
                        and any(r.worker == worker.id for r in live.workers.rows())
                        and "default" in live.queues
                        and live.queues["default"].stats.dead == 2
                    )

                await wait_until(seen, timeout=15)
                overview = (await web.get("/")).text
                assert worker.id in overview and "dash.double" in overview
                assert "Task events are off" not in overview

                page = (await web.get(f"/tasks/{broken.id}")).text
                assert "retries exhausted" in page and "task-failed" in page
                assert ">Retry<" in page and "sesame" in page  # a plain argument shows
                token = _csrf(page)

                fixed.append(True)
                retried = await web.post(
                    f"/tasks/{broken.id}/retry", data={"csrf": token, "queue": "default"}
                )
                assert retried.status_code == 200 and "sent again" in retried.text

                async def ran_again() -> bool:
                    record = live.index.get(broken.id)
                    return record is not None and record.state == "SUCCESS"

                await wait_until(ran_again, timeout=15)

                letters = (await web.get("/dead-letters")).text
                assert spare.id in letters and broken.id not in letters
                dropped = await web.post(
                    "/dead-letters/drop", data={"csrf": token, "queue": "default", "id": spare.id}
                )
                assert "dropped 1 dead letter" in dropped.text
                assert spare.id not in (await web.get("/dead-letters")).text

                refused = await web.post(f"/tasks/{spare.id}/revoke", data={"csrf": "forged"})
                assert refused.status_code == 403
        finally:
            await live.stop()


async def test_the_queue_row_shows_what_workers_hold(make_app: AppFactory) -> None:
    """In flight on every transport (RabbitMQ cannot count it: the workers tell), and the
    oldest message among the held ones when nothing waits."""
    app = make_app("dash-held")
    gate = asyncio.Event()

    @app.task(name="dash.held")
    async def held() -> None:
        await gate.wait()

    async with app:
        live = Live(app, poll_interval=0.2, inspect_timeout=0.5)
        await live.start()
        web = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_dashboard(app, live=live)),
            base_url="http://dash",
        )
        try:
            async with app.worker(concurrency=2):
                for _ in range(2):
                    await held.send()

                async def both_held() -> bool:
                    row = live.queues.get("default")
                    return row is not None and row.stats.in_flight == 2

                await wait_until(both_held, timeout=15)
                overview = (await web.get("/")).text
                row = re.search(r"<tr><td><a [^>]*>default</a></td>(.*?)</tr>", overview)
                assert row is not None, overview
                cells = re.findall(r'<td class="n">([^<]*)</td>', row.group(1))
                depth, delayed, in_flight, _consumers, oldest = cells[:5]
                assert (depth, delayed, in_flight) == ("0", "0", "2")
                assert oldest.endswith("s") and float(oldest[:-1]) >= 0
                gate.set()
        finally:
            gate.set()
            await web.aclose()
            await live.stop()
