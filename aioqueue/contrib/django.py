"""Send a task once the Django transaction that needs it has committed.

A task sent inside ``transaction.atomic()`` can reach a worker before the commit: the worker
then reads a row that is not there yet (or never will be, if the transaction rolls back). With
``send_on_commit(add.s(2, 3))`` the send waits for the commit and is dropped on rollback,
including the rollback of a savepoint it was registered in, because it rides on Django's own
``transaction.on_commit``. Outside a transaction (autocommit) it sends at once.

The send itself uses the sync client (:mod:`aioqueue.sync`), so it works from views, management
commands and ``sync_to_async`` code alike.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from ..sync import run_sync
from ..task import Signature
from ._signature import require_signature

__all__ = ["send_on_commit"]


def send_on_commit(
    call: Signature[Any, Any], *, using: str | None = None, robust: bool = False
) -> None:
    """Send ``call`` (``task.s(...)``) when the current transaction on database ``using``
    commits; nothing is sent if it rolls back.

    ``robust=True`` logs a failed send (broker down) instead of raising it from the commit, as
    Django's ``on_commit(robust=True)`` does; the default raises, so the caller learns of it.
    A task id is known only once sent: give one up front with ``.set(task_id=...)`` to store it
    with the row.
    """
    signature = require_signature(call, "send_on_commit")

    def send() -> None:
        what = f"{signature.task.name}: send_on_commit()"
        run_sync(signature.task.app, what, signature.send)

    transaction.on_commit(send, using=using, robust=robust)
