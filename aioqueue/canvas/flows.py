"""The worker's side of workflows: what a finished step sends, and a chord callback's input.

What a step's final outcome causes (:meth:`Flows.plan`): the next step of its chain, its links
or errbacks, the failure recorded under the chain steps that will not run, its count in a chord
and, from the member that completes that count, the chord's callback.

Redis broker with results on the same server: all of it, the outcome and the ack are one fenced
script (:mod:`.redis_settle`), so a worker killed at any point leaves all of it or none of it.

Elsewhere (RabbitMQ, or results on another server), in steps: the outcome is stored, then the
rest is done (stores, the chord count, one publish of every message), then the message is acked.
A worker dying before the ack leaves the message to come back; finding its outcome stored, the
next worker does not run it again but does what it causes again (:meth:`Flows.counted_again`),
each part idempotent: the same task ids (a step re-sent is the same task, its outcome stored
once, first wins), and a chord counts a member by id, once, and marks its callback sent. A step
that arrives twice (published, then its sender died before its ack) is dropped unrun when its
outcome is already stored (see the handler's ``_run_flow``). Two copies arriving while the
first still runs are kept apart by a lease in the result backend (:class:`StepLease`, Redis):
before it runs, a step takes ``<id>:<retries>``; a copy that finds it held by another waits
(parked, its slot free) until the holder's outcome is stored, then is dropped, or until the
lease lapses (its holder died), then runs. The holder renews the lease while it runs, so a
long step is never run twice; a dead holder delays its step's rerun by at most one lease.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

from ..backends.base import LeasesSteps
from ..errors import AioQueueError, ChordError
from ..message import Message, Outcome, States
from ..worker.execution import failure_outcome
from ..worker.settle import Ack, Store
from .wire import NO_INPUT, all_ids, callback_message, launch, member_ids

if TYPE_CHECKING:
    from ..app import App
    from ..backends.base import ResultBackend
    from ..brokers.base import Broker, Delivery, Outgoing

__all__ = ["STEP_LEASE", "Effects", "ErrorInfo", "Flows", "JoinsChords", "StepLease"]

log = logging.getLogger("aioqueue.worker")

STEP_LEASE = 10.0
"""Seconds a workflow step's lease lasts unless renewed (every third of it while it runs):
how long a step whose worker died waits before another worker runs it."""


class ErrorInfo(TypedDict):
    """How a task failed, as plain JSON data, never the exception object: what a
    ``link_error`` signature gets after the failed task's id, and what a chord callback sent
    with ``pass_errors=True`` finds in a failed member's place."""

    state: str
    """FAILURE or REVOKED (expired, or revoked); PENDING for a chord member whose result was
    gone (expired or forgotten) when the callback read it."""
    type: str
    """The exception's qualified type name, e.g. ``builtins.ValueError``."""
    message: str
    """The exception's message."""
    traceback: str | None
    """The formatted remote traceback, when there is one."""


@runtime_checkable
class JoinsChords(Protocol):
    """A result backend that can count a chord's members atomically (Redis, memory)."""

    async def chord_join(self, chord_id: str, member_id: str, total: int, ttl: float) -> bool:
        """Count ``member_id`` once; True when all ``total`` are in and the callback was not
        sent yet (so the caller sends it, then calls :meth:`chord_sent`)."""

    async def chord_sent(self, chord_id: str, ttl: float) -> None:
        """The callback is published: later joins (a member run again) do not send it."""


@dataclass(slots=True)
class Effects:
    """What a workflow step's final outcome causes (see :meth:`Flows.plan`)."""

    outcome: Outcome | None
    follow: list[Message] = field(default_factory=list)
    """Sent now: the next step of its chain, its links or its errbacks."""
    skipped: list[str] = field(default_factory=list)
    """Ids of the chain steps that will not run: they fail with this step's outcome."""
    member: dict[str, Any] | None = None
    """The chord this step ends a member of: counted there."""
    callback: list[Message] = field(default_factory=list)
    """The chord's callback, sent by the member that completes the count."""


class StepLease:
    """A workflow step's run, taken in the result backend and renewed while it runs.

    Not released when the run ends: the outcome is stored after (the settle), and until then
    a copy must still find the step held; once it is stored, the result key is what a copy
    finds. A retry is another run (its own ``<id>:<retries>``), so it never waits for this.
    """

    __slots__ = ("_keeper",)

    def __init__(self, backend: LeasesSteps, message: Message, token: str, lease: float) -> None:
        self._keeper = asyncio.get_running_loop().create_task(
            _renew(backend, message, token, lease), name=f"lease {message.id}"
        )

    def end(self) -> None:
        """Stop renewing (the lease runs out by itself, after the outcome is stored)."""
        self._keeper.cancel()


async def _renew(backend: LeasesSteps, message: Message, token: str, lease: float) -> None:
    while True:
        await asyncio.sleep(lease / 3)
        try:
            held = await backend.renew_step(message.id, message.retries, token, lease)
        except AioQueueError as exc:  # tried again a third of a lease later
            log.warning("%s[%s] could not renew its lease: %s", message.task, message.id, exc)
            continue
        if not held:
            log.warning(
                "%s[%s] lost its lease (not renewed within %.1fs): another copy may run it",
                message.task,
                message.id,
                lease,
            )
            return


def error_info(outcome: Outcome) -> ErrorInfo:
    return ErrorInfo(
        state=outcome.state,
        type=outcome.exc_type or "Exception",
        message=outcome.exc_message or "",
        traceback=outcome.traceback,
    )


class Flows:
    """Follow-ups of workflow messages, for one worker."""

    def __init__(
        self, app: App, broker: Broker, backend: ResultBackend, *, atomic: bool = False
    ) -> None:
        self._app = app
        self._broker = broker
        self._backend = backend
        self.atomic = atomic
        """Steps settle in one script (:mod:`.redis_settle`): a step is never sent twice, so
        a first delivery needs no check for an earlier copy's outcome."""
        self.leases = not atomic and isinstance(backend, LeasesSteps)
        """Elsewhere, with a backend that can: a step runs under a lease (:class:`StepLease`)."""
        self.lease = STEP_LEASE

    async def take(self, message: Message) -> StepLease | float | None:
        """The step's lease, or -1.0 (its outcome is stored), or the seconds until the
        holder's lease ends; None when the backend cannot answer: it runs anyway (at least
        once, as a redelivery whose outcome cannot be read does)."""
        backend = self._backend
        assert isinstance(backend, LeasesSteps)
        token = os.urandom(8).hex()
        try:
            found = await backend.take_step(message.id, message.retries, token, self.lease)
        except AioQueueError as exc:
            log.warning("%s[%s] runs without a lease: %s", message.task, message.id, exc)
            return None
        if found:
            return float(found)
        return StepLease(backend, message, token, self.lease)

    async def prepare(self, message: Message, ttl: float) -> Message | Ack:
        """A chord callback gets its members' results first; a failed member fails it with
        ChordError instead of running it. Other workflow messages pass unchanged."""
        assert message.workflow is not None
        join = message.workflow.get("join")
        if join is None:
            return message
        codec = self._app.codec
        members = member_ids(join)
        raws = await asyncio.gather(*(self._backend.get(member) for member in members))
        results: list[Any] = []
        for member, raw in zip(members, raws, strict=True):
            outcome = codec.decode_outcome(raw) if raw is not None else None
            if join.get("x") and (outcome is None or outcome.state != States.SUCCESS):
                results.append(_member_info(join["id"], member, outcome))
                continue
            if outcome is None or outcome.state != States.SUCCESS:
                error = _member_error(join["id"], member, outcome)
                failed = codec.encode_outcome(failure_outcome(message.id, error))
                return Ack(Store(message.id, failed, ttl, message.reply_to, flow=message))
            results.append(outcome.result)
        if join.get("i"):
            return message
        return replace(message, args=(results, *message.args))

    async def counted_again(self, message: Message, ttl: float) -> Ack:
        """A redelivered step whose outcome is stored: its worker may have died before what
        it causes was sent (AMQP: the outcome and a chord's count come before the publish), so
        it is done again (the same ids; a chord counts a member once). On Redis, where all of
        it is one script, the script finds the outcome stored and does nothing more."""
        raw = await self._backend.get(message.id)
        if raw is None or not self._app.codec.decode_outcome(raw).ready:
            return Ack()
        return Ack(Store(message.id, raw, ttl, message.reply_to, flow=message))

    def plan(self, store: Store) -> Effects | None:
        """What the step's final outcome causes; None when nothing (not final)."""
        message = store.flow
        assert message is not None and message.workflow is not None
        if store.outcome is None:
            return None
        outcome = self._app.codec.decode_outcome(store.outcome)
        if not outcome.ready:
            return None
        wf = message.workflow
        reply_to, root = wf.get("r"), message.root_id
        effects = Effects(outcome=outcome)
        rest: list[Any] = wf.get("next") or []
        member = wf.get("member")

        def start(node: Any, prev: Any, after: list[Any], part: Any) -> None:
            effects.follow.extend(
                launch(
                    self._app,
                    node,
                    prev,
                    after,
                    part,
                    reply_to=reply_to,
                    root_id=root,
                    parent_id=message.id,
                )
            )

        if outcome.state == States.SUCCESS:
            if rest:
                start(rest[0], outcome.result, rest[1:], member)
                member = None  # the chain's last step counts in the chord, not this one
            for link in wf.get("link") or ():
                start(link, outcome.result, [], None)
        else:
            # The steps that will not run fail with this step's outcome (its id in it), so a
            # handle on any of them (the chain's last step) ends with this failure.
            effects.skipped = all_ids(rest)
            info = error_info(outcome)
            for link in wf.get("err") or ():
                start({**link, "args": [message.id, info, *link["args"]]}, NO_INPUT, [], None)
        if member is not None:
            effects.member = member
            effects.callback = callback_message(self._app, member, reply_to=reply_to, root_id=root)
        return effects

    def outgoing(self, messages: list[Message]) -> list[Outgoing]:
        encode = self._app.codec.encode
        return [(m.queue, encode(m), m.eta) for m in messages]

    async def settle(self, store: Store) -> None:
        """Send what the step causes before its outcome is stored and its message acked, in
        steps (see the module docstring): brokers that cannot do it in one script."""
        effects = self.plan(store)
        if effects is None:
            return
        assert store.outcome is not None and store.flow is not None
        reply_to = store.flow.workflow.get("r") if store.flow.workflow else None
        # Its own outcome first (first wins, so the settle's store after is harmless): a
        # chord's callback reads every member's outcome once the count is complete, and a
        # handle on a skipped step never sees the chain fail before the failing step did. A
        # crash after this store leaves the message to come back and be done again (see the
        # handler's ``_run_flow``).
        await self._backend.store(
            store.task_id, store.outcome, ttl=store.ttl, reply_to=store.reply_to
        )
        for task_id in effects.skipped:
            await self._backend.store(task_id, store.outcome, ttl=store.ttl, reply_to=reply_to)
        follow = list(effects.follow)
        member, fire = effects.member, False
        if member is not None:
            fire = await self._join(member, store.task_id, store.ttl)
            if fire:
                follow.extend(effects.callback)
        if follow:
            await self._broker.publish_many(self.outgoing(follow))
        if fire:
            assert member is not None and isinstance(self._backend, JoinsChords)
            await self._backend.chord_sent(member["id"], store.ttl)

    async def settle_with_ack(self, delivery: Delivery, store: Store) -> bool:
        """All of it, the store and the ack in one script (Redis broker and results on one
        server: see :mod:`.redis_settle`). Returns whether the worker still held the message."""
        from ..backends.redis import RedisBackend
        from ..brokers.redis import RedisBroker
        from .redis_settle import settle_in_one_script

        effects = self.plan(store)
        backend, broker = self._backend, self._broker
        assert isinstance(backend, RedisBackend) and isinstance(broker, RedisBroker)
        assert store.outcome is not None and store.flow is not None
        if effects is None:
            effects = Effects(outcome=None)
        member = effects.member
        return await settle_in_one_script(
            backend,
            broker,
            delivery,  # type: ignore[arg-type]
            stores=[store.task_id, *effects.skipped],
            outcome=store.outcome,
            ttl=store.ttl,
            reply_to=store.reply_to,
            follow=self.outgoing(effects.follow),
            chord=None if member is None else (member["id"], store.task_id, member["n"]),
            callback=self.outgoing(effects.callback),
        )

    async def _join(self, member: dict[str, Any], member_id: str, ttl: float) -> bool:
        backend = self._backend
        if not isinstance(backend, JoinsChords):
            raise AioQueueError(f"result backend {backend.url} cannot count a chord's members")
        return await backend.chord_join(member["id"], member_id, member["n"], ttl)


def _member_info(chord_id: str, member: str, outcome: Outcome | None) -> ErrorInfo:
    if outcome is not None:
        return error_info(outcome)
    return ErrorInfo(
        state=States.PENDING,
        type="aioqueue.errors.ChordError",
        message=str(_member_error(chord_id, member, None)),
        traceback=None,
    )


def _member_error(chord_id: str, member: str, outcome: Outcome | None) -> ChordError:
    if outcome is None:
        return ChordError(
            f"chord {chord_id}: member {member} has no result (its result expired or was "
            "forgotten before the chord completed)"
        )
    origin = "" if outcome.task_id == member else f" (step {outcome.task_id} of it)"
    return ChordError(
        f"chord {chord_id}: member {member}{origin} ended {outcome.state}: "
        f"{outcome.exc_type}: {outcome.exc_message}"
    )
