"""``chain``, ``group`` and ``chord``: workflows built from signatures, sent in one batch.

Nothing here runs anything: a workflow is frozen into wire data (:mod:`.wire`) with every id
chosen, its first messages are published in one round trip, and the workers send the rest
(:mod:`.flows`). ``a.s() | b.s()`` is a chain; ``group(...) | cb.s()`` a chord.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Concatenate, Generic, TypeAlias, TypeVar, overload

from typing_extensions import TypeVar as DefaultedTypeVar

from ..errors import ConfigurationError
from ..task import Signature
from .results import FlowResult, GroupResult
from .wire import Node, member_id, signature_node

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Chain", "Chord", "Group", "chain", "chord", "group", "pipe"]

R = TypeVar("R")
R1 = TypeVar("R1")
R2 = TypeVar("R2")
R3 = TypeVar("R3")
R4 = TypeVar("R4")
R5 = TypeVar("R5")

H1 = TypeVar("H1")
H2 = TypeVar("H2")
H3 = TypeVar("H3")
H4 = TypeVar("H4")
H5 = TypeVar("H5")

T = TypeVar("T")

H = DefaultedTypeVar("H", default=FlowResult[R])
"""The handle a chain's ``send()`` returns: the last step's FlowResult, or a GroupResult when
the chain ends in a group (``Chain[R]`` alone means the former)."""

Part = Any  # Signature | Chain | Group | Chord

First: TypeAlias = "Signature[..., R] | Chain[R, Any] | Group[R] | Chord[R]"
"""A workflow's first part, typed by its result."""
Step: TypeAlias = "Signature[Concatenate[T, ...], R] | Chain[R, Any] | Group[R] | Chord[R]"
"""A later part given a ``T`` (the previous result) first: a ``task.s(...)`` whose first
parameter takes a ``T`` once its other arguments are bound, or a ``task.si(...)`` (which
takes anything: it ignores it). mypy rejects a step whose first parameter does not fit."""
Tail: TypeAlias = "Signature[Concatenate[T, ...], R] | Chord[R]"
"""A last part whose handle is a FlowResult (a task, or a chord: its callback's); a group or
a chain there has overloads of its own, since they decide what ``send()`` returns."""


def _app_of(parts: Iterable[Part]) -> App:
    for part in parts:
        if isinstance(part, Signature):
            return part.app
        app = getattr(part, "app", None)
        if app is not None:
            return app  # type: ignore[no-any-return]
    raise ConfigurationError("an empty workflow has nothing to send")


def _check(part: Any, where: str) -> Part:
    if not isinstance(part, Signature | Chain | Group | Chord):
        raise ConfigurationError(
            f"{where} takes signatures (task.s(...)), chains, groups or chords, not {part!r}"
        )
    return part


def freeze(part: Part) -> Node:
    """The wire form of a workflow part, every task id chosen now."""
    if isinstance(part, Signature):
        return signature_node(part)
    if isinstance(part, Chain):
        return {"t": "c", "steps": _chain_steps(part.steps)}
    if isinstance(part, Group):
        return {"t": "g", "members": [freeze(member) for member in part.members]}
    return _chord_node(part.header.members, freeze(part.body), part.pass_errors)


def _chain_steps(steps: list[Part]) -> list[Node]:
    """The frozen steps; a group followed by a step becomes a chord on that step."""
    out: list[Node] = []
    index = 0
    while index < len(steps):
        step = steps[index]
        if isinstance(step, Group) and index + 1 < len(steps):
            out.append(_chord_node(step.members, freeze(steps[index + 1]), False))
            index += 2
        else:
            out.append(freeze(step))
            index += 1
    return out


def _chord_node(header: list[Part], body: Node, pass_errors: bool) -> Node:
    """A chord whose member ``i`` stores its result under ``<chord id>-<i>``: the callback
    finds every member's result from the chord's id and size alone, so no message carries
    the list of members (a chord of 10,000 would otherwise carry it 10,000 times)."""
    first = body
    while first["t"] == "c":
        first = first["steps"][0]
    if first["t"] != "s":
        raise ConfigurationError(
            "a chord's callback must be a task or a chain starting with one, "
            f"not a {'group' if first['t'] == 'g' else 'chord'}"
        )
    chord_id = uuid.uuid4().hex
    members: list[Node] = []
    for index, part in enumerate(header):
        member = freeze(part)
        last = member
        while last["t"] != "s":
            if last["t"] == "g":
                raise ConfigurationError(
                    "a chord member must be a task or a chain (a group inside a chord's "
                    "header has no single result); put the inner group in a chain"
                )
            last = last["steps"][-1] if last["t"] == "c" else last["body"]
        if _own_id(part):
            raise ConfigurationError(
                f"a chord member's result id is chosen by the chord: drop task_id from {part!r}"
            )
        last["id"] = member_id(chord_id, index)
        members.append(member)
    node: Node = {"t": "ch", "id": chord_id, "header": members, "body": body, "d": True}
    if pass_errors:
        node["x"] = True
    return node


def _own_id(part: Part) -> bool:
    """True when the step that gives ``part`` its result has a task_id of its own."""
    while not isinstance(part, Signature):
        part = part.steps[-1] if isinstance(part, Chain) else part.body
    return part.options.task_id is not None


class _Sendable:
    app: App | None

    def __or__(self, other: Any) -> Any:
        return pipe(self, other)

    async def send(self) -> Any:
        from .send import send_workflow

        return await send_workflow(self)


class Chain(_Sendable, Generic[R, H]):
    """Steps run one after another; each gets the previous result first (unless ``.si()``).

    ``await wf.send()`` returns the handle of the last step (for a chain ending in a group, a
    :class:`GroupResult`): its ``get()`` is the chain's result, or the failure of the step
    that failed (its id is in the error's note), the steps after it never sent.
    """

    def __init__(self, *steps: Part) -> None:
        flat: list[Part] = []
        for step in steps:
            _check(step, "chain")
            inner: list[Part] = step.steps if isinstance(step, Chain) else [step]
            flat.extend(inner)
        if not flat:
            raise ConfigurationError("chain() needs at least one step")
        self.steps: list[Part] = flat
        self.app = _app_of(flat)

    async def send(self) -> H:
        """The last step's handle: a FlowResult, or a GroupResult if the chain ends in a
        group (typed so: see ``H``)."""
        from .send import send_workflow

        return await send_workflow(self)  # type: ignore[no-any-return]

    @overload
    def __or__(self, other: Group[R2]) -> Chain[R2, GroupResult[R2]]: ...
    @overload
    def __or__(self, other: Chain[R2, H2]) -> Chain[R2, H2]: ...
    @overload
    def __or__(self, other: Tail[R, R2]) -> Chain[R2]: ...
    def __or__(self, other: Any) -> Any:
        return pipe(self, other)

    def __repr__(self) -> str:
        return " | ".join(repr(step) for step in self.steps)


class Group(_Sendable, Generic[R]):
    """Members run in parallel, sent in one round trip; ``send()`` gives a GroupResult."""

    def __init__(self, members: Iterable[Part], *, as_tuple: bool = False) -> None:
        self.members = [_check(member, "group") for member in members]
        self.as_tuple = as_tuple
        self.app = _app_of(self.members) if self.members else None

    async def send(self) -> GroupResult[R]:
        from .send import send_workflow

        return await send_workflow(self)  # type: ignore[no-any-return]

    @overload
    def __or__(self, other: Chain[R2, H2]) -> Chain[R2, H2]: ...
    @overload
    def __or__(self, other: Signature[..., R2]) -> Chain[R2]: ...
    def __or__(self, other: Any) -> Any:
        """``group(...) | callback.s()``: a chord (the callback gets the list of results)."""
        return pipe(self, other)

    def __repr__(self) -> str:
        return f"group({self.members!r})"


class Chord(_Sendable, Generic[R]):
    """A group, then ``body`` once with the list of its results (counted in the backend)."""

    def __init__(
        self, header: Group[Any] | Iterable[Part], body: Part, *, pass_errors: bool = False
    ) -> None:
        self.header = header if isinstance(header, Group) else Group(header)
        self.body = _check(body, "chord's callback")
        if not isinstance(pass_errors, bool):
            raise ConfigurationError(f"chord's pass_errors must be True or False: {pass_errors!r}")
        self.pass_errors = pass_errors
        self.app = _app_of([self.body, *self.header.members])

    async def send(self) -> FlowResult[R]:
        from .send import send_workflow

        return await send_workflow(self)  # type: ignore[no-any-return]

    @overload
    def __or__(self, other: Group[R2]) -> Chain[R2, GroupResult[R2]]: ...
    @overload
    def __or__(self, other: Chain[R2, H2]) -> Chain[R2, H2]: ...
    @overload
    def __or__(self, other: Tail[R, R2]) -> Chain[R2]: ...
    def __or__(self, other: Any) -> Any:
        return pipe(self, other)

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"


def pipe(left: Any, right: Any) -> Any:
    """``left | right``: a chain (a group followed by a step is a chord when sent)."""
    _check(right, "|")
    return Chain(left, right)


@overload
def chain(s1: Group[R1], /) -> Chain[R1, GroupResult[R1]]: ...
@overload
def chain(s1: Chain[R1, H1], /) -> Chain[R1, H1]: ...
@overload
def chain(s1: Signature[..., R1] | Chord[R1], /) -> Chain[R1]: ...
@overload
def chain(s1: First[R1], s2: Group[R2], /) -> Chain[R2, GroupResult[R2]]: ...
@overload
def chain(s1: First[R1], s2: Chain[R2, H2], /) -> Chain[R2, H2]: ...
@overload
def chain(s1: First[R1], s2: Tail[R1, R2], /) -> Chain[R2]: ...
@overload
def chain(s1: First[R1], s2: Step[R1, R2], s3: Group[R3], /) -> Chain[R3, GroupResult[R3]]: ...
@overload
def chain(s1: First[R1], s2: Step[R1, R2], s3: Chain[R3, H3], /) -> Chain[R3, H3]: ...
@overload
def chain(s1: First[R1], s2: Step[R1, R2], s3: Tail[R2, R3], /) -> Chain[R3]: ...
@overload
def chain(
    s1: First[R1], s2: Step[R1, R2], s3: Step[R2, R3], s4: Group[R4], /
) -> Chain[R4, GroupResult[R4]]: ...
@overload
def chain(
    s1: First[R1], s2: Step[R1, R2], s3: Step[R2, R3], s4: Chain[R4, H4], /
) -> Chain[R4, H4]: ...
@overload
def chain(s1: First[R1], s2: Step[R1, R2], s3: Step[R2, R3], s4: Tail[R3, R4], /) -> Chain[R4]: ...
@overload
def chain(
    s1: First[R1], s2: Step[R1, R2], s3: Step[R2, R3], s4: Step[R3, R4], s5: Group[R5], /
) -> Chain[R5, GroupResult[R5]]: ...
@overload
def chain(
    s1: First[R1], s2: Step[R1, R2], s3: Step[R2, R3], s4: Step[R3, R4], s5: Chain[R5, H5], /
) -> Chain[R5, H5]: ...
@overload
def chain(
    s1: First[R1], s2: Step[R1, R2], s3: Step[R2, R3], s4: Step[R3, R4], s5: Tail[R4, R5], /
) -> Chain[R5]: ...
@overload
def chain(
    s1: Part, s2: Part, s3: Part, s4: Part, s5: Part, s6: Part, /, *rest: Part
) -> Chain[Any, Any]: ...
def chain(*steps: Part) -> Chain[Any, Any]:
    """Run the steps in order, each given the previous result (see :class:`Chain`)."""
    return Chain(*steps)


@overload
def group(s1: Signature[Any, R1], s2: Signature[Any, R2], /) -> Group[tuple[R1, R2]]: ...
@overload
def group(
    s1: Signature[Any, R1], s2: Signature[Any, R2], s3: Signature[Any, R3], /
) -> Group[tuple[R1, R2, R3]]: ...
@overload
def group(
    s1: Signature[Any, R1],
    s2: Signature[Any, R2],
    s3: Signature[Any, R3],
    s4: Signature[Any, R4],
    /,
) -> Group[tuple[R1, R2, R3, R4]]: ...
@overload
def group(members: Iterable[Signature[Any, R]], /) -> Group[list[R]]: ...
@overload
def group(*members: Part) -> Group[Any]: ...
def group(*members: Any) -> Group[Any]:
    """Run the members in parallel: ``group(iterable)`` gets a list, ``group(a, b)`` a tuple."""
    if len(members) == 1 and not isinstance(members[0], Signature | Chain | Group | Chord):
        return Group(members[0])
    return Group(members, as_tuple=True)


def chord(
    header: Group[Any] | Iterable[Part], body: Signature[Any, R], *, pass_errors: bool = False
) -> Chord[R]:
    """Run ``header``'s members, then ``body`` with the list of their results, exactly once.

    A member that failed, was revoked or whose result expired fails the chord with
    :class:`~aioqueue.ChordError` naming it; the callback does not run. With
    ``pass_errors=True`` the callback runs anyway and finds an :class:`~aioqueue.ErrorInfo`
    (a dict) in such a member's place.
    """
    return Chord(header, body, pass_errors=pass_errors)
