"""Typed arguments and results: pydantic models, dataclasses, datetime, Decimal, UUID, bytes.

JSON carries strings, numbers, lists and objects. A task whose hints ask for more
(``order: Order``, ``at: datetime``, ``-> Receipt``) gets its arguments rebuilt and checked from
those hints on the worker, and its result rebuilt from the return annotation where it is read
(``await result.get()``), so what type-checks in ``send`` arrives as the same type.

On the way out, :func:`~aioqueue.serializers.json_default` writes these values as JSON (orjson
already writes dataclasses, datetimes, UUIDs and enums; Decimal becomes its string, bytes its
base64, a pydantic model ``model_dump(mode="json")``).

The plan is made once per task, when it is registered: :func:`plan` returns ``None`` for a hint
whose values JSON carries as they are (``str``, ``int``, ``float``, ``bool``, ``None``, ``Any``,
``list``/``dict`` of those), so a task with plain hints costs exactly what it did (one
attribute check per run). A hint this module does not know (a class of your own that is none of
the above) is passed through as decoded, as before.

pydantic is not a dependency: a model hint means pydantic is already imported.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import enum
import inspect
import sys
import types
import typing
import uuid
from collections import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from decimal import Decimal

__all__ = ["ArgumentPlan", "Convert", "plan", "plan_arguments", "plan_result"]

Convert = Callable[[Any], Any]
"""Rebuilds one decoded JSON value as the hinted type; raises ValueError or TypeError."""

_PLAIN: frozenset[Any] = frozenset({str, int, float, bool, type(None), None, object, Any})
_LISTS = {list, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection}
_DICTS = {dict, abc.Mapping, abc.MutableMapping}
_SETS = {set: set, frozenset: frozenset, abc.Set: frozenset, abc.MutableSet: set}


def _kind(value: Any) -> str:
    return type(value).__name__


def _datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if type(value) is str:
        return dt.datetime.fromisoformat(value)
    raise TypeError(f"expected an ISO 8601 datetime string, got {_kind(value)}")


def _date(value: Any) -> dt.date:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if type(value) is str:
        return dt.date.fromisoformat(value)
    raise TypeError(f"expected an ISO 8601 date string, got {_kind(value)}")


def _time(value: Any) -> dt.time:
    if isinstance(value, dt.time):
        return value
    if type(value) is str:
        return dt.time.fromisoformat(value)
    raise TypeError(f"expected an ISO 8601 time string, got {_kind(value)}")


def _timedelta(value: Any) -> dt.timedelta:
    if isinstance(value, dt.timedelta):
        return value
    if type(value) in (int, float):
        return dt.timedelta(seconds=value)
    raise TypeError(f"expected seconds as a number, got {_kind(value)}")


def _decimal(value: Any) -> Decimal:
    from decimal import Decimal, InvalidOperation  # only planned for a Decimal hint (see plan)

    if isinstance(value, Decimal):
        return value
    if type(value) in (str, int, float):
        try:
            return Decimal(str(value))
        except InvalidOperation:
            raise ValueError(f"not a decimal number: {value!r}") from None
    raise TypeError(f"expected a decimal string, got {_kind(value)}")


def _uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if type(value) is str:
        return uuid.UUID(value)
    raise TypeError(f"expected a UUID string, got {_kind(value)}")


def _bytes(value: Any) -> bytes:
    if type(value) is bytes:  # a binary serializer (msgpack) carries bytes as they are
        return value
    if type(value) is str:
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError("expected base64 text") from None
    raise TypeError(f"expected base64 text, got {_kind(value)}")


def _bytearray(value: Any) -> bytearray:
    return bytearray(_bytes(value))


_SCALARS: dict[Any, Convert] = {
    dt.datetime: _datetime,
    dt.date: _date,
    dt.time: _time,
    dt.timedelta: _timedelta,
    uuid.UUID: _uuid,
    bytes: _bytes,
    bytearray: _bytearray,
}


def _decimal_plan(hint: Any) -> Convert | None:
    """``_decimal`` for a Decimal hint. Looked up without importing :mod:`decimal`: a module
    whose hint names Decimal imported it already, and a worker that never sees one saves it."""
    decimal = sys.modules.get("decimal")
    return _decimal if decimal is not None and hint is decimal.Decimal else None


def _is_pydantic_model(hint: type) -> bool:
    pydantic = sys.modules.get("pydantic")  # a model hint means pydantic is imported already
    return pydantic is not None and issubclass(hint, pydantic.BaseModel)


def plan(hint: Any) -> Convert | None:  # noqa: C901 - one flat dispatch over hint shapes
    """How to rebuild a value of ``hint`` from JSON; None when JSON already gives it."""
    try:
        if hint in _PLAIN or hint is inspect.Parameter.empty:
            return None
    except TypeError:  # unhashable (Annotated with unhashable metadata): not plain
        pass
    if isinstance(hint, typing.NewType):
        return plan(hint.__supertype__)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return plan(args[0])
    if origin is typing.Literal:
        return None
    if origin is typing.Union or origin is types.UnionType:
        return _union(args)
    if origin in _LISTS:
        return _list_of(plan(args[0])) if args else None
    if origin is tuple or hint is tuple:
        return _tuple_of(args)
    if origin in _DICTS:
        return _dict_of(args)
    if origin in _SETS or hint in _SETS:
        item = plan(args[0]) if args else None
        return _set_of(_SETS[origin or hint], item)
    if not isinstance(hint, type):
        return None
    scalar = _SCALARS.get(hint) or _decimal_plan(hint)
    if scalar is not None:
        return scalar
    if issubclass(hint, enum.Enum):
        return _enum(hint)
    if dataclasses.is_dataclass(hint):
        return _DataclassConvert(hint)
    if _is_pydantic_model(hint):
        return _model(hint)
    return None


def _union(members: tuple[Any, ...]) -> Convert | None:
    plans = [(member, plan(member)) for member in members]
    if all(convert is None for _, convert in plans):
        return None
    optional = type(None) in members

    def convert(value: Any) -> Any:
        if value is None and optional:
            return None
        errors = []
        for member, member_plan in plans:
            if member is type(None):
                continue
            if member_plan is None:
                if member in _PLAIN or isinstance(value, member):
                    return value
                continue
            try:
                return member_plan(value)
            except (ValueError, TypeError) as exc:
                errors.append(f"{getattr(member, '__name__', member)}: {exc}")
        raise TypeError(f"fits none of the union's types ({'; '.join(errors) or _kind(value)})")

    return convert


def _list_of(item: Convert | None) -> Convert | None:
    if item is None:
        return None

    def convert(value: Any) -> list[Any]:
        if type(value) is not list and type(value) is not tuple:
            raise TypeError(f"expected a list, got {_kind(value)}")
        return [item(element) for element in value]

    return convert


def _tuple_of(args: tuple[Any, ...]) -> Convert:
    """JSON has no tuple: a list comes back as one (each item rebuilt too)."""
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item = plan(args[0]) if args else None

        def convert_any(value: Any) -> tuple[Any, ...]:
            if type(value) is not list and type(value) is not tuple:
                raise TypeError(f"expected a list, got {_kind(value)}")
            return tuple(value) if item is None else tuple(item(element) for element in value)

        return convert_any
    items = [plan(arg) for arg in args]

    def convert_fixed(value: Any) -> tuple[Any, ...]:
        if type(value) is not list and type(value) is not tuple:
            raise TypeError(f"expected a list, got {_kind(value)}")
        if len(value) != len(items):
            raise ValueError(f"expected {len(items)} items, got {len(value)}")
        return tuple(v if c is None else c(v) for c, v in zip(items, value, strict=True))

    return convert_fixed


def _dict_of(args: tuple[Any, ...]) -> Convert | None:
    key = plan(args[0]) if args else None
    value_plan = plan(args[1]) if len(args) > 1 else None
    if key is None and value_plan is None:
        return None

    def convert(value: Any) -> dict[Any, Any]:
        if type(value) is not dict:
            raise TypeError(f"expected an object, got {_kind(value)}")
        return {
            (k if key is None else key(k)): (v if value_plan is None else value_plan(v))
            for k, v in value.items()
        }

    return convert


def _set_of(kind: type, item: Convert | None) -> Convert:
    def convert(value: Any) -> Any:
        if not isinstance(value, list | tuple | set | frozenset):  # sets: a binary serializer
            raise TypeError(f"expected a list, got {_kind(value)}")
        return kind(value if item is None else map(item, value))

    return convert


def _enum(kind: type[enum.Enum]) -> Convert:
    def convert(value: Any) -> enum.Enum:
        return value if isinstance(value, kind) else kind(value)

    return convert


def _model(kind: type) -> Convert:
    pydantic = sys.modules["pydantic"]

    def convert(value: Any) -> Any:
        if isinstance(value, kind):
            return value
        try:
            return kind.model_validate(value)  # type: ignore[attr-defined]
        except pydantic.ValidationError as exc:
            raise ValueError(str(exc)) from None

    return convert


class _DataclassConvert:
    """A dataclass from its JSON object, each field rebuilt from its own hint (planned on first
    use, so a dataclass that refers to itself works)."""

    __slots__ = ("_fields", "kind")

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self._fields: dict[str, Convert | None] | None = None

    def _plan(self) -> dict[str, Convert | None]:
        try:
            hints = typing.get_type_hints(self.kind)
        except Exception:  # an unresolvable forward reference: its fields pass as decoded
            hints = {}
        return {
            field.name: plan(hints.get(field.name, Any))
            for field in dataclasses.fields(self.kind)
            if field.init
        }

    def __call__(self, value: Any) -> Any:
        if isinstance(value, self.kind):
            return value
        if type(value) is not dict:
            raise TypeError(f"expected an object for {self.kind.__name__}, got {_kind(value)}")
        fields = self._fields
        if fields is None:
            fields = self._fields = self._plan()
        unknown = value.keys() - fields.keys()
        if unknown:
            raise ValueError(f"{self.kind.__name__} has no field(s) {sorted(unknown)}")
        return self.kind(
            **{
                name: raw if (convert := fields[name]) is None else convert(raw)
                for name, raw in value.items()
            }
        )


@dataclass(frozen=True, slots=True)
class ArgumentPlan:
    """Which of a task's parameters need rebuilding (only those), by position and by name."""

    positional: tuple[tuple[str, Convert | None], ...]
    var_positional: Convert | None
    by_name: dict[str, Convert]
    var_keyword: Convert | None

    def apply(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments rebuilt; ValueError naming the parameter when one does not fit.
        Arguments that do not bind at all are left as they are (binding reports them)."""
        out = list(args)
        positional = self.positional
        for index, value in enumerate(args):
            if index < len(positional):
                name, convert = positional[index]
            else:
                name, convert = "*args", self.var_positional
            if convert is not None:
                out[index] = _checked(name, convert, value)
        new_kwargs = kwargs
        if kwargs:
            new_kwargs = {}
            for name, value in kwargs.items():
                convert = self.by_name.get(name, self.var_keyword)
                new_kwargs[name] = value if convert is None else _checked(name, convert, value)
        return tuple(out), new_kwargs


def _checked(name: str, convert: Convert, value: Any) -> Any:
    try:
        return convert(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"argument {name!r}: {exc}") from None


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The resolved hints; when some cannot be resolved (a name imported under TYPE_CHECKING,
    a class local to a function), each of the others still is, and those pass as decoded."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:
        pass
    target = inspect.unwrap(fn)
    namespace = getattr(target, "__globals__", {})
    hints = {}
    for name, annotation in getattr(target, "__annotations__", {}).items():
        try:  # evaluated in the function's module, as get_type_hints does
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
        except Exception:
            continue
    return hints


def plan_arguments(fn: Callable[..., Any], signature: inspect.Signature) -> ArgumentPlan | None:
    """The task's argument plan, or None when every parameter is plain JSON (no cost)."""
    hints = _hints(fn)
    positional: list[tuple[str, Convert | None]] = []
    by_name: dict[str, Convert] = {}
    var_positional = var_keyword = None
    for parameter in signature.parameters.values():
        convert = plan(hints.get(parameter.name, Any))
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            var_positional = convert
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = convert
        else:
            if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
                positional.append((parameter.name, convert))
            if convert is not None and parameter.kind is not inspect.Parameter.POSITIONAL_ONLY:
                by_name[parameter.name] = convert
    plain = all(convert is None for _, convert in positional)
    if plain and var_positional is None and var_keyword is None and not by_name:
        return None
    return ArgumentPlan(tuple(positional), var_positional, by_name, var_keyword)


def plan_result(fn: Callable[..., Any]) -> Convert | None:
    """How to rebuild the task's result from its return annotation (None: as decoded)."""
    return plan(_hints(fn).get("return", Any))
