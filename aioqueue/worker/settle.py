"""The settle step: one decision per message, carried out until it holds.

The handler of a message ends in exactly one :data:`Disposition`, and :meth:`Settler.settle` turns
it into broker and backend calls in a fixed order:

    Ack(store)            store the outcome, then ack    (one transaction when the backend
                                                          shares the broker's Redis)
    Reject(reason, store) dead-letter first, then store  (a client that sees the FAILURE also
                                                          finds the message kept)
    Requeue(count)        give the message back, its attempt raised when it ran
    Resend(body, eta)     swap the message for its retry (one script on Redis; on AMQP
                          publish, confirmed, then ack), then record RETRY

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

from ..brokers.base import ResendsAtomically
from ..errors import AioQueueError
from ..uniqueness import claim_ttl_at_end, claims

if TYPE_CHECKING:
    from ..backends.base import ClaimsTaskIds, ResultBackend, StoresWithAck
    from ..brokers.base import Broker, Delivery
    from ..canvas.flows import Flows
    from ..message import Message

__all__ = ["Ack", "Disposition", "Reject", "Requeue", "Resend", "Settler", "Store"]

log = logging.getLogger("aioqueue.worker")

_FIRST_DELAY = 0.05
_MAX_DELAY = 5.0


@dataclass(slots=True)
class Store:
    """An outcome to store as part of a settle.

    ``claim_ttl``: only for a message whose sender claimed its id (see
    :mod:`aioqueue.uniqueness`), how long the claim is kept from now (0: released); ``outcome``
    None: the task ignores its result, only that claim is settled.
    """

    task_id: str
    outcome: bytes | None
    ttl: float
    reply_to: str | None
    claim_ttl: float | None = None
    flow: Message | None = None
    """A workflow message (chain step, chord member, with links): what it causes is sent
    before this store (see :mod:`aioqueue.canvas.flows`). None for a plain task."""

    @classmethod
    def of(cls, message: Message, outcome: bytes, ttl: float) -> Store | None:
        """What to store for ``message``'s final outcome: None if nothing at all."""
        if message.workflow is not None:
            return cls(message.id, outcome, ttl, message.reply_to, flow=message)
        if message.claim is None:
            if message.ignore_result:
                return None
            return cls(message.id, outcome, ttl, message.reply_to)
        kept = None if message.ignore_result else outcome
        return cls(message.id, kept, ttl, message.reply_to, claim_ttl_at_end(message, ttl))


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
    keep_body: bool = True
    """False: the dead letter keeps the reason and size only (a message with a bad signature)."""


@dataclass(slots=True)
class Requeue:
    """Give the message back: untouched, or with its attempt raised (``count_attempt``)."""

    count_attempt: bool = False


@dataclass(slots=True)
class Resend:
    """Run the task again later: ``body`` (the same task, retries raised) due at ``eta``.

    ``state`` is the RETRY record, written after the swap: written before, a worker dying in
    between would leave a RETRY that no re-send backs. ``acked``: the message was acked before
    it ran (``acks_late=False``), so the retry is only published.
    """

    queue: str
    body: bytes
    eta: float
    state: Store | None
    """None: a deferral (over a rate limit), not a retry: nothing to record."""
    acked: bool = False


Disposition: TypeAlias = Ack | Reject | Requeue | Resend
Step = Callable[[], Awaitable[object]]


class Settler:
    """Carries out dispositions against one backend (and its joint store-and-ack, if any)."""

    __slots__ = ("_backend", "_broker", "_flows", "_joint")

    def __init__(
        self,
        backend: ResultBackend,
        joint: StoresWithAck | None,
        broker: Broker,
        flows: Flows | None = None,
    ) -> None:
        self._backend = backend
        self._joint = joint
        self._broker = broker
        self._flows = flows

    async def settle(self, delivery: Delivery, disposition: Disposition) -> None:
        """Run the disposition's steps in order, each until it succeeds."""
        if type(disposition) is Ack or type(disposition) is Reject:
            flowing = disposition.store
            if flowing is not None and flowing.flow is not None and self._flows is not None:
                await self._settle_flow(delivery, disposition, flowing, self._flows)
                return
        if self._joint is not None and type(disposition) is Ack and disposition.ack:
            store = disposition.store
            if store is not None and store.outcome is not None:  # the common case, tried once
                try:
                    await self._store_and_ack(delivery, store)
                    return
                except AioQueueError:
                    pass  # retried below, with backoff and a log line per failure
        for step in self._steps(delivery, disposition):
            await self._until_done(step, delivery)

    async def _settle_flow(
        self, delivery: Delivery, disposition: Ack | Reject, store: Store, flows: Flows
    ) -> None:
        """A workflow step: what it causes goes with its settle, in one script when the
        backend shares the broker's Redis, else just before it (see ``canvas/flows.py``)."""
        if self._joint is not None and type(disposition) is Ack and disposition.ack:
            await self._until_done(partial(flows.settle_with_ack, delivery, store), delivery)
            return
        await self._until_done(partial(flows.settle, store), delivery)
        for step in self._steps(delivery, disposition):
            await self._until_done(step, delivery)

    def _steps(self, delivery: Delivery, disposition: Disposition) -> list[Step]:
        if isinstance(disposition, Requeue):
            return [partial(delivery.requeue, count_attempt=disposition.count_attempt)]
        if isinstance(disposition, Resend):
            return self._resend_steps(delivery, disposition)
        store = disposition.store
        if isinstance(disposition, Reject):
            if disposition.keep_body:
                steps: list[Step] = [partial(delivery.dead_letter, disposition.reason)]
            else:
                steps = [partial(delivery.dead_letter, disposition.reason, keep_body=False)]
            if store is not None:
                steps.append(partial(self._store, store))
            return steps
        if not disposition.ack:
            return [partial(self._store, store)] if store is not None else []
        if store is None:
            return [delivery.ack]
        if self._joint is not None and store.outcome is not None:
            return [partial(self._store_and_ack, delivery, store)]
        return [partial(self._store, store), delivery.ack]

    def _resend_steps(self, delivery: Delivery, resend: Resend) -> list[Step]:
        record = [] if resend.state is None else [partial(self._store_state, resend.state)]
        publish = partial(self._broker.publish, resend.queue, resend.body, eta=resend.eta)
        if resend.acked:
            return [publish, *record]
        if isinstance(delivery, ResendsAtomically):
            return [partial(delivery.resend, resend.body, resend.eta), *record]
        # Publish (confirmed) before the ack: a crash between leaves the original to come back,
        # and the RETRY record (written before the ack) tells the next worker to drop it.
        return [publish, *record, delivery.ack]

    async def _store_state(self, store: Store) -> None:
        assert store.outcome is not None  # a RETRY record always has one
        await self._backend.store_state(
            store.task_id, store.outcome, ttl=store.ttl, reply_to=store.reply_to
        )

    async def _store(self, store: Store) -> None:
        if store.claim_ttl is not None:  # only messages whose sender claimed their id
            await _store_claimed(claims(self._backend), store)
            return
        assert store.outcome is not None
        await self._backend.store(
            store.task_id, store.outcome, ttl=store.ttl, reply_to=store.reply_to
        )

    async def _store_and_ack(self, delivery: Delivery, store: Store) -> None:
        assert self._joint is not None and store.outcome is not None
        if store.claim_ttl is None:
            held = await self._joint.store_and_ack(
                delivery, store.task_id, store.outcome, ttl=store.ttl, reply_to=store.reply_to
            )
        else:
            held = await self._joint.store_and_ack(
                delivery,
                store.task_id,
                store.outcome,
                ttl=store.ttl,
                reply_to=store.reply_to,
                claim_ttl=store.claim_ttl,
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


async def _store_claimed(backend: ClaimsTaskIds, store: Store) -> None:
    """Store the outcome and set its claim's end in one step; or, ignoring it, end the claim."""
    assert store.claim_ttl is not None
    if store.outcome is None:
        await backend.end_claim(store.task_id, store.claim_ttl)
    else:
        await backend.store(
            store.task_id,
            store.outcome,
            ttl=store.ttl,
            reply_to=store.reply_to,
            claim_ttl=store.claim_ttl,
        )
