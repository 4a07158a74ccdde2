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
    headers     object            user headers; "retries" counts earlier attempts
    eta         float | null      unix time before which the task must not run
    expires     float | null      unix time after which the task is discarded
    parent_id   str | null        id of the task that sent this one
    root_id     str | null        id of the first task of the workflow
    reply_to    str | null        channel on which the sending process waits for the outcome
    result_ttl  float | null      seconds to keep the outcome (null: the app default)
    sent_at     float             unix time of sending

The envelope itself is always JSON so any worker can read who a message is for, even one that
does not accept the payload's serializer: it can then record a precise FAILURE instead of
dropping bytes it does not understand.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from .errors import MessageTooLarge, ProtocolError, SerializationError
from .serializers import JSON, JSON_OPTIONS, Serializer, get_serializer, json_default

__all__ = ["ENVELOPE_VERSION", "Message", "MessageCodec", "Outcome", "States"]

ENVELOPE_VERSION: Final = 1
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024


class States:
    """Task states as strings, the same spelling Celery uses."""

    PENDING: Final = "PENDING"
    RECEIVED: Final = "RECEIVED"
    STARTED: Final = "STARTED"
    SUCCESS: Final = "SUCCESS"
    FAILURE: Final = "FAILURE"

    READY: Final = frozenset({SUCCESS, FAILURE})


@dataclass(frozen=True, slots=True)
class Message:
    """One task invocation as it travels from the sender to a worker."""

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

    @property
    def retries(self) -> int:
        value = self.headers.get("retries", 0)
        return value if isinstance(value, int) else 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a task ended with: its state plus a result or an error description."""

    task_id: str
    state: str
    result: Any = None
    exc_type: str | None = None
    exc_message: str | None = None
    exc_args: tuple[Any, ...] = ()
    traceback: str | None = None
    date_done: float | None = None

    @property
    def ready(self) -> bool:
        return self.state in States.READY


_OPTIONAL_FIELDS: Final = (
    "eta",
    "expires",
    "parent_id",
    "root_id",
    "reply_to",
    "result_ttl",
)


class MessageCodec:
    """Encodes and decodes envelopes and outcomes with one app's serializer settings."""

    __slots__ = ("_accept", "_serializer", "max_size")

    def __init__(
        self,
        serializer: str = "json",
        accept_content: tuple[str, ...] | list[str] = ("json",),
        max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._serializer: Serializer = get_serializer(serializer)
        self._accept = {name: get_serializer(name) for name in accept_content}
        self.max_size = max_size

    # -- messages -----------------------------------------------------------------------

    def encode(self, message: Message) -> bytes:
        data: dict[str, Any] = {
            "v": ENVELOPE_VERSION,
            "id": message.id,
            "task": message.task,
            "queue": message.queue,
            "sent_at": message.sent_at or time.time(),
        }
        self._put_payload(data, [list(message.args), message.kwargs], ("args", "kwargs"))
        if message.headers:
            data["headers"] = message.headers
        for name in _OPTIONAL_FIELDS:
            value = getattr(message, name)
            if value is not None:
                data[name] = value
        return self._dump_checked(data, what=f"message for task {message.task!r}")

    def decode(self, body: bytes) -> Message:
        data = self._load_checked(body)
        for key in ("id", "task", "queue"):
            if not isinstance(data.get(key), str):
                raise ProtocolError(f"message has no valid {key!r} field")
        args, kwargs = self._take_payload(data, ("args", "kwargs"), ([], {}))
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ProtocolError("message args must be a list and kwargs an object")
        headers = data.get("headers") or {}
        if not isinstance(headers, dict):
            raise ProtocolError("message headers must be an object")
        return Message(
            id=data["id"],
            task=data["task"],
            queue=data["queue"],
            args=tuple(args),
            kwargs=kwargs,
            headers=headers,
            sent_at=float(data.get("sent_at") or 0.0),
            **{name: data.get(name) for name in _OPTIONAL_FIELDS},
        )

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
        return self._dump_checked(data, what=f"result of task {outcome.task_id}")

    def decode_outcome(self, body: bytes) -> Outcome:
        data = self._load_checked(body)
        exc = data.get("exc")
        if isinstance(exc, dict):
            return Outcome(
                task_id=str(data.get("id")),
                state=str(data.get("state")),
                exc_type=str(exc.get("type")),
                exc_message=str(exc.get("message")),
                exc_args=tuple(exc.get("args") or ()),
                traceback=exc.get("traceback"),
                date_done=data.get("date_done"),
            )
        (result,) = self._take_payload(data, ("result",), (None,))
        return Outcome(
            task_id=str(data.get("id")),
            state=str(data.get("state")),
            result=result,
            date_done=data.get("date_done"),
        )

    def peek_address(self, body: bytes) -> tuple[str | None, str | None]:
        """Best-effort (task id, reply_to) of a body that failed to decode.

        With them the worker can still record the FAILURE and wake the sender's waiter.
        """
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None, None
        if not isinstance(data, dict):
            return None, None
        task_id, reply_to = data.get("id"), data.get("reply_to")
        return (
            task_id if isinstance(task_id, str) else None,
            reply_to if isinstance(reply_to, str) else None,
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

    def _take_payload(
        self, data: dict[str, Any], keys: tuple[str, ...], defaults: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        content_type = data.get("ct", "json")
        if content_type == "json":
            return tuple(data.get(k, d) for k, d in zip(keys, defaults, strict=True))
        serializer = self._accept.get(content_type)
        if serializer is None:
            raise ProtocolError(
                f"content type {content_type!r} is not accepted (accept_content="
                f"{sorted(self._accept)}); refusing to decode it"
            )
        try:
            raw = base64.b64decode(data["payload"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("message payload is missing or not base64") from exc
        value = serializer.loads(raw)
        if len(keys) == 1:
            return (value,)
        if not isinstance(value, list | tuple) or len(value) != len(keys):
            raise ProtocolError("message payload has the wrong shape")
        return tuple(value)

    def _dump_checked(self, data: dict[str, Any], *, what: str) -> bytes:
        try:
            body = orjson.dumps(data, default=json_default, option=JSON_OPTIONS)
        except TypeError as exc:
            raise SerializationError(f"cannot encode {what} as JSON: {exc}") from exc
        if len(body) > self.max_size:
            raise MessageTooLarge(
                f"{what} is {len(body)} bytes, over max_message_size={self.max_size}"
            )
        return body

    def _load_checked(self, body: bytes) -> dict[str, Any]:
        if len(body) > self.max_size:
            raise MessageTooLarge(f"message is {len(body)} bytes, over max_message_size")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise SerializationError(f"message is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ProtocolError("message is not a JSON object")
        version = data.get("v")
        if version != ENVELOPE_VERSION:
            raise ProtocolError(
                f"unknown envelope version {version!r} (this aioqueue reads {ENVELOPE_VERSION})"
            )
        return data
