"""Property tests: whatever bytes arrive, decoding yields a Message/Outcome or our own error.

A worker decodes bodies that anyone with access to the queue can push. Anything other than an
``AioQueueError`` escaping ``decode`` would crash the handler instead of dead-lettering the
message, so these throw arbitrary bytes and arbitrary JSON values at every envelope field.
"""

from __future__ import annotations

import base64
import contextlib
import pickle
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioqueue import AioQueueError, Message, Outcome
from aioqueue.message import MessageCodec

pytestmark = pytest.mark.timeout(120)

FAST = settings(max_examples=200, deadline=None, database=None)

ENVELOPE_FIELDS = (
    "v",
    "id",
    "task",
    "queue",
    "args",
    "kwargs",
    "ct",
    "payload",
    "headers",
    "eta",
    "expires",
    "parent_id",
    "root_id",
    "reply_to",
    "result_ttl",
    "sent_at",
)
OUTCOME_FIELDS = ("v", "id", "state", "date_done", "exc", "result", "ct", "payload")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Values a real sender writes, so the generated objects often get past the first checks.
plausible: dict[str, st.SearchStrategy[Any]] = {
    "v": st.just(1),
    "id": st.just("i"),
    "task": st.just("t"),
    "queue": st.just("q"),
    "state": st.sampled_from(["SUCCESS", "FAILURE"]),
    "ct": st.sampled_from(["json", "pickle"]),
}


def envelopes(fields: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects whose fields are absent, plausible or any JSON value.

    The fields a real envelope always has are present and mostly plausible, so most examples
    get past the first checks and reach the later fields.
    """
    always = {name for name in ("v", "id", "task", "queue", "state") if name in fields}

    def value(name: str) -> st.SearchStrategy[Any]:
        if name in always:
            return st.one_of(plausible[name], plausible[name], plausible[name], json_values)
        return st.one_of(plausible.get(name, json_values), json_values)

    return st.fixed_dictionaries(
        {name: value(name) for name in fields if name in always},
        optional={name: value(name) for name in fields if name not in always},
    )


VALID_MESSAGE = {"v": 1, "id": "i", "task": "t", "queue": "q"}
VALID_OUTCOME = {"v": 1, "id": "i", "state": "SUCCESS"}


def check_decode(codec: MessageCodec, body: bytes) -> None:
    with contextlib.suppress(AioQueueError):
        assert isinstance(codec.decode(body), Message)


def check_decode_outcome(codec: MessageCodec, body: bytes) -> None:
    with contextlib.suppress(AioQueueError):
        assert isinstance(codec.decode_outcome(body), Outcome)


CODECS = [MessageCodec(), MessageCodec(accept_content=["json", "pickle"])]


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_our_error(body: bytes) -> None:
    for codec in CODECS:
        check_decode(codec, body)
        check_decode_outcome(codec, body)


@FAST
@given(envelopes(ENVELOPE_FIELDS))
def test_any_field_values_decode_or_raise_our_error(data: dict[str, Any]) -> None:
    body = orjson.dumps(data)
    for codec in CODECS:
        check_decode(codec, body)


@FAST
@given(st.sampled_from(ENVELOPE_FIELDS), json_values)
def test_one_bad_field_in_a_valid_envelope(name: str, value: Any) -> None:
    body = orjson.dumps({**VALID_MESSAGE, name: value})
    for codec in CODECS:
        check_decode(codec, body)


@FAST
@given(st.sampled_from(OUTCOME_FIELDS), json_values)
def test_one_bad_field_in_a_valid_outcome(name: str, value: Any) -> None:
    body = orjson.dumps({**VALID_OUTCOME, name: value})
    for codec in CODECS:
        check_decode_outcome(codec, body)


@FAST
@given(envelopes(OUTCOME_FIELDS))
def test_any_outcome_field_values_decode_or_raise_our_error(data: dict[str, Any]) -> None:
    body = orjson.dumps(data)
    for codec in CODECS:
        check_decode_outcome(codec, body)


@FAST
@given(
    st.fixed_dictionaries(
        {"type": json_values, "message": json_values, "args": json_values, "traceback": json_values}
    )
)
def test_any_exception_record_decodes_or_raises_our_error(exc: dict[str, Any]) -> None:
    body = orjson.dumps({"v": 1, "id": "i", "state": "FAILURE", "exc": exc})
    for codec in CODECS:
        check_decode_outcome(codec, body)


@FAST
@given(st.binary(max_size=200) | st.builds(lambda v: pickle.dumps(v), json_values))
def test_any_pickled_payload_decodes_or_raises_our_error(raw: bytes) -> None:
    payload = base64.b64encode(raw).decode()
    message = orjson.dumps(
        {"v": 1, "id": "i", "task": "t", "queue": "q", "ct": "pickle", "payload": payload}
    )
    outcome = orjson.dumps(
        {"v": 1, "id": "i", "state": "SUCCESS", "ct": "pickle", "payload": payload}
    )
    check_decode(CODECS[1], message)
    check_decode_outcome(CODECS[1], outcome)


@pytest.mark.parametrize("field", ["args", "kwargs", "headers", "eta", "result", "exc"])
def test_deeply_nested_json_is_refused_cleanly(field: str) -> None:
    depth = 10_000
    nested = b"[" * depth + b"]" * depth
    head = b'{"v":1,"id":"i","task":"t","queue":"q","state":"SUCCESS","'
    body = head + field.encode() + b'":' + nested + b"}"
    for codec in CODECS:
        with pytest.raises(AioQueueError):
            codec.decode(body)
        with pytest.raises(AioQueueError):
            codec.decode_outcome(body)
