"""Limits against abusive messages (issue 14, item 5): each bounded, each a clear dead letter."""

from __future__ import annotations

import orjson
import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import App, ConfigurationError, LimitExceeded, Limits, MessageTooLarge
from aioqueue.message import Message, MessageCodec

VALID = {"v": 1, "id": "i", "task": "t", "queue": "q"}


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_depth_is_bounded_on_decode() -> None:
    codec = MessageCodec(limits=Limits(max_nesting_depth=8))
    # envelope (1) + args list (2) + 6 more levels = 8: accepted
    assert codec.decode(orjson.dumps({**VALID, "args": [nested(5)]})).args == (nested(5),)
    with pytest.raises(LimitExceeded, match="max_nesting_depth=8"):
        codec.decode(orjson.dumps({**VALID, "args": [nested(7)]}))
    with pytest.raises(LimitExceeded, match="max_nesting_depth=8"):
        codec.decode(orjson.dumps({**VALID, "kwargs": {"a": {"b": nested(7)}}}))
    with pytest.raises(LimitExceeded, match="max_nesting_depth=8"):
        codec.decode_outcome(orjson.dumps({**VALID, "state": "SUCCESS", "result": nested(9)}))


def test_many_brackets_inside_strings_or_flat_lists_are_fine() -> None:
    codec = MessageCodec(limits=Limits(max_nesting_depth=4))
    body = orjson.dumps({**VALID, "args": ["[[[[[[[[{{{{{{", [1], [2], [3], [4], [5]]})
    assert len(codec.decode(body).args) == 6


def test_nesting_depth_is_bounded_in_large_bodies_either_way() -> None:
    """A body over 4 KiB is walked first, within a budget of elements, instead of scanned for
    brackets: a long string costs the walk nothing; a long list of numbers exhausts the budget
    and falls back to the scan. Deep nesting is refused on both paths, flat bodies pass."""
    codec = MessageCodec(limits=Limits(max_nesting_depth=8))
    long_text = "[{" * 50_000  # brackets inside a string: no nesting at all
    many = list(range(20_000))  # more elements than the walk's budget
    for padding in (long_text, many):
        ok = orjson.dumps({**VALID, "args": [padding, nested(5)]})
        assert len(ok) > 4096
        assert codec.decode(ok).args == (padding, nested(5))
        deep = orjson.dumps({**VALID, "args": [padding, nested(7)]})
        with pytest.raises(LimitExceeded, match="max_nesting_depth=8"):
            codec.decode(deep)
        outcome = orjson.dumps({**VALID, "state": "SUCCESS", "result": [padding, nested(8)]})
        with pytest.raises(LimitExceeded, match="max_nesting_depth=8"):
            codec.decode_outcome(outcome)


def test_task_name_length_is_bounded() -> None:
    codec = MessageCodec(limits=Limits(max_task_name_length=10))
    assert codec.decode(orjson.dumps({**VALID, "task": "x" * 10})).task == "x" * 10
    with pytest.raises(LimitExceeded, match="11 characters, over max_task_name_length=10"):
        codec.decode(orjson.dumps({**VALID, "task": "x" * 11}))
    app = App("names", max_task_name_length=10)
    with pytest.raises(ConfigurationError, match="max_task_name_length=10"):

        @app.task(name="a-very-long-task-name")
        async def f() -> None: ...


def test_headers_count_and_size_are_bounded_both_ways() -> None:
    codec = MessageCodec(limits=Limits(max_headers=3, max_headers_size=100))
    ok = {"a": 1, "b": 2, "c": 3}
    assert codec.decode(orjson.dumps({**VALID, "headers": ok})).headers == ok
    with pytest.raises(LimitExceeded, match="4 headers, over max_headers=3"):
        codec.decode(orjson.dumps({**VALID, "headers": {**ok, "d": 4}}))
    with pytest.raises(LimitExceeded, match="over max_headers_size=100"):
        codec.decode(orjson.dumps({**VALID, "headers": {"a": "x" * 200}}))
    with pytest.raises(LimitExceeded, match="over max_headers_size=100"):  # the sender too
        codec.encode(Message(id="i", task="t", queue="q", headers={"a": "x" * 200}))


def test_size_is_checked_before_anything_else() -> None:
    codec = MessageCodec(limits=Limits(max_message_size=50))
    with pytest.raises(MessageTooLarge):
        codec.decode(b"[" * 60)  # not even parsed


@pytest.mark.parametrize(
    "setting", ["max_nesting_depth", "max_task_name_length", "max_headers", "max_headers_size"]
)
def test_limits_are_settings_checked_when_set(setting: str) -> None:
    assert getattr(App("s", **{setting: 7}).codec.limits, setting) == 7
    with pytest.raises(ConfigurationError, match=setting):
        App("s", **{setting: 0})


async def test_messages_over_a_limit_are_dead_lettered_with_the_reason(
    make_app: AppFactory,
) -> None:
    app = make_app(max_nesting_depth=6, max_headers=2)
    ran: list[object] = []

    @app.task
    async def take(value: object) -> None:
        ran.append(value)

    async with app, running_worker(app):
        deep = await take.send(nested(10))
        with pytest.raises(Exception, match="max_nesting_depth=6"):
            await deep.get(timeout=10)
        body = orjson.dumps({**VALID, "id": "hdrs", "task": take.name, "queue": "default"})
        body = body[:-1] + b',"headers":{"a":1,"b":2,"c":3}}'
        if app.codec.signer is not None:
            body = app.codec.signer.sign(body)
        await app.broker.publish("default", body)

        async def both_dead() -> bool:
            return len(await app.broker.dead_letters("default")) == 2

        await wait_until(both_dead)
        reasons = sorted(d.reason for d in await app.broker.dead_letters("default"))
        assert reasons[0].startswith("LimitExceeded: message has 3 headers, over max_headers=2")
        assert reasons[1].startswith("LimitExceeded: message nests deeper")
        fine = await take.send([1, [2]])
        await fine.get(timeout=10)
        assert ran == [[1, [2]]]
