"""``GroupResult`` (a group's members' handles, read together) and ``FlowResult`` (a workflow
step's handle, with its place in the workflow: ``parent``, ``children``, ``tree()``).

The structure is the one the sending process froze when it sent the workflow, so these are
known only to handles that ``send()`` returned; ``tree()`` reads every step's state (one read
per step, batched by the backend) and returns plain data a page or a log can show::

    {"type": "chain" | "group" | "chord", "children": [...]}
    {"type": "task", "id": str, "task": str, "state": str, "children": [links / errbacks]}
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ..backends.base import ReadsMany
from ..message import States
from ..result import AsyncResult
from .wire import Node

if TYPE_CHECKING:
    from ..app import App

__all__ = ["FlowResult", "GroupResult", "shape_of", "tree_of"]

R = TypeVar("R")


class GroupResult(Generic[R]):
    """The members' handles in order. Every wait is one push-woken wait per member on the
    backend's shared listener (no polling, no connection per member)."""

    __slots__ = ("as_tuple", "children", "parent", "results", "root")

    def __init__(self, results: Sequence[Any], *, as_tuple: bool = False) -> None:
        self.results: list[Any] = list(results)
        """Each member's handle: an AsyncResult, or a GroupResult for a nested group."""
        self.as_tuple = as_tuple
        self.parent: Any = None
        """The handle of the step before the group in its chain, if any."""
        self.children: list[Any] = []
        """The handles of what the group's completion sends (a chord's callback)."""
        self.root: tuple[App, Node] | None = None

    async def tree(self) -> dict[str, Any]:
        """Every node of the workflow this group belongs to, with its state (see above)."""
        if self.root is None:
            members = [member.tree() for member in self.results]
            return {"type": "group", "children": list(await asyncio.gather(*members))}
        return await tree_of(*self.root)

    async def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """The members' values in order. ``propagate=False``: a failed member's exception is
        returned in its place; else the first failure (in member order) is raised."""
        waits = [member.get(timeout=timeout, propagate=False) for member in self.results]
        values = await asyncio.gather(*waits)
        if propagate:
            for member, value in zip(self.results, values, strict=True):
                if isinstance(value, BaseException) and isinstance(member, AsyncResult):
                    raise value
        return cast(R, tuple(values) if self.as_tuple else list(values))

    async def as_completed(self, timeout: float | None = None) -> AsyncIterator[Any]:
        """Each member's value (or exception) as it finishes, first finished first."""
        waits = [member.get(timeout=timeout, propagate=False) for member in self.results]
        for next_done in asyncio.as_completed(waits):
            yield await next_done

    async def ready(self) -> bool:
        """True once every member has finished (succeeded, failed or was revoked)."""
        return all(await asyncio.gather(*(member.ready() for member in self.results)))

    async def successful(self) -> bool:
        return all(await asyncio.gather(*(member.successful() for member in self.results)))

    async def completed_count(self) -> int:
        """How many members succeeded so far."""
        done = await asyncio.gather(*(member.successful() for member in self.results))
        return sum(1 for each in done if each)

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        return f"<GroupResult of {len(self.results)}>"


class FlowResult(AsyncResult[R]):
    """An :class:`~aioqueue.AsyncResult` of a step of a workflow sent from here."""

    __slots__ = ("_children", "_parent", "root")

    def __init__(self, id: str, app: App, *, task_name: str, token: object, root: Node) -> None:
        super().__init__(id, app, task_name=task_name, token=token)
        self._parent: Any = None
        self._children: list[Any] = []
        self.root = (app, root)

    @property
    def parent(self) -> Any:
        """The handle of the step before this one (a GroupResult for a chord's callback)."""
        return self._parent

    @parent.setter
    def parent(self, handle: Any) -> None:
        self._parent = handle

    @property
    def children(self) -> list[Any]:
        """The handles of what this step sends: the next step, its links and errbacks."""
        return self._children

    async def tree(self) -> dict[str, Any]:
        """Every node of the workflow this step belongs to, with its state (see above)."""
        return await tree_of(*self.root)


async def tree_of(app: App, node: Node) -> dict[str, Any]:
    """The workflow ``node`` as plain data, with each step's current state."""
    shape, leaves = shape_of(node)
    backend = await app.ready_backend()
    if isinstance(backend, ReadsMany):  # a few MGETs, not a read per task
        decode = app.codec.decode_outcome
        raws = await backend.get_many([leaf["id"] for leaf in leaves])
        states = [decode(raw).state if raw is not None else States.PENDING for raw in raws]
    else:
        states = await asyncio.gather(*(app.AsyncResult(leaf["id"]).state() for leaf in leaves))
    for leaf, state in zip(leaves, states, strict=True):
        leaf["state"] = state
    return shape


def shape_of(node: Node) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the workflow ``node`` as :func:`tree_of` returns it, every state PENDING; its task
    nodes, whose states a caller fills in). A node of an outline (see :mod:`.outline`) that
    lost parts keeps its ``"more"`` count of the tasks left out."""
    leaves: list[dict[str, Any]] = []
    return _shape(node, leaves), leaves


def _shape(node: Node, leaves: list[dict[str, Any]]) -> dict[str, Any]:
    kind = node["t"]
    out: dict[str, Any]
    if kind == "s":
        links = [*node.get("link", ()), *node.get("err", ())]
        out = {
            "type": "task",
            "id": node["id"],
            "task": node["task"],
            "state": States.PENDING,
            "children": [_shape(link, leaves) for link in links],
        }
        leaves.append(out)
    elif kind == "c":
        out = {"type": "chain", "children": [_shape(step, leaves) for step in node["steps"]]}
    elif kind == "g":
        out = {"type": "group", "children": [_shape(m, leaves) for m in node["members"]]}
    else:
        header = {"type": "group", "children": [_shape(m, leaves) for m in node["header"]]}
        body = [_shape(node["body"], leaves)] if "body" in node else []
        out = {"type": "chord", "children": [header, *body]}
    if node.get("more"):
        out["more"] = node["more"]
    return out
