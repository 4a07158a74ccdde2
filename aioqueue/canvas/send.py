"""Sending a workflow: freeze it, build its first messages, publish them in one round trip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .flows import JoinsChords
from .results import FlowResult, GroupResult
from .wire import NO_INPUT, Node, launch

if TYPE_CHECKING:
    from ..app import App

__all__ = ["send_node", "send_workflow"]


def _handle(app: App, node: Node, token: object, as_tuple: bool = False) -> Any:
    """The handle of ``node``'s result, every step's handle linked to its parent and
    children (see :mod:`.results`)."""
    return _Handles(app, node, token).build(node, None, as_tuple)


class _Handles:
    def __init__(self, app: App, root: Node, token: object) -> None:
        self.app, self.root, self.token = app, root, token

    def build(self, node: Node, parent: Any, as_tuple: bool = False, adopt: bool = True) -> Any:
        """The handle of ``node`` sent after ``parent`` (a handle, or None); ``adopt=False``:
        not listed in the parent's children (a group's member: the group is)."""
        kind = node["t"]
        handle: Any
        if kind == "c":
            handle = parent
            for index, step in enumerate(node["steps"]):
                handle = self.build(step, handle, adopt=adopt or index > 0)
            return handle
        if kind == "ch":
            header = self.build({"t": "g", "members": node["header"]}, parent, adopt=adopt)
            return self.build(node["body"], header)
        if kind == "s":
            handle = FlowResult(
                node["id"], self.app, task_name=node["task"], token=self.token, root=self.root
            )
            for link in [*node.get("link", ()), *node.get("err", ())]:
                self.build(link, handle)
        else:
            members = [self.build(member, parent, adopt=False) for member in node["members"]]
            handle = GroupResult(members, as_tuple=as_tuple)
            handle.root = (self.app, self.root)
        handle.parent = parent
        if parent is not None and adopt:
            parent.children.append(handle)
        return handle


async def send_workflow(part: Any) -> Any:
    from .nodes import Group, freeze

    app = part.app
    if app is None:  # an empty group
        return GroupResult([], as_tuple=getattr(part, "as_tuple", False))
    return await _send(app, freeze(part), as_tuple=isinstance(part, Group) and part.as_tuple)


async def send_node(app: App, part: Any) -> Any:
    from .nodes import freeze

    return await _send(app, freeze(part))


async def _send(app: App, node: Node, *, as_tuple: bool = False) -> Any:
    backend = app.backend
    if not isinstance(backend, JoinsChords) and _has_chord(node):
        raise ConfigurationError(
            f"a chord needs a result backend that counts its members atomically (Redis); "
            f"{backend.url} cannot: use a redis:// result_backend"
        )
    broker = await app.ready_broker()
    backend = await app.ready_backend()
    # the sender's reply address goes in every message: the pushes come to this process
    messages = launch(app, node, NO_INPUT, [], None, reply_to=backend.reply_to())
    encode = app.codec.encode
    if app.middleware:
        if app.conf.events:  # its outline, for a dashboard's workflow tree
            from ..events import workflow_sent

            workflow_sent(app, node)
        messages = [await app._before_send(message) for message in messages]
        async with app._sending(messages):
            await broker.publish_many([(m.queue, encode(m), m.eta) for m in messages])
    else:
        await broker.publish_many([(m.queue, encode(m), m.eta) for m in messages])
    return _handle(app, node, backend.send_token(), as_tuple)


def _has_chord(node: Node) -> bool:
    """True if a chord is anywhere in the workflow (nested, in a link, a callback...)."""
    kind = node["t"]
    if kind == "ch":
        return True
    if kind == "s":
        return any(_has_chord(link) for link in [*node.get("link", ()), *node.get("err", ())])
    return any(_has_chord(part) for part in node["steps" if kind == "c" else "members"])
