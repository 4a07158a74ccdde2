"""The settle step: one decision per message, carried out until it holds.

The handler of a message ends in exactly one :data:`Disposition`, and :meth:`Settler.settle` turns
it into broker and backend calls in a fixed order:

    Ack(store)            store the outcome, then ack    (one transaction when the backend
                                                          shares the broker's Redis)
    Reject(reason, store) dead-letter first, then store  (a client that sees the FAILURE also
                                                          finds the message kept)
    Requeue(count)        give the message back, its attempt raised when it ran

Each call is retried with backoff for as long as the worker lives: a result backend or broker
that is away for a minute delays the settle, it does not strand the message. Nothing is acked
before its outcome is stored. When the worker stops, a settle still retrying is cancelled and the
consumer's ``close`` gives the message back to its queue, where ``max_attempts`` bounds how often
it can come back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeAlias

from ..errors import AioQueueError

if TYPE_CHECKING:
    from ..backends.base import ResultBackend, StoresWithAck
    from ..brokers.base import Delivery

__all__ = ["Ack", "Disposition", "Reject", "Requeue", "Settler", "Store"]

log = logging.getLogger("aioqueue.worker")

_FIRST_DELAY = 0.05
_MAX_DELAY = 5.0


@dataclass(slots=True)
class Store:
    """An outcome to store as part of a settle."""

    task_id: str
    outcome: bytes
    ttl: float
    reply_to: str | None


@dataclass(slots=True)
class Ack:
    """The task ran (or was discarded on purpose): store its outcome, then forget the message.

    ``ack=False`` when the message was acked before it ran (``acks_late=False``).
    """

    store: Store | None = None
    ack: bool = True


@dataclass(slots=True)
class Reject:
    """The message cannot be run: keep it as a dead letter with the reason, record FAILURE."""

    reason: str
    store: Store | None = None


@dataclass(slots=True)
class Requeue:
    """Give the message back: untouched, or with its attempt raised (``count_attempt``)."""

    count_attempt: bool = False


Disposition: TypeAlias = Ack | Reject | Requeue
Step = Callable[[], Awaitable[object]]


class Settler:
    """Carries out dispositions against one backend (and its joint store-and-ack, if any)."""

    __slots__ = ("_backend", "_joint")

    def __init__(self, backend: ResultBackend, joint: StoresWithAck | None) -> None:
        self._backend = backend
        self._joint = joint

    async def settle(self, delivery: Delivery, disposition: Disposition) -> None:
        """Run the disposition's steps in order, each until it succeeds."""
        if self._joint is not None and type(disposition) is Ack and disposition.ack:
            store = disposition.store
            if store is not None:  # the common case, tried once without building steps
                try:
                    await self._store_and_ack(delivery, store)
                    return
                except AioQueueError:
                    pass  # retried below, with backoff and a log line per failure
        for step in self._steps(delivery, disposition):
            await self._until_done(step, delivery)

    def _steps(self, delivery: Delivery, disposition: Disposition) -> list[Step]:
        if isinstance(disposition, Requeue):
            return [partial(delivery.requeue, count_attempt=disposition.count_attempt)]
        store = disposition.store
        if isinstance(disposition, Reject):
            steps: list[Step] = [partial(delivery.dead_letter, disposition.reason)]
            if store is not None:
                steps.append(partial(self._store, store))
            return steps
        if not disposition.ack:
            return [partial(self._store, store)] if store is not None else []
        if store is None:
            return [delivery.ack]
        if self._joint is not None:
            return [partial(self._store_and_ack, delivery, store)]
        return [partial(self._store, store), delivery.ack]

    async def _store(self, store: Store) -> None:
        await self._backend.store(
            store.task_id, store.outcome, ttl=store.ttl, reply_to=store.reply_to
        )

    async def _store_and_ack(self, delivery: Delivery, store: Store) -> None:
        assert self._joint is not None
        held = await self._joint.store_and_ack(
            delivery, store.task_id, store.outcome, ttl=store.ttl, reply_to=store.reply_to
        )
        if not held:
            log.warning(
                "task %s: the message was no longer this worker's to ack (its lease lapsed and "
                "another worker took it over, or an earlier try whose reply was lost settled "
                "it); the first outcome stored for the task stands",
                store.task_id,
            )

    @staticmethod
    async def _until_done(step: Step, delivery: Delivery) -> None:
        delay = _FIRST_DELAY
        failures = 0
        while True:
            try:
                await step()
                if failures:
                    log.info(
                        "settled a message on %s after %d failure(s)", delivery.queue, failures
                    )
                return
            except AioQueueError as exc:
                failures += 1
                log.warning(
                    "settling a message on %s failed (%s); retrying in %.2fs (failure %d)",
                    delivery.queue,
                    exc,
                    delay,
                    failures,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_DELAY)
