"""Serializers for task arguments and results.

JSON through orjson is the wire format. Pickle exists for users who must move Python objects,
but it only ever runs when the app names it in ``accept_content``: a worker that did not opt in
refuses a pickled message instead of unpickling attacker-controlled bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import sys
import uuid
from datetime import date, datetime, time, timedelta
from typing import Any, Protocol

import orjson

from .errors import ConfigurationError, SerializationError

__all__ = [
    "JSONSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
    "Serializer",
    "get_serializer",
    "json_default",
    "register_serializer",
    "to_plain",
]


class Serializer(Protocol):
    """Turns argument and result payloads into bytes and back."""

    name: str

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def json_default(obj: Any) -> Any:
    """orjson fallback for what it does not encode by itself: sets and tuples as lists, Decimal
    as its string, bytes as base64, timedelta as seconds, a pydantic model as its JSON dump.

    orjson writes dataclasses, datetimes, UUIDs and enums itself; the worker (and the result's
    reader) rebuilds all of these from the task's hints (see :mod:`aioqueue.typed`). Called
    only for such values, so plain JSON costs nothing more.
    """
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    decimal = sys.modules.get("decimal")  # a Decimal means decimal is imported already
    if decimal is not None and isinstance(obj, decimal.Decimal):
        return str(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, timedelta):
        return obj.total_seconds()
    pydantic = sys.modules.get("pydantic")  # a model means pydantic is imported already
    if pydantic is not None and isinstance(obj, pydantic.BaseModel):
        return obj.model_dump(mode="json")
    from .masking import Secret  # here: only reached for types orjson does not know

    if isinstance(obj, Secret):
        return obj.value  # sent as its value; the worker wraps it again (aioqueue.masking)
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def to_plain(obj: Any) -> Any:
    """``json_default`` for binary serializers (msgpack): also the types orjson writes itself
    (datetimes, UUIDs, enums, dataclasses), in the same shapes, so the same hints rebuild them."""
    if isinstance(obj, datetime | date | time):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    return json_default(obj)


class JSONSerializer:
    """orjson: fast, and cannot run code on decode."""

    name = "json"

    def dumps(self, obj: Any) -> bytes:
        try:
            return orjson.dumps(obj, default=json_default, option=JSON_OPTIONS)
        except TypeError as exc:
            raise SerializationError(f"cannot encode as JSON: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise SerializationError(f"cannot decode JSON: {exc}") from exc


class PickleSerializer:
    """Pickle, for trusted networks only; must be listed in ``accept_content`` to be decoded."""

    name = "pickle"

    def dumps(self, obj: Any) -> bytes:
        import pickle  # here: only an app that chose pickle pays for the import

        try:
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"cannot pickle: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        import pickle

        try:
            return pickle.loads(data)
        except Exception as exc:
            raise SerializationError(f"cannot unpickle: {exc}") from exc


class MsgpackSerializer:
    """msgpack (``pip install 'aioqueue[msgpack]'``): compact, bytes as they are, and like JSON
    it cannot run code on decode. Datetimes, UUIDs, Decimals, dataclasses and models are
    written in the same shapes as in JSON, so task hints rebuild them the same way."""

    name = "msgpack"

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError:
            raise ConfigurationError(
                "the msgpack serializer needs the msgpack package: pip install 'aioqueue[msgpack]'"
            ) from None
        self._msgpack = msgpack

    def dumps(self, obj: Any) -> bytes:
        try:
            data: bytes = self._msgpack.packb(obj, default=to_plain, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"cannot encode as msgpack: {exc}") from exc
        return data

    def loads(self, data: bytes) -> Any:
        try:
            return self._msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            raise SerializationError(f"cannot decode msgpack: {exc}") from exc


_SERIALIZERS: dict[str, Serializer] = {
    "json": JSONSerializer(),
    "pickle": PickleSerializer(),
}
_BUILT_ON_USE: dict[str, type[MsgpackSerializer]] = {"msgpack": MsgpackSerializer}
"""Shipped serializers with an optional dependency: made (and their import tried) on first use."""

JSON = _SERIALIZERS["json"]


def register_serializer(serializer: Serializer) -> None:
    """Make ``serializer`` usable by name: ``App(serializer=name, accept_content=[..., name])``.

    It turns task arguments and results into bytes and back (the envelope stays JSON; the
    payload rides in it as base64 with its content type). Register it in every process that
    sends or works, before the app is used. ``json`` cannot be replaced.
    """
    name = getattr(serializer, "name", None)
    if type(name) is not str or not name or name == "json":
        raise ConfigurationError(
            f"a serializer needs a name other than 'json' (a non-empty str), not {name!r}"
        )
    if not callable(getattr(serializer, "dumps", None)) or not callable(
        getattr(serializer, "loads", None)
    ):
        raise ConfigurationError(f"serializer {name!r} needs dumps(obj) and loads(data) methods")
    _SERIALIZERS[name] = serializer


def get_serializer(name: str) -> Serializer:
    """Look a serializer up by name, with a clear error for a name we do not know."""
    found = _SERIALIZERS.get(name)
    if found is not None:
        return found
    factory = _BUILT_ON_USE.get(name)
    if factory is not None:
        made = _SERIALIZERS[name] = factory()
        return made
    known = ", ".join(sorted({*_SERIALIZERS, *_BUILT_ON_USE}))
    raise ConfigurationError(
        f"unknown serializer {name!r} (known: {known}; add one with register_serializer)"
    )
