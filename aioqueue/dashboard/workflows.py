"""The workflows the dashboard saw sent (``workflow-sent`` events), found by any task's id.

A task page shows the tree of the workflow its task belongs to, but a task id alone says
nothing of that workflow: its structure lives in the process that sent it (see
:mod:`aioqueue.canvas.outline`). So the dashboard keeps each sent workflow's outline, and a
map from every task id in it to that outline: one dict lookup per page, whatever the number of
tasks or workflows kept. Bounded by tasks, not workflows (``max_nodes``, oldest workflow
forgotten first), so one huge group cannot hold more than its outline's share.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..canvas.outline import outline_ids
from ..events import Event

__all__ = ["SentWorkflow", "WorkflowIndex"]

log = logging.getLogger("aioqueue.dashboard")


@dataclass(frozen=True, slots=True)
class SentWorkflow:
    """One workflow as its ``workflow-sent`` event described it."""

    outline: dict[str, Any]
    """Its structure (ids and task names), cut at the sender's outline limit."""
    ids: tuple[str, ...]
    """The task ids in :attr:`outline`."""
    nodes: int
    """How many tasks the whole workflow has (more than ``len(ids)`` when cut)."""
    sent: float


class WorkflowIndex:
    """The newest workflows seen, holding at most ``max_nodes`` task ids in all."""

    def __init__(self, max_nodes: int = 10_000) -> None:
        self.max_nodes = max_nodes
        self._sent: deque[SentWorkflow] = deque()
        self._by_task: dict[str, SentWorkflow] = {}
        self._held = 0

    def __len__(self) -> int:
        return len(self._sent)

    def of(self, task_id: str) -> SentWorkflow | None:
        """The workflow ``task_id`` belongs to, if its outline listed it."""
        return self._by_task.get(task_id)

    def add(self, event: Event) -> SentWorkflow | None:
        """Keep a ``workflow-sent`` event's outline; a malformed one is logged and skipped."""
        shape = event.fields.get("workflow")
        try:
            ids = outline_ids(shape)
        except ValueError as exc:
            log.warning("dashboard: unreadable workflow-sent event: %s", exc)
            return None
        if not ids:
            return None
        nodes = event.fields.get("nodes")
        total = nodes if type(nodes) is int and nodes >= len(ids) else len(ids)
        assert isinstance(shape, dict)
        sent = SentWorkflow(shape, tuple(ids), total, event.timestamp)
        self._sent.append(sent)
        for task_id in ids:
            self._by_task[task_id] = sent  # a task id sent again: the newest workflow wins
        self._held += len(ids)
        while self._held > self.max_nodes and len(self._sent) > 1:
            old = self._sent.popleft()
            self._held -= len(old.ids)
            for task_id in old.ids:
                if self._by_task.get(task_id) is old:
                    del self._by_task[task_id]
        return sent
