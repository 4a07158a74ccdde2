"""Serializers for task arguments and results.

JSON through orjson is the wire format. Pickle exists for users who must move Python objects,
but it only ever runs when the app names it in ``accept_content``: a worker that did not opt in
refuses a pickled message instead of unpickling attacker-controlled bytes.
"""

from __future__ import annotations

import pickle
from typing import Any, Protocol

import orjson

from .errors import ConfigurationError, SerializationError

__all__ = ["JSONSerializer", "PickleSerializer", "Serializer", "get_serializer"]


class Serializer(Protocol):
    """Turns argument and result payloads into bytes and back."""

    name: str

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def json_default(obj: Any) -> Any:
    """orjson fallback for the containers it does not encode by itself."""
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


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
        try:
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"cannot pickle: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise SerializationError(f"cannot unpickle: {exc}") from exc


_SERIALIZERS: dict[str, Serializer] = {
    "json": JSONSerializer(),
    "pickle": PickleSerializer(),
}

JSON = _SERIALIZERS["json"]


def get_serializer(name: str) -> Serializer:
    """Look a serializer up by name, with a clear error for a name we do not ship."""
    try:
        return _SERIALIZERS[name]
    except KeyError:
        known = ", ".join(sorted(_SERIALIZERS))
        raise ConfigurationError(f"unknown serializer {name!r} (known: {known})") from None
