"""The envelope: versioned, size-checked, and strict about what it will decode."""

from __future__ import annotations

import base64
import math
import pickle

import orjson
import pytest

from aioqueue import Message, MessageTooLarge, Outcome, ProtocolError, SerializationError, States
from aioqueue.brokers.base import attempt_of
from aioqueue.message import ENVELOPE_VERSION, MAX_RESULT_TTL, MessageCodec


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
    with pytest.raises(ProtocolError, match="'args' must be a list"):
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


# -- malformed envelope fields (issue 7, item 5) -------------------------------------------

VALID: dict[str, object] = {"v": 1, "id": "a", "task": "t", "queue": "q"}

MALFORMED = [
    ("eta", "soon"),
    ("eta", -1),
    ("eta", [1]),
    ("eta", {"at": 1}),
    ("eta", True),
    ("eta", 1e300),
    ("expires", "later"),
    ("expires", -0.5),
    ("sent_at", "yesterday"),
    ("sent_at", -1),
    ("sent_at", []),
    ("sent_at", False),
    ("result_ttl", "60"),
    ("result_ttl", 0),
    ("result_ttl", -1),
    ("result_ttl", 1e300),
    ("result_ttl", True),
    ("result_ttl", [60]),
    ("reply_to", 5),
    ("reply_to", ["chan"]),
    ("reply_to", {"c": 1}),
    ("parent_id", 1),
    ("root_id", []),
    ("headers", []),
    ("headers", "x"),
    ("headers", 5),
    ("headers", False),
    ("args", {"x": 1}),
    ("args", "ab"),
    ("kwargs", []),
    ("kwargs", "k"),
    ("ct", 5),
    ("ct", ["json"]),
    ("ct", "nope"),
    ("id", ""),
    ("id", 5),
    ("task", ""),
    ("queue", None),
    ("v", True),
]


@pytest.mark.parametrize(("name", "value"), MALFORMED, ids=[f"{n}={v!r}" for n, v in MALFORMED])
def test_malformed_field_fails_decode_naming_it(name: str, value: object) -> None:
    body = orjson.dumps({**VALID, name: value})
    with pytest.raises(ProtocolError, match=repr(name) if name != "v" else "version"):
        MessageCodec().decode(body)


def test_field_errors_show_a_short_value() -> None:
    body = orjson.dumps({**VALID, "eta": "x" * 10_000})
    with pytest.raises(ProtocolError) as info:
        MessageCodec().decode(body)
    assert len(str(info.value)) < 200


def test_well_formed_optional_fields_still_decode() -> None:
    body = orjson.dumps(
        {
            **VALID,
            "eta": 1_700_000_000,
            "expires": 1_700_000_100.5,
            "sent_at": 1_699_999_999,
            "result_ttl": 1,
            "reply_to": None,
            "parent_id": "p",
            "root_id": None,
            "headers": None,
            "args": [],
            "kwargs": {},
            "attempt": 3,
            "some_future_field": {"ignored": True},
        }
    )
    message = MessageCodec().decode(body)
    assert (message.eta, message.expires, message.sent_at) == (1.7e9, 1_700_000_100.5, 1.7e9 - 1)
    assert message.result_ttl == 1 and message.headers == {} and message.parent_id == "p"
    assert MessageCodec().decode(orjson.dumps({**VALID, "result_ttl": MAX_RESULT_TTL}))


def test_payload_errors_are_protocol_or_serialization_errors() -> None:
    codec = MessageCodec(accept_content=["json", "pickle"])
    for payload in (5, "!!!not base64", base64.b64encode(b"\x80\x05garbage").decode()):
        with pytest.raises((ProtocolError, SerializationError), match=r"payload|unpickle"):
            codec.decode(orjson.dumps({**VALID, "ct": "pickle", "payload": payload}))
    shaped = base64.b64encode(pickle.dumps([(1,), {2: "non-string key"}])).decode()
    with pytest.raises(ProtocolError, match="kwargs"):
        codec.decode(orjson.dumps({**VALID, "ct": "pickle", "payload": shaped}))


def test_numbers_must_be_finite() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ProtocolError, match="'eta'"):
            MessageCodec().decode_fields({**VALID, "eta": bad})
        with pytest.raises(ProtocolError, match="'result_ttl'"):
            MessageCodec().decode_fields({**VALID, "result_ttl": bad})


def test_peek_address_needs_a_real_id() -> None:
    codec = MessageCodec()
    assert codec.peek_address(b'{"id":"","reply_to":"c"}') == (None, "c")
    assert codec.peek_address(b'{"id":"a","reply_to":5}') == ("a", None)


@pytest.mark.parametrize(
    "body",
    [
        b'{"v":1,"id":"i","state":"SUCCESS","exc":{"type":"T","args":5}}',
        b'{"v":1,"id":"i","state":"SUCCESS","exc":{"type":"T","args":"abc"}}',
        b'{"v":1,"id":"i","state":"FAILURE","exc":{"type":5}}',
        b'{"v":1,"id":"i","state":"FAILURE","exc":{"type":"T","traceback":[1]}}',
        b'{"v":1,"id":"i","state":"FAILURE","exc":[1]}',
        b'{"v":1,"id":5,"state":"SUCCESS"}',
        b'{"v":1,"id":"i","state":null}',
        b'{"v":1,"id":"i","state":"SUCCESS","date_done":"now"}',
        b'{"v":1,"id":"i","state":"SUCCESS","ct":["x"]}',
    ],
)
def test_malformed_outcome_fails_decode(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        MessageCodec().decode_outcome(body)
