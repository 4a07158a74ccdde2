"""The envelope: versioned, size-checked, and strict about what it will decode."""

from __future__ import annotations

import orjson
import pytest

from aioqueue import Message, MessageTooLarge, Outcome, ProtocolError, SerializationError, States
from aioqueue.brokers.base import attempt_of
from aioqueue.message import ENVELOPE_VERSION, MessageCodec


def make(**overrides: object) -> Message:
    fields: dict[str, object] = {
        "id": "abc",
        "task": "proj.add",
        "queue": "default",
        "args": (1, 2),
        "kwargs": {"z": [1, {"deep": True}]},
        "headers": {"retries": 0, "trace": "t"},
        "parent_id": "p",
        "root_id": "r",
        "reply_to": "chan",
        "result_ttl": 9.5,
    }
    fields.update(overrides)
    return Message(**fields)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    codec = MessageCodec()
    message = make()
    decoded = codec.decode(codec.encode(message))
    assert decoded.id == "abc" and decoded.task == "proj.add" and decoded.queue == "default"
    assert decoded.args == (1, 2) and decoded.kwargs == {"z": [1, {"deep": True}]}
    assert decoded.headers == {"retries": 0, "trace": "t"}
    assert (decoded.parent_id, decoded.root_id, decoded.reply_to) == ("p", "r", "chan")
    assert decoded.result_ttl == 9.5 and decoded.sent_at > 0


def test_envelope_is_json_with_version_first() -> None:
    body = MessageCodec().encode(make())
    assert body.startswith(b'{"v":1,')
    assert orjson.loads(body)["v"] == ENVELOPE_VERSION


def test_unknown_version_and_shapes_are_refused() -> None:
    codec = MessageCodec()
    with pytest.raises(ProtocolError, match="unknown envelope version 2"):
        codec.decode(b'{"v":2,"id":"a","task":"t","queue":"q"}')
    with pytest.raises(ProtocolError, match="not a JSON object"):
        codec.decode(b"[1,2]")
    with pytest.raises(ProtocolError, match="'task'"):
        codec.decode(b'{"v":1,"id":"a","queue":"q"}')
    with pytest.raises(SerializationError, match="not valid JSON"):
        codec.decode(b"\x00\x01garbage")
    with pytest.raises(ProtocolError, match="args must be a list"):
        codec.decode(b'{"v":1,"id":"a","task":"t","queue":"q","args":{"x":1}}')


def test_size_limit_before_sending_and_before_decoding() -> None:
    codec = MessageCodec(max_size=200)
    with pytest.raises(MessageTooLarge, match="max_message_size=200"):
        codec.encode(make(args=("x" * 500,)))
    with pytest.raises(MessageTooLarge):
        codec.decode(b"{" + b" " * 300 + b"}")


def test_unserializable_arguments_fail_at_send_time() -> None:
    with pytest.raises(SerializationError, match=r"cannot encode message for task 'proj\.add'"):
        MessageCodec().encode(make(args=(object(),)))


def test_pickle_needs_an_explicit_accept() -> None:
    sender = MessageCodec(serializer="pickle", accept_content=["pickle"])
    body = sender.encode(make(args=({1, 2},)))
    assert orjson.loads(body)["ct"] == "pickle"
    with pytest.raises(ProtocolError, match="'pickle' is not accepted"):
        MessageCodec().decode(body)
    assert sender.decode(body).args == ({1, 2},)


def test_outcome_round_trip() -> None:
    codec = MessageCodec()
    ok = codec.decode_outcome(codec.encode_outcome(Outcome("i", States.SUCCESS, {"a": 1})))
    assert ok.result == {"a": 1} and ok.ready
    failed = Outcome(
        "i",
        States.FAILURE,
        exc_type="builtins.KeyError",
        exc_message="'k'",
        exc_args=("k",),
        traceback="tb",
    )
    back = codec.decode_outcome(codec.encode_outcome(failed))
    assert (back.exc_type, back.exc_args, back.traceback) == ("builtins.KeyError", ("k",), "tb")


def test_attempt_prefix_written_by_the_redis_sweep() -> None:
    assert attempt_of(b'{"v":1}') == 1
    assert attempt_of(b'{"attempt":2,"v":1}') == 2
    assert attempt_of(b'{"attempt":17,"v":1}') == 17
    body = b'{"attempt":3,' + MessageCodec().encode(make())[1:]
    assert MessageCodec().decode(body).id == "abc"  # the prefix does not disturb decoding
