"""Workflows over every transport: signatures, chain, group, chord, link / link_error, nesting."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import (
    App,
    ChordError,
    ConfigurationError,
    Context,
    GroupResult,
    Message,
    Middleware,
    States,
    chain,
    chord,
    group,
)
from aioqueue.canvas.wire import signature_node

pytestmark = pytest.mark.timeout(30)


def register(app: App) -> dict[str, Any]:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task
    async def mul(x: int, y: int) -> int:
        return x * y

    @app.task
    async def total(values: list[int]) -> int:
        return sum(values)

    @app.task
    async def boom(x: int) -> int:
        raise ValueError(f"boom {x}")

    @app.task
    async def record(*args: Any) -> list[Any]:
        seen.append(list(args))
        return list(args)

    @app.task(bind=True, default_retry_delay=0.01)
    async def flaky(ctx: Context, x: int) -> int:
        tries.append(x)
        if ctx.retries == 0:
            ctx.retry()
        return x

    seen: list[list[Any]] = []
    tries: list[int] = []
    return {
        "add": add,
        "mul": mul,
        "total": total,
        "boom": boom,
        "record": record,
        "flaky": flaky,
        "seen": seen,
        "tries": tries,
    }


def _chords_need_redis(transport: str) -> None:
    if transport == "amqp-rpc":
        pytest.skip("rpc:// results cannot count a chord (see test_chord_refused_on_rpc)")


async def test_signature_is_plain_data(make_app: AppFactory) -> None:
    app = make_app()
    t = register(app)
    sig = t["add"].s(2).set(queue="other", priority=3, countdown=1.5)
    node = signature_node(sig)
    assert node["task"] == t["add"].name and node["args"] == [2]
    assert node["o"] == {"queue": "other", "priority": 3, "countdown": 1.5}
    assert t["add"].si(1, 2).immutable
    by_name = app.signature("elsewhere.task", [1], {"k": 2}, queue="q")
    assert signature_node(by_name)["task"] == "elsewhere.task"
    with pytest.raises(ConfigurationError, match="priority"):
        app.signature("x", priority=42)


async def test_chain_passes_results(make_app: AppFactory) -> None:
    app = make_app()
    t = register(app)
    async with app, running_worker(app):
        result = await chain(t["add"].s(1, 2), t["mul"].s(10), t["add"].s(5)).send()
        assert await result.get(timeout=10) == 35
        piped = await (t["add"].s(1, 1) | t["mul"].s(3) | t["add"].si(7, 7)).send()
        assert await piped.get(timeout=10) == 14
        fan = await (t["add"].s(1, 2) | group(t["mul"].s(i) for i in range(3))).send()
        assert isinstance(fan, GroupResult)  # what the typing says (see the mypy test)
        assert await fan.get(timeout=10) == [0, 3, 6]


async def test_failing_step_stops_the_chain(make_app: AppFactory) -> None:
    app = make_app()
    t = register(app)
    async with app, running_worker(app):
        wf = chain(t["add"].s(1, 2), t["boom"].s(), t["record"].s("never"))
        result = await wf.send()
        with pytest.raises(ValueError, match="boom 3") as caught:
            await result.get(timeout=10)
        assert await result.state() == States.FAILURE
        # the failing step's id is reachable from the chain's result
        assert any("Remote traceback (task" in note for note in caught.value.__notes__)
        assert t["seen"] == []


async def test_group_in_order_and_as_completed(make_app: AppFactory) -> None:
    app = make_app()
    t = register(app)
    async with app, running_worker(app):
        gr = await group(t["add"].s(i, i) for i in range(20)).send()
        assert isinstance(gr, GroupResult)
        assert await gr.get(timeout=10) == [2 * i for i in range(20)]
        assert await gr.ready()
        assert await gr.completed_count() == 20
        assert len(gr.results) == 20
        again = await group(t["add"].s(i, 1) for i in range(5)).send()
        assert sorted([v async for v in again.as_completed(timeout=10)]) == [1, 2, 3, 4, 5]
        mixed = await group(t["add"].s(1, 1), t["boom"].s(1)).send()
        values = await mixed.get(timeout=10, propagate=False)
        assert values[0] == 2 and isinstance(values[1], ValueError)
        with pytest.raises(ValueError):
            await mixed.get(timeout=10)


async def test_chord_runs_callback_once(make_app: AppFactory, transport: str) -> None:
    _chords_need_redis(transport)
    app = make_app()
    t = register(app)
    async with app, running_worker(app):
        result = await chord(group(t["add"].s(i, i) for i in range(10)), t["total"].s()).send()
        assert await result.get(timeout=10) == 90
        piped = await (group(t["add"].s(i, 0) for i in range(4)) | t["total"].s()).send()
        assert await piped.get(timeout=10) == 6


@pytest.mark.parametrize("transport", ["memory"])
async def test_memory_chord_state_expires_like_redis(make_app: AppFactory) -> None:
    """The memory backend forgets a chord ``result_ttl`` after its latest join, as Redis's
    join script expires its set: finished and unfinished chords alike do not pile up."""
    app = make_app(result_ttl=0.2)
    t = register(app)
    async with app, running_worker(app):
        for n in range(5):
            result = await chord([t["add"].s(n, 1), t["add"].s(n, 2)], t["total"].s()).send()
            assert await result.get(timeout=10) == 2 * n + 3
        backend: Any = app.backend
        for n in range(20):  # chords whose other member never comes
            assert not await backend.chord_join(f"stuck-{n}", "only", 2, 0.2)
        assert len(backend._chords) == 25  # the backend's own table: nothing else shows it

        async def only_the_probe_left() -> bool:
            # a join is what sweeps; the probe's own state is kept while it is joined
            await backend.chord_join("probe", "m", 2, 0.2)
            return len(backend._chords) == 1 and backend._chords.get("probe") is not None

        await wait_until(only_the_probe_left, timeout=5)


async def test_chord_with_failing_member(make_app: AppFactory, transport: str) -> None:
    _chords_need_redis(transport)
    app = make_app()
    t = register(app)
    async with app, running_worker(app):
        members = [t["add"].s(1, 1), t["boom"].s(7), t["add"].s(2, 2)]
        result = await chord(members, t["record"].s()).send()
        with pytest.raises(ChordError, match="boom 7") as caught:
            await result.get(timeout=10)
        assert "member" in str(caught.value)
        assert t["seen"] == []


async def test_chord_with_expired_member_does_not_hang(
    make_app: AppFactory, transport: str
) -> None:
    _chords_need_redis(transport)
    app = make_app()
    t = register(app)
    async with app, running_worker(app):
        expired = t["add"].s(1, 1).set(expires=datetime.now(UTC) - timedelta(seconds=1))
        result = await chord([t["add"].s(2, 2), expired], t["total"].s()).send()
        with pytest.raises(ChordError, match="REVOKED"):
            await result.get(timeout=10)


async def test_empty_chord_calls_back_with_nothing(make_app: AppFactory, transport: str) -> None:
    _chords_need_redis(transport)
    app = make_app()
    t = register(app)
    async with app, running_worker(app):
        result = await chord([], t["total"].s()).send()
        assert await result.get(timeout=10) == 0


async def test_link_and_link_error(make_app: AppFactory) -> None:
    app = make_app()
    t = register(app)
    async with app, running_worker(app):
        ok = await t["add"].s(2, 3).set(link=t["record"].s("after")).send()
        assert await ok.get(timeout=10) == 5
        bad = await t["boom"].s(4).set(link_error=[t["record"].s()]).send()
        with pytest.raises(ValueError):
            await bad.get(timeout=10)
        for _ in range(500):
            if len(t["seen"]) == 2:
                break
            await asyncio.sleep(0.01)
        by_first = {str(args[0]): args for args in t["seen"]}
        assert by_first["5"] == [5, "after"]
        failed = by_first[bad.id]
        assert failed[1]["state"] == "FAILURE"
        assert failed[1]["type"] == "builtins.ValueError" and "boom 4" in failed[1]["message"]


async def test_nesting_three_levels(make_app: AppFactory, transport: str) -> None:
    _chords_need_redis(transport)
    app = make_app()
    t = register(app)
    add, total, mul = t["add"], t["total"], t["mul"]
    async with app, running_worker(app):
        # chains in a group
        gr = await group(chain(add.s(i, i), mul.s(10)) for i in range(3)).send()
        assert await gr.get(timeout=10) == [0, 20, 40]
        # a group in a chain (a chord), then more steps; a chord inside a chain
        wf = chain(
            add.s(1, 1),
            group(mul.s(i) for i in range(1, 4)),
            total.s(),
            chord([chain(add.s(0), mul.s(2)), add.s(3)], total.s()),
            add.s(1),
        )
        # 1+1=2; [2*1, 2*2, 2*3] -> 12; [(12+0)*2, 12+3] -> 39; +1
        result = await wf.send()
        assert await result.get(timeout=15) == 40
        # a chord whose callback is a chain ending in a group, in a chain: the group and the
        # step after it become a chord only when a worker sends them
        inner = chain(
            chord([add.s(1, 1), add.s(0, 0)], chain(total.s(), group(add.s(1), add.s(2)))),
            total.s(),
        )
        assert await (await inner.send()).get(timeout=15) == 7  # [2, 0] -> 2 -> [3, 4] -> 7
        # a group of chains, each with a chord inside
        deep = group(chain(add.s(i, 0), group(mul.s(2), mul.s(3)), total.s()) for i in range(1, 4))
        assert await (await deep.send()).get(timeout=15) == [5, 10, 15]


async def test_chord_refused_on_rpc(make_app: AppFactory, transport: str) -> None:
    if transport != "amqp-rpc":
        pytest.skip("rpc:// only")
    app = make_app()
    t = register(app)
    with pytest.raises(ConfigurationError, match="chord"):
        await chord([t["add"].s(1, 1)], t["total"].s()).send()
    nested = chain(t["add"].s(1, 1), group(t["add"].s(1), t["add"].s(2)), t["total"].s())
    with pytest.raises(ConfigurationError, match="chord"):
        await nested.send()


async def test_map_starmap_chunks(make_app: AppFactory, transport: str) -> None:
    app = make_app()
    t = register(app)
    add, mul = t["add"], t["mul"]

    @app.task
    def double(x: int) -> int:  # a thread task: run off the loop, one call after another
        return 2 * x

    async with app, running_worker(app):
        assert await (await double.map([1, 2, 3]).send()).get(timeout=10) == [2, 4, 6]
        assert await (await add.starmap([(1, 2), (3, 4)]).send()).get(timeout=10) == [3, 7]
        pairs = [(i, i) for i in range(7)]
        chunked = await add.chunks(pairs, 3).send()
        assert len(chunked.results) == 3  # one message per chunk
        assert await chunked.get(timeout=10) == [[0, 2, 4], [6, 8, 10], [12]]
        # in a chain: a map with its items ignores the previous result; map() takes it
        piped = await chain(add.s(1, 1), mul.starmap([(2, 3)]), double.map()).send()
        assert await piped.get(timeout=10) == [12]
        in_group = await group(add.map([]), double.map([5])).send()
        assert await in_group.get(timeout=10) == ([], [10])
        if transport != "amqp-rpc":
            summed = await (add.chunks(pairs, 4) | t["record"].s()).send()
            assert await summed.get(timeout=10) == [[[0, 2, 4, 6], [8, 10, 12]]]

        @app.task(queue="elsewhere", priority=None if transport.startswith("amqp") else 3)
        async def far(x: int) -> int:
            return -x

        far_map = far.map([1])  # goes where the task goes
        assert signature_node(far_map)["o"]["queue"] == "elsewhere"
        async with running_worker(app, queues=["elsewhere"]):
            assert await (await far_map.send()).get(timeout=10) == [-1]
        failing = await t["boom"].map([1, 2]).send()
        with pytest.raises(ValueError, match="boom 1"):
            await failing.get(timeout=10)
        with pytest.raises(ConfigurationError, match="chunk size"):
            add.chunks(pairs, 0)


def test_mypy_types_workflows_and_rejects_a_wrong_link(tmp_path: Path) -> None:
    from mypy import api

    snippet = tmp_path / "typed_flows.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from aioqueue import App, AsyncResult, FlowResult, GroupResult, chain, chord, group

            app = App("typed")

            @app.task
            async def add(x: int, y: int) -> int:
                return x + y

            @app.task
            async def show(x: int) -> str:
                return str(x)

            @app.task
            async def size(text: str) -> int:
                return len(text)

            @app.task
            async def total(values: list[int]) -> int:
                return sum(values)

            async def use() -> None:
                last: AsyncResult[int] = await chain(add.s(1, 2), show.s(), size.s()).send()
                flow: FlowResult[int] = await chain(add.s(1, 2), show.s(), size.s()).send()
                tree: dict[str, object] = await flow.tree()
                piped: AsyncResult[str] = await (add.s(1, 2) | add.s(3) | show.s()).send()
                ignoring: AsyncResult[int] = await chain(show.s(1), add.si(1, 1)).send()
                pair: GroupResult[tuple[int, str]] = await group(add.s(1, 2), show.s(3)).send()
                many: GroupResult[list[int]] = await group(add.s(i, i) for i in range(3)).send()
                joined: AsyncResult[int] = await chord(many_sigs(), total.s()).send()
                mapped: AsyncResult[list[str]] = await show.map([1, 2]).send()
                # a chain ending in a group: its handle is the group's (get() is their list)
                fan: GroupResult[list[int]] = await chain(add.s(1, 2), group(
                    add.s(i, i) for i in range(3)
                )).send()
                fanned: list[int] = await fan.get()
                tail: GroupResult[tuple[int, str]] = await (
                    add.s(1, 2) | group(add.s(1, 1), show.s(2))
                ).send()
                nested: GroupResult[list[int]] = await chain(
                    add.s(1, 2), chain(show.s(), group(add.s(i, i) for i in range(3)))
                ).send()
                piped_chain: GroupResult[list[int]] = await (
                    show.s(1) | chain(size.s(), group(add.s(i, i) for i in range(3)))
                ).send()
                only: GroupResult[tuple[int, str]] = await chain(
                    group(add.s(1, 1), show.s(2))
                ).send()
                # ending in a chord: the callback's handle
                cb: FlowResult[int] = await chain(add.s(1, 2), chord(many_sigs(), total.s())).send()
                cb2: FlowResult[int] = await (
                    add.s(1, 2) | group(add.s(i, i) for i in range(3)) | total.s()
                ).send()
                cb3: FlowResult[str] = await (chord(many_sigs(), total.s()) | show.s()).send()
                direct: FlowResult[int] = await chord(many_sigs(), total.s()).send()
                grouped: GroupResult[list[int]] = await (
                    chord(many_sigs(), total.s()) | group(add.s(i, i) for i in range(3))
                ).send()
                chain(add.s(1, 2), size.s())

            def many_sigs() -> list[object]:
                return []
            """
        )
    )
    out, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out
    assert len(errors) == 1, out
    assert 'Argument 2 to "chain" has incompatible type' in errors[0], out
    lines = [line.strip() for line in snippet.read_text().splitlines()]
    wrong = lines.index("chain(add.s(1, 2), size.s())") + 1
    assert f"typed_flows.py:{wrong}:" in errors[0], out


async def test_parent_children_and_tree(make_app: AppFactory, transport: str) -> None:
    _chords_need_redis(transport)
    app = make_app()
    t = register(app)
    add, mul, total = t["add"], t["mul"], t["total"]
    async with app, running_worker(app):
        wf = chain(
            add.s(1, 1).set(link=t["record"].s("linked")),
            group(mul.s(2), mul.s(3)),
            total.s(),
        )
        last = await wf.send()
        assert await last.get(timeout=10) == 10
        header = last.parent
        assert isinstance(header, GroupResult) and header.children == [last]
        first = header.parent
        assert first.parent is None and [await r.get(timeout=10) for r in header.results] == [4, 6]
        assert all(member.parent is first for member in header.results)
        link, group_handle = first.children
        assert group_handle is header and await link.get(timeout=10) == [2, "linked"]
        tree = await last.tree()
        assert tree == await header.tree() == await first.tree()
        assert tree["type"] == "chain"
        step1, joined = tree["children"]  # a group followed by a step is a chord
        assert joined["type"] == "chord"
        fan, join = joined["children"]
        assert step1["id"] == first.id and step1["state"] == States.SUCCESS
        assert step1["children"][0]["id"] == link.id
        assert [m["state"] for m in fan["children"]] == [States.SUCCESS] * 2
        assert join == {
            "type": "task",
            "id": last.id,
            "task": total.name,
            "state": "SUCCESS",
            "children": [],
        }
        failing = await chain(add.s(1, 1), t["boom"].s(), add.s(1)).send()
        with pytest.raises(ValueError):
            await failing.get(timeout=10)
        states = [node["state"] for node in (await failing.tree())["children"]]
        assert states == [States.SUCCESS, States.FAILURE, States.FAILURE]
        # the failure stored under the step that never ran names the step that failed
        assert (await failing.parent.get(timeout=10, propagate=False)).args == (
            await failing.get(timeout=10, propagate=False)
        ).args


async def test_chord_callback_may_take_the_errors(make_app: AppFactory, transport: str) -> None:
    _chords_need_redis(transport)
    app = make_app()
    t = register(app)
    async with app, running_worker(app):
        members = [t["add"].s(1, 1), t["boom"].s(7)]
        result = await chord(members, t["record"].s(), pass_errors=True).send()
        values, *_ = await result.get(timeout=10)
        assert values[0] == 2
        assert values[1]["state"] == States.FAILURE and values[1]["message"] == "boom 7"
        assert values[1]["type"] == "builtins.ValueError" and "Traceback" in values[1]["traceback"]


class Keep(Middleware):
    """Keeps every message the client sends (the chord's members)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def before_send(self, message: Message) -> Message | None:
        self.sent.append(message)
        return None


async def test_chord_member_retried_or_delivered_twice_counts_once(
    make_app: AppFactory, transport: str
) -> None:
    _chords_need_redis(transport)
    app = make_app()
    keep = Keep()
    app.add_middleware(keep)
    t = register(app)
    async with app, running_worker(app):
        members = [t["flaky"].s(1), t["add"].s(2, 0), t["flaky"].s(3)]
        result = await chord(members, t["record"].s("cb")).send()
        assert await result.get(timeout=10) == [[1, 2, 3], "cb"]
        assert sorted(t["tries"]) == [1, 1, 3, 3]  # each flaky member ran twice
        assert t["seen"] == [[[1, 2, 3], "cb"]]
        # A copy of a member that already settled (what a crash between a publish and its
        # ack leaves) is dropped, and does not complete the count a second time.
        broker = await app.ready_broker()
        codec = app.codec
        member = next(m for m in keep.sent if m.task == t["add"].name)
        await broker.publish(member.queue, codec.encode(member))
        if transport == "redis":  # also as a redelivery (attempt 2) after a worker died
            body = codec.encode(member)
            await broker.publish(member.queue, b'{"attempt":2,' + body[1:])
        await wait_until(lambda: _is_empty(broker, member.queue))
    # the worker drained what it held when it stopped: the copies were handled
    assert t["seen"] == [[[1, 2, 3], "cb"]]
    assert sorted(t["tries"]) == [1, 1, 3, 3]


async def _is_empty(broker: Any, queue: str) -> bool:
    return await broker.queue_length(queue) == 0


async def test_options_a_workflow_cannot_honour_are_refused(make_app: AppFactory) -> None:
    app = make_app()
    t = register(app)
    add, record = t["add"], t["record"]
    with pytest.raises(ConfigurationError, match="send_many"):
        await add.options(link=record.s()).send_many([(1, 2)])
    with pytest.raises(ConfigurationError, match="link"):
        await add.options(link=record.s()).apply(1, 2)
    with pytest.raises(ConfigurationError, match="link"):
        await app.send_task(add.name, [1, 2], link=record.s())
    with pytest.raises(ConfigurationError, match="link"):
        app.add_periodic_task(60, add.s(1, 2).set(link=record.s()))
    with pytest.raises(ConfigurationError, match="signature"):
        add.options(link="not a signature")
    with pytest.raises(ConfigurationError, match="unique_for"):
        await chain(add.s(1, 2).set(unique_for=10), add.s(1)).send()
    with pytest.raises(ConfigurationError, match="root_id"):
        await group([add.s(1, 2).set(root_id="r")]).send()
    with pytest.raises(ConfigurationError, match="task_id"):
        await chord([add.s(1, 2).set(task_id="mine")], t["total"].s()).send()
    with pytest.raises(ConfigurationError, match="callback"):
        await chord([add.s(1, 2)], group(add.s(1), add.s(2))).send()
    with pytest.raises(ConfigurationError, match="chord member"):
        await chord([group(add.s(1, 1), add.s(2, 2))], t["total"].s()).send()
    with pytest.raises(ConfigurationError, match="chain"):
        chain()
    with pytest.raises(ConfigurationError, match="signatures"):
        group([add.s(1, 1), "x"])
