"""The task page's workflow tree: workflows run by a real worker on Redis (the page's tree is the
sender's own ``tree()``, node for node), a task in no workflow (no tree), a step of a workflow
sent with events off (its root and parent linked, no tree), a workflow cut at the
outline's 500 tasks, an ``rpc://`` backend (structure, no states) and a hung backend (the page
answers within its bound). Pages through httpx against the ASGI app, in the test's loop."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from conftest import AMQP_URL, REDIS_URL, delete_prefixed, require_server, wait_until
from faultproxy import FaultProxy

from aioqueue import App, chain, chord, group
from aioqueue.canvas.nodes import freeze
from aioqueue.canvas.outline import OUTLINE_NODES, count_tasks, outline
from aioqueue.dashboard import Live, create_dashboard
from aioqueue.dashboard.tree import BACKEND_WAIT
from aioqueue.dashboard.workflows import WorkflowIndex
from aioqueue.events import Event

pytestmark = pytest.mark.timeout(60)

_NODE = re.compile(
    r'<li(?: class="here")?><span class="([^"]+)">\1</span> <b>([^<]+)</b> '
    r'<a href="/tasks/([^"]+)">([^<]+)</a>'
)


def _register(app: App) -> None:
    @app.task(name="dwf.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="dwf.total")
    async def total(values: list[int]) -> int:
        return sum(values)

    @app.task(name="dwf.boom")
    async def boom(x: int) -> int:
        raise ValueError(f"boom {x}")


def _sig(app: App, name: str, *args: Any) -> Any:
    return app.tasks[name].s(*args)


def _tree_rows(page: str) -> list[tuple[str, str, str]]:
    """(state, task name, id) of each task in the page's tree, in page order."""
    assert '<div id="workflow">' in page, "no workflow tree on the page"
    section = page.split('<div id="workflow">', 1)[1].split("</div>", 1)[0]
    rows = []
    for state, name, href, text in _NODE.findall(section):
        assert unquote(href) == text  # the id links to its own task page
        rows.append((state, name, text))
    return rows


def _flat(node: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(state, task name, id) of each task of a ``tree()``, depth first (the page's order)."""
    rows = [(node["state"], node["task"], node["id"])] if node["type"] == "task" else []
    for child in node["children"]:
        rows.extend(_flat(child))
    return rows


@pytest.fixture
async def web(key_prefix: str) -> AsyncIterator[tuple[App, Live, httpx.AsyncClient]]:
    """A Redis app with events on, its dashboard's Live feeding, and an httpx client on it."""
    require_server(REDIS_URL, "Redis")
    app = App("dash-wf", broker=REDIS_URL, backend=REDIS_URL, key_prefix=key_prefix, events=True)
    _register(app)
    async with app:
        live = Live(app, poll_interval=0.5, inspect_timeout=0.3)
        await live.start()
        transport = httpx.ASGITransport(app=create_dashboard(app, live=live))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
                yield app, live, client
        finally:
            await live.stop()
    await delete_prefixed(REDIS_URL, key_prefix)


async def test_task_page_shows_the_workflow_tree_with_states_and_links(
    web: tuple[App, Live, httpx.AsyncClient],
) -> None:
    app, live, client = web
    add = app.tasks["dwf.add"]
    async with app.worker(concurrency=4):
        # a chain through a chord (group | step), with a link on its first step
        first = _sig(app, "dwf.add", 1, 1).set(link=_sig(app, "dwf.add", 100))
        members = group(_sig(app, "dwf.add", 10), _sig(app, "dwf.add", 20))
        good = await chain(first, _sig(app, "dwf.add", 2), members, _sig(app, "dwf.total")).send()
        assert await good.get(timeout=10) == (4 + 10) + (4 + 20)
        # a chord sent on its own, and a chain whose second step fails
        made = await chord([add.s(i, i) for i in range(3)], _sig(app, "dwf.total")).send()
        assert await made.get(timeout=10) == 6
        bad = await chain(add.s(1, 2), _sig(app, "dwf.boom"), add.s(5)).send()
        with pytest.raises(ValueError):
            await bad.get(timeout=10)

        async def settled() -> bool:  # the link is not waited for by good.get()
            return all(state == "SUCCESS" for state, _, _ in _flat(await good.tree()))

        await wait_until(settled, timeout=10)
        for handle in (good, made, bad):
            expected = _flat(await handle.tree())
            ids = [task_id for _, _, task_id in expected]
            await wait_until(lambda ids=ids: _all_known(live, ids), timeout=10)
            for task_id in (ids[0], ids[-1]):  # the page of any task shows the same tree
                page = (await client.get(f"/tasks/{task_id}")).text
                assert _tree_rows(page) == expected
                assert f'<li class="here"><span class="{expected[ids.index(task_id)][0]}"' in page
        good_page = (await client.get(f"/tasks/{good.id}")).text
        assert len(_tree_rows(good_page)) == 6 and "6 task(s), sent" in good_page
        assert {state for state, _, _ in _tree_rows(good_page)} == {"SUCCESS"}
        for kind in ("chain", "chord", "group"):
            assert f'<span class="kind">{kind}</span>' in good_page
        bad_states = [
            state for state, _, _ in _tree_rows((await client.get(f"/tasks/{bad.id}")).text)
        ]
        assert bad_states == ["SUCCESS", "FAILURE", "FAILURE"]  # the skipped step fails too


async def _all_known(live: Live, ids: list[str]) -> bool:
    return all(live.workflows.of(task_id) is not None for task_id in ids)


async def test_task_outside_any_workflow_has_no_tree(
    web: tuple[App, Live, httpx.AsyncClient],
) -> None:
    app, live, client = web
    async with app.worker(concurrency=2):
        plain = await app.tasks["dwf.add"].send(2, 3)
        assert await plain.get(timeout=10) == 5
        flow = await chain(_sig(app, "dwf.add", 1, 1), _sig(app, "dwf.add", 1)).send()
        await flow.get(timeout=10)

    async def recorded() -> bool:
        record = live.index.get(plain.id)
        known = live.workflows.of(flow.id) is not None
        return record is not None and record.state == "SUCCESS" and known

    await wait_until(recorded, timeout=10)
    page = (await client.get(f"/tasks/{plain.id}")).text
    assert "SUCCESS" in page and "dwf.add" in page
    assert "<h2>Workflow</h2>" not in page and 'class="tree"' not in page


async def test_a_step_of_a_workflow_not_seen_links_its_root_and_parent(
    web: tuple[App, Live, httpx.AsyncClient], key_prefix: str
) -> None:
    """Sent by an app with events off: no outline, but the worker's task-received says where
    the step belongs; its page says so and links the root and the parent."""
    app, live, client = web
    sender = App("dash-wf-quiet", broker=REDIS_URL, backend=REDIS_URL, key_prefix=key_prefix)
    steps = [sender.signature("dwf.add", (1, 1)), sender.signature("dwf.add", (2,))]
    async with sender, app.worker(concurrency=2):
        flow = await chain(*steps, sender.signature("dwf.add", (3,))).send()
        assert await flow.get(timeout=10) == 7
    first, second = flow.parent.parent.id, flow.parent.id

    async def received() -> bool:
        record = live.index.get(flow.id)
        return record is not None and record.parent_id == second and record.state == "SUCCESS"

    await wait_until(received, timeout=10)
    assert live.workflows.of(flow.id) is None
    page = (await client.get(f"/tasks/{flow.id}")).text
    assert "<h2>Workflow</h2>" in page and 'class="tree"' not in page
    assert f'root <a href="/tasks/{first}">{first}</a>' in page
    assert f'parent <a href="/tasks/{second}">{second}</a>' in page
    assert "did not read the workflow's <code>workflow-sent</code> event" in page


async def test_a_workflow_past_the_outline_shows_500_tasks_and_counts_the_rest() -> None:
    app = App("dash-wf-big", broker="memory://", events=True)
    _register(app)
    async with app:
        live = Live(app, poll_interval=0.5, inspect_timeout=0.1)
        await live.start()
        transport = httpx.ASGITransport(app=create_dashboard(app, live=live))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
                big = await group(_sig(app, "dwf.add", i, i) for i in range(600)).send()
                first = big.results[0].id
                await wait_until(lambda: _all_known(live, [first]), timeout=10)
                started = time.perf_counter()
                page = (await client.get(f"/tasks/{first}")).text
                took = time.perf_counter() - started
        finally:
            await live.stop()
    rows = _tree_rows(page)
    assert len(rows) == OUTLINE_NODES
    assert [task_id for _, _, task_id in rows] == [r.id for r in big.results[:OUTLINE_NODES]]
    assert {state for state, _, _ in rows} == {"PENDING"}  # no worker ran them
    assert "600 task(s), the first 500 shown" in page
    assert "… 100 more task(s) not shown" in page
    assert took < 1.0, f"the page took {took:.3f}s"


def test_outline_counts_and_cuts_nested_parts() -> None:
    app = App("dash-wf-outline", broker="memory://")
    _register(app)
    add = app.tasks["dwf.add"]
    node = freeze(
        chain(
            add.s(1, 1).set(link=add.s(9)),
            group(add.s(i) for i in range(4)),
            _sig(app, "dwf.total"),
        )
    )
    assert count_tasks(node) == 7
    whole, total = outline(node)
    assert total == 7 and "args" not in str(whole) and "more" not in str(whole)
    cut, total = outline(node, limit=3)
    assert total == 7
    chord_part = cut["steps"][1]
    assert chord_part["t"] == "ch" and len(chord_part["header"]) == 1
    assert chord_part["more"] == 4  # three members and the callback


async def test_rpc_backend_shows_the_structure_and_says_states_are_unknown(
    key_prefix: str,
) -> None:
    require_server(AMQP_URL, "RabbitMQ")
    app = App(
        "dash-wf-rpc",
        broker=AMQP_URL,
        backend="rpc://",
        key_prefix=key_prefix,
        amqp_delete_queues_on_close=True,
    )
    _register(app)
    async with app:
        live = Live(app)
        node = freeze(chain(_sig(app, "dwf.add", 1, 1), _sig(app, "dwf.add", 2)))
        shape, total = outline(node)
        live.apply(Event("workflow-sent", time.time(), fields={"workflow": shape, "nodes": total}))
        transport = httpx.ASGITransport(app=create_dashboard(app, live=live))
        async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
            page = (await client.get(f"/tasks/{node['steps'][0]['id']}")).text
    rows = _tree_rows(page)
    assert [task_id for _, _, task_id in rows] == [step["id"] for step in node["steps"]]
    assert {state for state, _, _ in rows} == {"unknown"}
    assert "the rpc:// result backend sends each result to the process that sent" in page


async def test_a_hung_result_backend_delays_the_task_page_by_its_bound_only(
    key_prefix: str,
) -> None:
    """Before the bound the page waited for the Redis client's 30 s socket timeout."""
    require_server(REDIS_URL, "Redis")
    url = urlsplit(REDIS_URL)
    async with FaultProxy(url.port or 6379, url.hostname or "127.0.0.1") as proxy:
        backend = f"redis://127.0.0.1:{proxy.port}{url.path}"
        app = App("dash-wf-hung", broker=REDIS_URL, backend=backend, key_prefix=key_prefix)
        _register(app)
        try:
            async with app:
                live = Live(app)
                node = freeze(chain(_sig(app, "dwf.add", 1, 1), _sig(app, "dwf.add", 2)))
                shape, total = outline(node)
                live.apply(
                    Event("workflow-sent", time.time(), fields={"workflow": shape, "nodes": total})
                )
                task_id = node["steps"][1]["id"]
                transport = httpx.ASGITransport(app=create_dashboard(app, live=live))
                async with httpx.AsyncClient(transport=transport, base_url="http://dash") as web:
                    warm = (await web.get(f"/tasks/{task_id}")).text  # connected, answering
                    assert [s for s, _, _ in _tree_rows(warm)] == ["PENDING", "PENDING"]
                    proxy.freeze()
                    started = time.perf_counter()
                    page = (await web.get(f"/tasks/{task_id}")).text
                    took = time.perf_counter() - started
                    proxy.thaw()
        finally:
            proxy.thaw()
            await delete_prefixed(REDIS_URL, key_prefix)
    assert BACKEND_WAIT <= took < BACKEND_WAIT + 1.5, f"the page took {took:.2f}s"
    assert f"result backend did not answer within {BACKEND_WAIT:g} s" in page
    assert [s for s, _, _ in _tree_rows(page)] == ["unknown", "unknown"]


def _sent(shape: Any, nodes: int | None = None) -> Event:
    fields = {"workflow": shape} if nodes is None else {"workflow": shape, "nodes": nodes}
    return Event("workflow-sent", time.time(), task_id="x", name="chain", fields=fields)


def _chain_of(*ids: str) -> dict[str, Any]:
    return {"t": "c", "steps": [{"t": "s", "id": task_id, "task": "t"} for task_id in ids]}


def test_workflow_index_is_bounded_by_tasks_and_skips_malformed_outlines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = WorkflowIndex(max_nodes=5)
    for shape in (_chain_of("a0", "a1"), _chain_of("b0"), _chain_of("c0")):
        assert index.add(_sent(shape)) is not None
    assert len(index) == 3 and index.of("a1") is not None  # 4 tasks: all kept
    big = {"t": "g", "members": [{"t": "s", "id": f"g{i}", "task": "t"} for i in range(3)]}
    index.add(_sent(big, nodes=900))
    kept = index.of("g0")
    assert kept is not None and kept.nodes == 900 and kept.ids == ("g0", "g1", "g2")
    # 7 tasks held: the oldest workflows go until 5 or fewer remain (a's two)
    assert index.of("a0") is None and index.of("a1") is None
    assert index.of("b0") is not None and len(index) == 3
    for bad in ({"t": "zz"}, {"t": "s", "id": 3, "task": "t"}, {"t": "g", "members": "x"}, "s"):
        assert index.add(_sent(bad)) is None
    assert caplog.text.count("unreadable workflow-sent event") == 4


def test_a_workflow_sent_event_prints_as_one_short_line() -> None:
    shape = {"t": "g", "members": [{"t": "s", "id": f"g{i}", "task": "t"} for i in range(300)]}
    line = str(_sent(shape, nodes=300))
    assert "workflow-sent" in line and line.endswith("nodes=300") and "g299" not in line
