"""The message envelope and the outcome record, and how both become bytes.

Envelope, version 1 (a JSON object; absent keys mean their default)::

    v           1                 envelope version; anything else is refused
    id          str               task id (uuid4 hex unless the sender chose one)
    task        str               registered task name
    queue       str               queue the message was published to
    args        list              positional arguments   (when ct is "json")
    kwargs      object            keyword arguments      (when ct is "json")
    ct          str               serializer of args/kwargs: "json" (default) or "pickle"
    payload     str               base64 of [args, kwargs] for a non-JSON serializer
    headers     object            user headers; "retries" counts earlier tries (retries)
    eta         float | null      unix time before which the task must not run
    expires     float | null      unix time after which the task is discarded
    parent_id   str | null        id of the task that sent this one
    root_id     str | null        id of the first task of the workflow
    reply_to    str | null        channel on which the sending process waits for the outcome
    result_ttl  float | null      seconds to keep the outcome (null: the app default)
    sent_at     float             unix time of sending
    timeout     float | null      hard time limit in seconds (null: the task's own)
    soft_timeout float | null     soft time limit in seconds, async tasks only (null: the task's)
    claim       float | null      the sender claimed the id (see aioqueue.uniqueness): 0 = held
                                  until its result expires, else the unix time a unique_for
                                  window ends; null/absent: no claim, nothing to settle
    ignore_result bool            true: the worker stores and pushes no outcome (absent: false)
    priority    int | null        0 (lowest, the same as absent) to 9 (most urgent), RabbitMQ's
                                  convention; when present it is the envelope's FIRST key, so a
                                  broker reads it from the body's first bytes without decoding
                                  (``{"priority":7,...``, see :func:`priority_of`)
    wf          object | null     workflow continuation (chain steps still to send, chord
                                  membership, link / link_error, a chord callback's join): plain
                                  data, see :mod:`aioqueue.canvas.wire`; absent for a plain task

Decoding checks every field above and raises :class:`ProtocolError` naming the first bad one:
strings must be strings (``id``, ``task`` and ``queue`` non-empty), ``headers`` and ``kwargs``
objects, ``args`` a list; unix times are numbers from 0 to :data:`MAX_UNIX_TIME`, and
``result_ttl``, ``timeout`` and ``soft_timeout`` numbers above 0 and at most
:data:`MAX_RESULT_TTL` (ten years), ``ignore_result`` a boolean, ``priority`` a whole number
from 0 to 9, ``wf`` an object. Booleans are not
numbers here. Unknown keys are ignored, so a newer sender may add fields. A bad message then
fails at decode, where the worker records a FAILURE and dead-letters it, instead of crashing
the handler later and being redelivered to crash again.

The envelope itself is always JSON so any worker can read who a message is for, even one that
does not accept the payload's serializer: it can then record a precise FAILURE instead of
dropping bytes it does not understand.
"""

from __future__ import annotations

import base64
import os
import reprlib
import time
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from .errors import (
    MessageTooLarge,
    ProtocolError,
    SerializationError,
    TaskRevoked,
)
from .input_limits import Limits
from .serializers import JSON, JSON_OPTIONS, Serializer, get_serializer, json_default
from .signing import Signer, looks_signed

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_PRIORITY",
    "MAX_RESULT_TTL",
    "MAX_UNIX_TIME",
    "Message",
    "MessageCodec",
    "Outcome",
    "States",
    "is_valid_ttl",
    "new_task_id",
    "priority_of",
]


def new_task_id() -> str:
    """A random task id, the same 32 hex digits as ``uuid.uuid4().hex`` (version 4, RFC 4122
    variant), without building a UUID object: a measurable part of a lone ``send()``."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


ENVELOPE_VERSION: Final = 1
_SCAN_UP_TO: Final = 4096
"""Bodies up to this many bytes have their nesting bounded by a C count of ``[`` and ``{``
(a plain task's: a few hundred bytes, well under a microsecond); larger ones by a walk of
their parsed containers first (see Limits.check_depth), which does not read a long string."""
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
MAX_RESULT_TTL: Final = 10 * 365 * 24 * 3600.0
"""Longest result TTL (ten years, in seconds). Redis refuses a PX beyond about 9.2e18 ms less
the current time; staying far below it means a TTL we accept is a TTL every backend stores."""
MAX_UNIX_TIME: Final = 253402300799.0
"""9999-12-31T23:59:59Z, the last second a ``datetime`` holds: the bound of eta/expires/sent_at."""

MAX_PRIORITY: Final = 9
"""Highest message priority (most urgent); 0 is the lowest and what a message without one has."""
_PRIORITY_PREFIX: Final = b'{"priority":'

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40
_short.maxlevel = 2


def is_valid_ttl(value: object) -> bool:
    """True for a result TTL every backend stores: a number above 0, at most MAX_RESULT_TTL.

    The chained comparison is also False for NaN and for infinities.
    """
    return (type(value) is float or type(value) is int) and 0 < value <= MAX_RESULT_TTL


def _field_error(name: str, value: object, expected: str) -> ProtocolError:
    return ProtocolError(f"message field {name!r} must be {expected}, not {_short.repr(value)}")


def _unix_time(data: dict[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if (type(value) is float or type(value) is int) and 0 <= value <= MAX_UNIX_TIME:
        return float(value)
    raise _field_error(name, value, f"a unix time (a number from 0 to {MAX_UNIX_TIME:.0f})")


def _optional_str(data: dict[str, Any], name: str, label: str | None = None) -> str | None:
    value = data.get(name)
    if value is None or type(value) is str:
        return value
    raise _field_error(label or name, value, "a string or null")


_ABSENT: Final = object()
_TTL_EXPECTED: Final = f"a number of seconds above 0, at most {MAX_RESULT_TTL:.0f}"


def _seconds(data: dict[str, Any], name: str) -> float | None:
    """An optional duration (a time limit): a number above 0, at most ten years."""
    value = data.get(name)
    if value is None or is_valid_ttl(value):
        return value
    raise _field_error(name, value, _TTL_EXPECTED)


def priority_of(body: bytes) -> int:
    """A body's priority read from its first bytes (0 when it has none): no decode.

    The codec writes ``priority`` as the envelope's first key, so its digit is byte 12. A body
    the Redis broker stamped with an attempt (``{"attempt":N,"priority":7,...``) is read too.
    """
    if body.startswith(_PRIORITY_PREFIX):  # startswith: no copy, on every publish
        at = 12
    elif body.startswith(b'{"attempt":'):
        comma = body.find(b",", 11, 24)
        if comma < 0 or not body.startswith(_PRIORITY_PREFIX[1:], comma + 1):
            return 0
        at = comma + 12
    else:
        return 0
    digit = body[at] if len(body) > at + 1 else 0
    return digit - 48 if 48 <= digit <= 57 and body[at + 1] in b",}" else 0


def _priority(data: dict[str, Any]) -> int | None:
    value = data.get("priority")
    if value is None or (type(value) is int and 0 <= value <= MAX_PRIORITY):
        return value
    raise _field_error("priority", value, f"a whole number from 0 to {MAX_PRIORITY}")


class States:
    """Task states as strings, the same spelling Celery uses.

    RETRY: the task failed and will run again (a delayed re-send of the same id); the
    outcome carries the error, the retry count and when it is due. Not final.

    REVOKED is final like SUCCESS and FAILURE (so ``get()`` raises ``TaskRevoked`` at once): the
    task never started (it had expired when a worker took it, or was revoked), or it was
    stopped while running by ``revoke(terminate=True)``.
    """

    PENDING: Final = "PENDING"
    RECEIVED: Final = "RECEIVED"
    STARTED: Final = "STARTED"
    RETRY: Final = "RETRY"
    SUCCESS: Final = "SUCCESS"
    FAILURE: Final = "FAILURE"
    REVOKED: Final = "REVOKED"

    READY: Final = frozenset({SUCCESS, FAILURE, REVOKED})


@dataclass(slots=True)
class Message:
    """One task invocation as it travels from the sender to a worker.

    Treat it as read-only (make a changed copy with ``dataclasses.replace``, as middleware's
    ``before_send`` does). Not ``frozen``: a frozen dataclass sets each field through
    ``object.__setattr__``, which made building one per message cost 2 us; this is 4x less.
    """

    id: str
    task: str
    queue: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    eta: float | None = None
    expires: float | None = None
    parent_id: str | None = None
    root_id: str | None = None
    reply_to: str | None = None
    result_ttl: float | None = None
    sent_at: float = 0.0
    timeout: float | None = None
    soft_timeout: float | None = None
    claim: float | None = None
    ignore_result: bool = False
    priority: int | None = None
    workflow: dict[str, Any] | None = None

    @property
    def retries(self) -> int:
        value = self.headers.get("retries", 0)
        return value if isinstance(value, int) else 0


@dataclass(slots=True)
class Outcome:
    """What a task ended with: its state plus a result or an error description.

    Read-only by convention, not ``frozen``, for the same reason as :class:`Message`.
    """

    task_id: str
    state: str
    result: Any = None
    exc_type: str | None = None
    exc_message: str | None = None
    exc_args: tuple[Any, ...] = ()
    traceback: str | None = None
    date_done: float | None = None
    retries: int = 0
    """Retries the task made before this outcome (for RETRY: counting the one now due)."""
    eta: float | None = None
    """RETRY only: unix time the next try is due."""

    @property
    def ready(self) -> bool:
        return self.state in States.READY

    @classmethod
    def revoked(cls, task_id: str, reason: str) -> Outcome:
        """REVOKED for a task that never ran; its error is ``TaskRevoked(reason)``."""
        return cls(
            task_id=task_id,
            state=States.REVOKED,
            exc_type=f"{TaskRevoked.__module__}.{TaskRevoked.__qualname__}",
            exc_message=reason,
            exc_args=(reason,),
            date_done=time.time(),
        )


_OPTIONAL_FIELDS: Final = (
    "eta",
    "expires",
    "parent_id",
    "root_id",
    "reply_to",
    "result_ttl",
    "timeout",
    "soft_timeout",
)


class MessageCodec:
    """Encodes and decodes envelopes and outcomes with one app's serializer settings."""

    __slots__ = ("_accept", "_depth", "_name_length", "_serializer", "limits", "max_size", "signer")

    def __init__(
        self,
        serializer: str = "json",
        accept_content: tuple[str, ...] | list[str] = ("json",),
        max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        *,
        signer: Signer | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._serializer: Serializer = get_serializer(serializer)
        self._accept = {name: get_serializer(name) for name in accept_content}
        self.signer = signer
        """Signs every body encoded and verifies every body decoded (None: signing is off)."""
        self.limits = limits if limits is not None else Limits(max_message_size=max_size)
        self.max_size = self.limits.max_message_size
        self._depth = self.limits.max_nesting_depth
        self._name_length = self.limits.max_task_name_length

    # -- messages -----------------------------------------------------------------------

    def encode(self, message: Message) -> bytes:
        data: dict[str, Any] = {
            "v": ENVELOPE_VERSION,
            "id": message.id,
            "task": message.task,
            "queue": message.queue,
            "sent_at": message.sent_at or time.time(),
        }
        if message.priority is not None:
            # first key: brokers read it from the body's first bytes (see priority_of)
            data = {"priority": message.priority, **data}
        self._put_payload(data, [list(message.args), message.kwargs], ("args", "kwargs"))
        if message.headers:
            self.limits.check_headers(message.headers)
            data["headers"] = message.headers
        for name in _OPTIONAL_FIELDS:
            value = getattr(message, name)
            if value is not None:
                data[name] = value
        if message.claim is not None or message.ignore_result:  # one check for the rare two
            if message.claim is not None:
                data["claim"] = message.claim
            if message.ignore_result:
                data["ignore_result"] = True
        if message.workflow is not None:
            data["wf"] = message.workflow
        return self._dump_checked(data, what="message for task", task=message.task)

    def decode(self, body: bytes) -> Message:
        """The Message in ``body``; any bad field raises ProtocolError (or SerializationError)."""
        return self.decode_fields(self._load_checked(body))

    def decode_fields(self, data: dict[str, Any]) -> Message:  # noqa: C901 - one flat pass
        """Check every envelope field of an already parsed body and build the Message.

        One pass of type checks (``type(x) is str`` is cheaper than ``isinstance``, and bools
        are not numbers); nothing raises on the happy path.
        """
        get = data.get
        id_, task, queue = get("id"), get("task"), get("queue")
        if type(id_) is not str or not id_:
            raise _field_error("id", id_, "a non-empty string")
        if type(task) is not str or not task:
            raise _field_error("task", task, "a non-empty string")
        if len(task) > self._name_length:
            self.limits.check_task_name(task)
        if type(queue) is not str or not queue:
            raise _field_error("queue", queue, "a non-empty string")
        args, kwargs = self._arguments(data)
        headers = get("headers")
        if headers is None:
            headers = {}
        elif type(headers) is not dict:
            raise _field_error("headers", headers, "an object or null")
        elif headers:
            self.limits.check_headers(headers)
        result_ttl = get("result_ttl")
        if result_ttl is not None and not is_valid_ttl(result_ttl):
            raise _field_error("result_ttl", result_ttl, _TTL_EXPECTED)
        # Optional fields are checked only when present: a plain message carries none of them,
        # and a function call per absent field is most of the cost of decoding it.
        eta, expires, parent_id, root_id = (
            get("eta"),
            get("expires"),
            get("parent_id"),
            get("root_id"),
        )
        if eta is not None:
            eta = _unix_time(data, "eta")
        if expires is not None:
            expires = _unix_time(data, "expires")
        if parent_id is not None and type(parent_id) is not str:
            raise _field_error("parent_id", parent_id, "a string or null")
        if root_id is not None and type(root_id) is not str:
            raise _field_error("root_id", root_id, "a string or null")
        reply_to = get("reply_to")
        if reply_to is not None and type(reply_to) is not str:
            raise _field_error("reply_to", reply_to, "a string or null")
        timeout, soft_timeout = get("timeout"), get("soft_timeout")
        if timeout is not None:
            timeout = _seconds(data, "timeout")
        if soft_timeout is not None:
            soft_timeout = _seconds(data, "soft_timeout")
        claim, ignore_result, priority = get("claim"), get("ignore_result"), get("priority")
        if claim is not None:
            claim = _unix_time(data, "claim")
        if ignore_result is None:
            ignore_result = False
        elif type(ignore_result) is not bool:
            raise _field_error("ignore_result", ignore_result, "a boolean")
        if priority is not None:
            priority = _priority(data)
        workflow = get("wf")
        if workflow is not None and type(workflow) is not dict:
            raise _field_error("wf", workflow, "an object or null")
        return Message(
            id=id_,
            task=task,
            queue=queue,
            args=args,
            kwargs=kwargs,
            headers=headers,
            eta=eta,
            expires=expires,
            parent_id=parent_id,
            root_id=root_id,
            reply_to=reply_to,
            result_ttl=result_ttl,
            sent_at=_unix_time(data, "sent_at") or 0.0,
            timeout=timeout,
            soft_timeout=soft_timeout,
            claim=claim,
            ignore_result=ignore_result,
            priority=priority,
            workflow=workflow,
        )

    def _arguments(self, data: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        content_type = data.get("ct")
        if content_type is None or content_type == "json":
            args, kwargs = data.get("args", ()), data.get("kwargs", _ABSENT)
            if kwargs is _ABSENT:
                kwargs = {}
        else:
            args, kwargs = self._take_payload(data, content_type, 2)
        if type(args) is not list and type(args) is not tuple:
            raise _field_error("args", args, "a list")
        if type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            raise _field_error("kwargs", kwargs, "an object with string keys")
        return tuple(args), kwargs

    # -- outcomes -----------------------------------------------------------------------

    def encode_outcome(self, outcome: Outcome) -> bytes:
        data: dict[str, Any] = {
            "v": ENVELOPE_VERSION,
            "id": outcome.task_id,
            "state": outcome.state,
            "date_done": outcome.date_done,
        }
        if outcome.exc_type is not None:
            data["exc"] = {
                "type": outcome.exc_type,
                "message": outcome.exc_message,
                "args": list(outcome.exc_args),
                "traceback": outcome.traceback,
            }
        elif outcome.result is not None:
            self._put_payload(data, outcome.result, ("result",))
        if outcome.retries:
            data["retries"] = outcome.retries
        if outcome.eta is not None:
            data["eta"] = outcome.eta
        return self._dump_checked(data, what=f"result of task {outcome.task_id}")

    def decode_outcome(self, body: bytes) -> Outcome:
        """The Outcome in ``body``; a bad field raises ProtocolError (or SerializationError)."""
        data = self._load_checked(body)
        get = data.get
        task_id, state = get("id"), get("state")
        if type(task_id) is not str:
            raise _field_error("id", task_id, "a string")
        if type(state) is not str or not state:
            raise _field_error("state", state, "a non-empty string")
        date_done = _unix_time(data, "date_done")
        retries = get("retries", 0)
        if type(retries) is not int or retries < 0:
            raise _field_error("retries", retries, "a whole number of at least 0")
        eta = _unix_time(data, "eta")
        exc = get("exc")
        if exc is not None:
            return self._failure(task_id, state, date_done, exc, retries, eta)
        content_type = get("ct")
        if content_type is None or content_type == "json":
            result = get("result")
        else:
            (result,) = self._take_payload(data, content_type, 1)
        return Outcome(
            task_id=task_id,
            state=state,
            result=result,
            date_done=date_done,
            retries=retries,
            eta=eta,
        )

    @staticmethod
    def _failure(
        task_id: str,
        state: str,
        date_done: float | None,
        exc: object,
        retries: int,
        eta: float | None,
    ) -> Outcome:
        if type(exc) is not dict:
            raise _field_error("exc", exc, "an object or null")
        exc_type, args = exc.get("type"), exc.get("args")
        if type(exc_type) is not str or not exc_type:
            raise _field_error("exc.type", exc_type, "a non-empty string")
        if args is None:
            args = ()
        elif type(args) is not list:
            raise _field_error("exc.args", args, "a list or null")
        return Outcome(
            task_id=task_id,
            state=state,
            exc_type=exc_type,
            exc_message=_optional_str(exc, "message", "exc.message"),
            exc_args=tuple(args),
            traceback=_optional_str(exc, "traceback", "exc.traceback"),
            date_done=date_done,
            retries=retries,
            eta=eta,
        )

    def peek_address(self, body: bytes) -> tuple[str | None, str | None]:
        """Best-effort (task id, reply_to) of a body that failed to decode.

        With them the worker can still record the FAILURE and wake the sender's waiter.
        """
        if self.signer is not None:
            body = self.signer.strip(body)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None, None
        if not isinstance(data, dict):
            return None, None
        task_id, reply_to = data.get("id"), data.get("reply_to")
        return (
            task_id if type(task_id) is str and task_id else None,
            reply_to if type(reply_to) is str else None,
        )

    # -- helpers ------------------------------------------------------------------------

    def _put_payload(self, data: dict[str, Any], value: Any, keys: tuple[str, ...]) -> None:
        if self._serializer is JSON:
            if len(keys) == 1:
                data[keys[0]] = value
            else:
                data.update(zip(keys, value, strict=True))
            return
        data["ct"] = self._serializer.name
        data["payload"] = base64.b64encode(self._serializer.dumps(value)).decode("ascii")

    def _take_payload(self, data: dict[str, Any], content_type: object, count: int) -> Any:
        """Decode the base64 ``payload`` of a non-JSON content type: ``count`` values."""
        if type(content_type) is not str:
            raise _field_error("ct", content_type, "a string")
        serializer = self._accept.get(content_type)
        if serializer is None:
            raise ProtocolError(
                f"message field 'ct': content type {_short.repr(content_type)} is not accepted "
                f"(accept_content="
                f"{sorted(self._accept)}); refusing to decode it"
            )
        try:
            raw = base64.b64decode(data["payload"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("message field 'payload' is missing or not base64") from exc
        value = serializer.loads(raw)
        if count == 1:
            return (value,)
        if (type(value) is not list and type(value) is not tuple) or len(value) != count:
            raise ProtocolError("message field 'payload' has the wrong shape")
        return value

    def _dump_checked(self, data: dict[str, Any], *, what: str, task: str | None = None) -> bytes:
        """``what`` names the value in errors (``task``, if given, is added as ``what 'task'``:
        built only on an error, not on every message)."""
        try:
            body = orjson.dumps(data, default=json_default, option=JSON_OPTIONS)
        except TypeError as exc:
            if task is not None:
                what = f"{what} {task!r}"
            raise SerializationError(f"cannot encode {what} as JSON: {exc}") from exc
        if len(body) > self.max_size:
            if task is not None:
                what = f"{what} {task!r}"
            raise MessageTooLarge(
                f"{what} is {len(body)} bytes, over max_message_size={self.max_size}"
            )
        if self.signer is not None:
            return self.signer.sign(body)
        return body

    def _load_checked(self, body: bytes) -> dict[str, Any]:
        """Size, then the MAC (signing on), then parse, then nesting depth: in that order."""
        if len(body) > self.max_size:
            raise MessageTooLarge(f"message is {len(body)} bytes, over max_message_size")
        try:
            if self.signer is None:
                data = orjson.loads(body)
            else:
                data = orjson.loads(self.signer.verify(body))
        except orjson.JSONDecodeError as exc:
            if self.signer is None and looks_signed(body):
                raise ProtocolError(
                    "message is signed but this app has no signing_key: give every process "
                    "of the app the same signing_key"
                ) from exc
            raise SerializationError(f"message is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ProtocolError("message is not a JSON object")
        if len(body) > _SCAN_UP_TO or body.count(b"[") + body.count(b"{") > self._depth:
            # a C scan bounds a small body's depth; a large one is walked (check_depth)
            self.limits.check_depth(body, data)
        version = data.get("v")
        if type(version) is not int or version != ENVELOPE_VERSION:
            raise ProtocolError(
                f"unknown envelope version {version!r} (this aioqueue reads {ENVELOPE_VERSION})"
            )
        return data
