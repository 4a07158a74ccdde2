"""The task page's workflow tree: every task of the workflow its task belongs to, with states.

The structure comes from the ``workflow-sent`` event the dashboard kept (a dict lookup by task
id, see :mod:`.workflows`); the states from the result backend through
:func:`~aioqueue.canvas.results.tree_of`, the function a handle's ``tree()`` uses, at most
:data:`~aioqueue.canvas.outline.OUTLINE_NODES` reads, all of them bounded by
:data:`BACKEND_WAIT` so a slow backend costs the page a delay, never the page. A backend
that cannot answer for another process's tasks (``rpc://``) gets the structure without states
and a note saying why.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..canvas.outline import OUTLINE_NODES
from ..canvas.results import shape_of, tree_of
from ..errors import AioQueueError
from .html import ago, esc, link, task_path

if TYPE_CHECKING:
    from .index import TaskRecord
    from .live import Live
    from .workflows import SentWorkflow

__all__ = ["BACKEND_WAIT", "workflow_section"]

BACKEND_WAIT = 2.0
"""Seconds the task page waits for the result backend (its result, its workflow's states, read
at the same time) before it shows what it has and says what is missing."""

UNKNOWN = "unknown"


async def _tree(live: Live, sent: SentWorkflow) -> tuple[dict[str, Any], str]:
    """(the tree, a note on why its states are not known, or "")."""
    app = live.app
    why = ""
    try:
        async with asyncio.timeout(BACKEND_WAIT):
            backend = await app.ready_backend()
            if urlsplit(backend.url).scheme == "rpc":
                why = (
                    "states not shown: the rpc:// result backend sends each result to the "
                    "process that sent the task, so none can be read here"
                )
            else:
                return await tree_of(app, sent.outline), ""
    except TimeoutError:
        why = f"states not shown: the result backend did not answer within {BACKEND_WAIT:g} s"
    except AioQueueError as exc:
        why = f"states not shown: result backend unreachable: {exc}"
    shape, leaves = shape_of(sent.outline)
    for leaf in leaves:
        leaf["state"] = UNKNOWN
    return shape, why


def _node(node: dict[str, Any], here: str, out: list[str]) -> None:
    kind = node["type"]
    if kind == "task":
        state = node["state"]
        mark = ' class="here"' if node["id"] == here else ""
        out.append(
            f'<li{mark}><span class="{esc(state)}">{esc(state)}</span> '
            f'<b>{esc(node["task"])}</b> <a href="{esc(task_path(node["id"]))}">'
            f"{esc(node['id'])}</a>"
        )
        if node["id"] == here:
            out.append(' <span class="off">(this task)</span>')
    else:
        out.append(f'<li><span class="kind">{esc(kind)}</span>')
    children = node["children"]
    more = node.get("more", 0)
    if children or more:
        out.append("<ul>")
        for child in children:
            _node(child, here, out)
        if more:
            out.append(f'<li class="off">… {esc(more)} more task(s) not shown</li>')
        out.append("</ul>")
    out.append("</li>")


def _unseen(record: TaskRecord) -> str:
    """A workflow step whose workflow's outline this dashboard never read: where it belongs."""
    known = [
        f"{label} {link(task_path(value), value)}"
        for label, value in (("root", record.root_id), ("parent", record.parent_id))
        if value and value != record.task_id
    ]
    where = f" ({', '.join(known)})" if known else ""
    return (
        f"<h2>Workflow</h2><p>A step of a workflow{where}. Its tree is not known here: this "
        "dashboard did not read the workflow's <code>workflow-sent</code> event (sent with "
        "events off, before the events it keeps, or by an app whose events it does not see, "
        "such as a <code>memory://</code> one in another process), or the task is past the "
        f"first {OUTLINE_NODES} tasks the event lists.</p>"
    )


async def workflow_section(live: Live, task_id: str, record: TaskRecord | None = None) -> str:
    """The task page's "Workflow" section: the tree, a note for a step whose workflow was not
    seen, or "" for a task in no workflow."""
    sent = live.workflows.of(task_id)
    if sent is None:
        if record is not None and (record.root_id or record.parent_id):
            return _unseen(record)
        return ""
    tree, why = await _tree(live, sent)
    shown = len(sent.ids)
    count = (
        f"{sent.nodes} task(s)"
        if shown == sent.nodes
        else f"{sent.nodes} task(s), the first {shown} shown"
    )
    out = [
        '<h2>Workflow</h2><div id="workflow">',
        f"<p>{esc(count)}, sent {esc(ago(sent.sent))}</p>",
        f'<p class="off">{esc(why)}</p>' if why else "",
        '<ul class="tree">',
    ]
    _node(tree, task_id, out)
    out.append("</ul></div>")
    return "".join(out)
