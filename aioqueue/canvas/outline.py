"""A workflow's structure without its arguments: what the ``workflow-sent`` event carries, so
a dashboard in another process can show the workflow a task belongs to.

A handle's ``tree()`` needs the structure the sending process froze; a page that only knows a
task id has none. The outline is that structure with ids and task names only (no arguments,
so nothing to mask, and no send options), cut at :data:`OUTLINE_NODES` tasks so one event stays
small whatever the size of a group: a container that lost parts says how many tasks in
``"more"``. It is a :data:`~.wire.Node` that :func:`~.results.tree_of` reads like any other.
"""

from __future__ import annotations

from typing import Any

from .wire import Node

__all__ = ["OUTLINE_NODES", "count_tasks", "outline", "outline_ids"]

OUTLINE_NODES = 500
"""Tasks an outline keeps (depth first, in order); the rest are counted, not listed."""

_PARTS = {"c": ("steps",), "g": ("members",), "ch": ("header", "body")}


def count_tasks(node: Node) -> int:
    """The tasks (signatures, with their links and errbacks) in ``node``."""
    kind = node["t"]
    if kind == "s":
        return 1 + sum(count_tasks(link) for link in [*node.get("link", ()), *node.get("err", ())])
    if kind == "ch":
        return sum(count_tasks(member) for member in node["header"]) + count_tasks(node["body"])
    return sum(count_tasks(part) for part in node["steps" if kind == "c" else "members"])


def outline(node: Node, limit: int = OUTLINE_NODES) -> tuple[Node, int]:
    """(``node``'s outline with at most ``limit`` tasks, how many tasks ``node`` has)."""
    budget = [limit]
    return _cut(node, budget), count_tasks(node)


def _cut(node: Node, budget: list[int]) -> Node:
    """The outline of ``node`` (which has room for at least its first task)."""
    kind = node["t"]
    if kind == "s":
        budget[0] -= 1
        out: Node = {"t": "s", "id": node["id"], "task": node["task"]}
        for key in ("link", "err"):
            if node.get(key):
                kept, more = _cut_list(node[key], budget)
                out[key] = kept
                out["more"] = out.get("more", 0) + more
        if not out.get("more"):
            out.pop("more", None)
        return out
    if kind == "ch":
        header, more = _cut_list(node["header"], budget)
        out = {"t": "ch", "id": node["id"], "header": header}
        if budget[0] > 0:
            out["body"] = _cut(node["body"], budget)
        else:
            more += count_tasks(node["body"])
        if more:
            out["more"] = more
        return out
    key = "steps" if kind == "c" else "members"
    kept, more = _cut_list(node[key], budget)
    out = {"t": kind, key: kept}
    if more:
        out["more"] = more
    return out


def _cut_list(nodes: list[Node], budget: list[int]) -> tuple[list[Node], int]:
    kept: list[Node] = []
    more = 0
    for each in nodes:
        if budget[0] > 0:
            kept.append(_cut(each, budget))
        else:
            more += count_tasks(each)
    return kept, more


def outline_ids(node: Any) -> list[str]:
    """Every task id of an outline read from an event, checking its shape on the way (it
    came over the wire): ValueError for anything :func:`~.results.tree_of` could not read."""
    ids: list[str] = []
    stack = [node]
    while stack:
        each = stack.pop()
        for key, part in _parts(each, ids):
            if key == "body":
                stack.append(part)
            elif isinstance(part, list):
                stack.extend(reversed(part))
            else:
                raise ValueError(f"{key!r} of a workflow node is not a list")
    return ids


def _parts(node: Any, ids: list[str]) -> list[tuple[str, Any]]:
    """The parts of one checked outline node (a task's id added to ``ids``)."""
    if not isinstance(node, dict):
        raise ValueError(f"not a workflow node: {node!r:.80}")
    kind = node.get("t")
    if type(node.get("more", 0)) is not int:
        raise ValueError(f"bad 'more' count: {node.get('more')!r:.80}")
    if kind == "s":
        if not isinstance(node.get("id"), str) or not isinstance(node.get("task"), str):
            raise ValueError(f"a task node needs an id and a task name: {node!r:.80}")
        ids.append(node["id"])
        return [(key, node.get(key, [])) for key in ("link", "err")]
    if kind not in _PARTS:
        raise ValueError(f"unknown workflow node type: {kind!r:.80}")
    keys = _PARTS[kind]
    if kind == "ch" and "body" not in node:  # cut before its callback
        keys = ("header",)
    return [(key, node.get(key)) for key in keys]
