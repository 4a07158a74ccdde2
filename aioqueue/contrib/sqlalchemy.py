"""Send tasks after a SQLAlchemy session commits; drop them if it rolls back.

``send_after_commit(session, charge.s(order.id))`` holds the send on the session until its
transaction commits, so the worker never looks for a row that is not committed yet, and a
rollback (of the whole transaction, or of the savepoint the send was registered in) sends
nothing. It works with an ``AsyncSession`` and with a plain ``Session``.

SQLAlchemy's session events are synchronous. With an ``AsyncSession`` the commit runs on the
event loop, so the sends start there as one task right after the commit: ``await
flush_sends(session)`` waits for them (and raises a failed send); a failed send is also
logged, for the code that never waits. With a plain ``Session`` they are sent before
``commit()`` returns, by the sync client.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from ..result import AsyncResult
from ..sync import run_sync
from ..task import Signature
from ._signature import require_signature

__all__ = ["flush_sends", "send_after_commit"]

log = logging.getLogger("aioqueue.contrib.sqlalchemy")

_PENDING = "aioqueue.pending_sends"
"""session.info key: [(transaction registered in or None, signature)], in send order."""
_SENDING = "aioqueue.sending"
"""session.info key: the asyncio tasks sending what commits released, until flushed."""

Pending = list[tuple[SessionTransaction | None, Signature[Any, Any]]]


def send_after_commit(session: AsyncSession | Session, call: Signature[Any, Any]) -> None:
    """Send ``call`` (``task.s(...)``) once ``session`` commits; drop it on rollback.

    Sends registered inside ``session.begin_nested()`` are dropped when that savepoint rolls
    back. Each send goes at most once: a later commit does not repeat it.
    """
    signature = require_signature(call, "send_after_commit")
    sync_session = session.sync_session if isinstance(session, AsyncSession) else session
    if not event.contains(sync_session, "after_commit", _after_commit):
        event.listen(sync_session, "after_commit", _after_commit)
        event.listen(sync_session, "after_soft_rollback", _after_soft_rollback)
    transaction = sync_session.get_nested_transaction() or sync_session.get_transaction()
    sync_session.info.setdefault(_PENDING, []).append((transaction, signature))


async def flush_sends(session: AsyncSession | Session) -> list[AsyncResult[Any]]:
    """Wait for the sends that the session's commits started; their handles, in send order.
    Raises the first failed send (broker down); the rest are still waited for."""
    sync_session = session.sync_session if isinstance(session, AsyncSession) else session
    tasks: list[asyncio.Task[list[AsyncResult[Any]]]] = sync_session.info.pop(_SENDING, [])
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    results: list[AsyncResult[Any]] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results.extend(outcome)
    return results


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint released: its sends wait for the root
        return
    pending: Pending = session.info.pop(_PENDING, [])
    if not pending:
        return
    signatures = [signature for _, signature in pending]
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # a plain Session in sync code: send now, on the sync client
        for signature in signatures:
            run_sync(signature.task.app, "send_after_commit()", signature.send)
        return
    task = loop.create_task(_send_all(signatures))
    task.add_done_callback(_log_failure)
    session.info.setdefault(_SENDING, []).append(task)


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    pending: Pending | None = session.info.get(_PENDING)
    if not pending:
        return
    if not previous_transaction.nested:  # the whole transaction is gone
        session.info.pop(_PENDING)
        return
    pending[:] = [
        (transaction, signature)
        for transaction, signature in pending
        if not _within(transaction, previous_transaction)
    ]


def _within(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


async def _send_all(signatures: list[Signature[Any, Any]]) -> list[AsyncResult[Any]]:
    return [await signature.send() for signature in signatures]


def _log_failure(task: asyncio.Task[list[AsyncResult[Any]]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("send after commit failed", exc_info=task.exception())
