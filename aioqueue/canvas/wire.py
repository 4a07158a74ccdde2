"""Workflows as plain data: the nodes a message's ``wf`` field carries, and the messages they
become.

A node is a JSON object::

    {"t": "s", "id": str, "task": str, "args": [...], "kwargs": {...},
     "i": bool (immutable), "o": {send options}, "link": [node], "err": [node]}   a signature
    {"t": "c", "steps": [node, ...]}                                              a chain
    {"t": "g", "members": [node, ...]}                                            a group
    {"t": "ch", "id": str, "header": [node, ...], "body": node, "x": bool,
     "d": bool}                                                                    a chord ("x":
        its callback gets members' errors; "d": member i's result id is "<id>-<i>", else the
        callback's "join" lists them: a chord made on a worker from a group followed by a step)

Every signature has its id before anything is sent, so a handle on a step not yet sent (a
chain's last step, a chord's callback) exists from the start, and a step re-sent after a crash
is the same task id (its outcome is stored once). A message's ``wf`` says what follows it::

    next    [node]  what to send, in order, once it succeeds (the rest of its chain)
    member  {"id", "n", "body", "next", "x", "members"?}  it ends a member of chord "id" of "n"
            members; "body" and "next" are what the member completing the count sends
    join    {"id", "n", "i", "x", "members"?}  it is a chord callback: the members' results
            come first in its arguments (not with "i"; with "x", a failed member's ErrorInfo
            in its place)
    link    [node]  sent with its result when it succeeds
    err     [node]  sent with (its id, ErrorInfo) when it fails for good or is revoked
    r       str     the sender's reply address, kept for every message the workflow sends
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..message import Message
from ..task import NO_SEND_OPTIONS, SendOptions, Signature

if TYPE_CHECKING:
    from ..app import App

__all__ = [
    "NO_INPUT",
    "Launch",
    "all_ids",
    "launch",
    "member_id",
    "member_ids",
    "result_ids",
    "signature_node",
]

Node = dict[str, Any]
NO_INPUT: Any = object()
"""``prev`` for a node that gets no previous result (the first step of a workflow)."""

_PLAIN_OPTIONS = ("queue", "result_ttl", "timeout", "soft_timeout", "priority", "countdown")


def _wire_options(sig: Signature[Any, Any]) -> dict[str, Any]:
    """The signature's send options as wire data; those a workflow cannot honour refused."""
    options = sig.options
    if options is NO_SEND_OPTIONS and sig.task is not None:
        return {}
    for refused in ("unique_for", "ignore_result", "parent_id", "root_id"):
        if getattr(options, refused):
            raise ConfigurationError(
                f"{sig!r}: send option {refused} does not go with a workflow (its steps pass "
                "their results on, under the ids the workflow chose, and its first step is "
                "the root of the others)"
            )
    wire: dict[str, Any] = {
        name: getattr(options, name)
        for name in _PLAIN_OPTIONS
        if getattr(options, name) is not None
    }
    if sig.task is None:  # by name, or a map: where it goes is not in this registry
        if sig.queue is not None and options.queue is None:
            wire["queue"] = sig.queue
        if sig.priority is not None and options.priority is None:
            wire["priority"] = sig.priority
    if options.headers:
        wire["headers"] = options.headers
    if options.eta is not None:
        wire["eta"] = options.eta.timestamp()
    if options.expires is not None:
        expires = options.expires
        wire["expires"] = (
            expires.timestamp() if isinstance(expires, datetime) else time.time() + expires
        )
    return wire


def signature_node(sig: Signature[Any, Any]) -> Node:
    """The signature as wire data with a fresh id; its ``link`` / ``link_error`` nested."""
    options = sig.options
    wire = _wire_options(sig)
    node: Node = {
        "t": "s",
        "id": options.task_id or os.urandom(16).hex(),
        "task": sig.name,
        "args": list(sig.args),
        "kwargs": sig.kwargs,
    }
    if sig.immutable:
        node["i"] = True
    if wire:
        node["o"] = wire
    if options.link:
        node["link"] = [signature_node(link) for link in options.link]
    if options.link_error:
        node["err"] = [signature_node(link) for link in options.link_error]
    return node


def _send_options(wire: dict[str, Any] | None) -> SendOptions:
    if not wire:
        return NO_SEND_OPTIONS
    eta = wire.get("eta")
    expires = wire.get("expires")
    return SendOptions(
        queue=wire.get("queue"),
        headers=wire.get("headers") or {},
        result_ttl=wire.get("result_ttl"),
        timeout=wire.get("timeout"),
        soft_timeout=wire.get("soft_timeout"),
        priority=wire.get("priority"),
        countdown=wire.get("countdown"),
        eta=None if eta is None else datetime.fromtimestamp(eta, UTC),
        expires=None if expires is None else datetime.fromtimestamp(expires, UTC),
    )


def result_ids(node: Node) -> list[str]:
    """The ids whose outcomes are the node's result: one, or a group's members in order."""
    kind = node["t"]
    if kind == "s":
        return [node["id"]]
    if kind == "c":
        return result_ids(node["steps"][-1])
    if kind == "ch":
        return result_ids(node["body"])
    return [rid for member in node["members"] for rid in result_ids(member)]


def all_ids(nodes: list[Node]) -> list[str]:
    """Every task id the nodes would send (links aside): where a failure before them goes."""
    ids: list[str] = []
    for node in nodes:
        kind = node["t"]
        if kind == "s":
            ids.append(node["id"])
        elif kind == "c":
            ids.extend(all_ids(node["steps"]))
        elif kind == "g":
            ids.extend(all_ids(node["members"]))
        else:
            ids.extend(all_ids(node["header"]))
            ids.extend(all_ids([node["body"]]))
    return ids


@dataclass(slots=True)
class Launch:
    """The messages a node (and what follows it) becomes; built first, published together."""

    app: App
    reply_to: str | None
    root_id: str | None
    parent_id: str | None
    messages: list[Message] = field(default_factory=list)

    def node(
        self,
        node: Node,
        prev: Any,
        rest: list[Node],
        member: dict[str, Any] | None,
    ) -> None:
        """Send ``node`` (given ``prev``, the previous result, unless NO_INPUT); ``rest`` is
        what follows it; ``member``: it ends a member of that chord."""
        kind = node["t"]
        if kind == "s":
            self.messages.append(self.message(node, prev, rest, member, None))
        elif kind == "c":
            steps = node["steps"]
            self.node(steps[0], prev, [*steps[1:], *rest], member)
        elif kind == "g":
            if rest:  # a group followed by anything is a chord on what follows
                chord = {"t": "ch", "id": uuid.uuid4().hex, "header": node["members"]}
                self.node({**chord, "body": rest[0]}, prev, rest[1:], member)
                return
            for each in node["members"]:
                self.node(each, prev, [], member)
        else:
            self.chord(node, prev, rest, member)

    def chord(self, node: Node, prev: Any, rest: list[Node], member: dict[str, Any] | None) -> None:
        header = node["header"]
        if not header:  # nothing to wait for: the callback gets the empty list now
            self.node(node["body"], [], rest, member)
            return
        join = {"id": node["id"], "n": len(header), "body": node["body"], "next": rest}
        if not node.get("d"):  # made here, its members' ids not derived from the chord's
            join["members"] = [result_ids(each)[0] for each in header]
        if node.get("x"):
            join["x"] = True
        if member is not None:
            join["member"] = member
        for each in header:
            if each["t"] == "g" or len(result_ids(each)) != 1:
                raise ConfigurationError(
                    "a chord member must be a task or a chain (a group inside a chord's "
                    "header has no single result); put the inner group in a chain"
                )
            self.node(each, prev, [], join)

    def message(
        self,
        node: Node,
        prev: Any,
        rest: list[Node],
        member: dict[str, Any] | None,
        join: dict[str, Any] | None,
    ) -> Message:
        args = tuple(node["args"])
        if prev is not NO_INPUT and not node.get("i"):
            args = (prev, *args)
        app = self.app
        task = app.tasks.get(node["task"])
        options = _send_options(node.get("o"))
        message = app._build_message(  # no claim: the id is the workflow's own
            node["task"],
            task.queue if task is not None else None,
            args,
            node["kwargs"],
            options,
            self.reply_to,
            task.priority if task is not None else None,
            message_id=node["id"],
        )
        message.parent_id = self.parent_id
        message.root_id = self.root_id or node["id"]
        workflow: dict[str, Any] = {}
        if rest:
            workflow["next"] = rest
        if member is not None:
            workflow["member"] = member
        if join is not None:
            workflow["join"] = join
        if "link" in node:
            workflow["link"] = node["link"]
        if "err" in node:
            workflow["err"] = node["err"]
        if workflow:
            if self.reply_to is not None:
                workflow["r"] = self.reply_to
            message.workflow = workflow
        return message


def launch(
    app: App,
    node: Node,
    prev: Any,
    rest: list[Node],
    member: dict[str, Any] | None,
    *,
    reply_to: str | None,
    root_id: str | None = None,
    parent_id: str | None = None,
) -> list[Message]:
    """The messages that start ``node`` (see :class:`Launch`)."""
    built = Launch(app, reply_to, root_id, parent_id)
    built.node(node, prev, rest, member)
    return built.messages


def member_id(chord_id: str, index: int) -> str:
    """The result id of a chord's member ``index`` (see ``nodes._chord_node``)."""
    return f"{chord_id}-{index}"


def member_ids(join: dict[str, Any]) -> list[str]:
    """The result ids of a chord callback's members, in order."""
    members = join.get("members")
    if members is not None:
        return list(members)
    return [member_id(join["id"], index) for index in range(join["n"])]


def callback_message(
    app: App, join: dict[str, Any], *, reply_to: str | None, root_id: str | None
) -> list[Message]:
    """The messages a completed chord sends: its body, told which members to read."""
    body = join["body"]
    built = Launch(app, reply_to, root_id, None)
    rest = join["next"]
    member = join.get("member")
    first = body
    while first["t"] == "c":  # a chain body: its first step reads the join
        rest = [*first["steps"][1:], *rest]
        first = first["steps"][0]
    if first["t"] != "s":
        raise ConfigurationError("a chord's callback must be a task or a chain starting with one")
    info = {"id": join["id"], "n": join["n"], "i": bool(first.get("i"))}
    if "members" in join:
        info["members"] = join["members"]
    if join.get("x"):
        info["x"] = True
    built.messages.append(built.message(first, NO_INPUT, rest, member, info))
    return built.messages
