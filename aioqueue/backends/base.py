"""The result-backend seam: outcomes as bytes, stored with a TTL, awaited without polling."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..brokers.base import Delivery

__all__ = [
    "ClaimsTaskIds",
    "LeasesSteps",
    "ListensForReplies",
    "ResultBackend",
    "StoresWithAck",
    "Watches",
]


class ResultBackend(Protocol):
    """Stores task outcomes and wakes the coroutines awaiting them.

    A final outcome is stored once: the first ``store`` for a task id wins and later ones (a
    duplicate run after a redelivery, a worker that lost its lease) change nothing, so every
    reader sees one final result per id.
    """

    url: str
    """The backend URL with any password masked: safe to log."""

    async def connect(self) -> None: ...

    def reply_to(self) -> str | None:
        """Address that workers push this process's outcomes to, or None if not supported.

        Senders put it in each message so ``result.get()`` in the sending process is woken by
        a push on a channel it already listens to, with no per-task subscription.
        """

    def send_token(self) -> object:
        """Opaque marker taken at send time; ``wait`` uses it to skip a needless read.

        It must identify the listener itself (not a counter that restarts with a new one): a
        handle kept across ``App.close()`` and a new connection carries the old listener's
        token, whose pushes the new listener never receives, and must read instead of waiting.
        It also changes whenever a push to this listener may have been lost (a reconnect, an
        eviction from the local cache), for the same reason.
        """

    async def store(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None
    ) -> None:
        """Store a final outcome (SUCCESS or FAILURE) and wake its waiters."""

    async def store_state(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None = None
    ) -> None:
        """Store an intermediate state (RECEIVED, STARTED, PROGRESS...) and push it to watchers
        (:class:`Watches`); wakes no ``get()`` waiter.

        ``reply_to`` lets a backend that cannot be read by id (``rpc://``) push it to the
        sender; a backend that stores by id ignores it.
        """

    async def get(self, task_id: str) -> bytes | None:
        """The final outcome, else the latest intermediate state, else None.

        Agrees with ``wait``: what ``wait`` would return at once, ``get`` returns, and an
        outcome forgotten or past its TTL is None for both.
        """

    async def wait(self, task_id: str, *, timeout: float | None, token: object = None) -> bytes:
        """The final outcome, as soon as it is stored; raises ResultTimeout after ``timeout``.

        Any number of waiters, on any ids (several on one id too), cost no connection each;
        one waiter's timeout or departure never affects another. While the backend is
        unreachable the wait goes on (only ``timeout`` ends it); where the outcome can never
        arrive (``rpc://`` without the reply queue it was sent to) it fails at once.
        """

    async def forget(self, task_id: str) -> None:
        """Delete the outcome now: the stored copy and this process's local one."""

    async def aclose(self) -> None: ...


@runtime_checkable
class StoresWithAck(Protocol):
    """Optional: a backend that can store an outcome and ack its message in one atomic step.

    The worker checks it once at start (``shares_server_with`` its broker), never per message.
    """

    def shares_server_with(self, broker: object) -> bool:
        """True when ``broker``'s deliveries can be acked together with this backend's stores."""

    async def store_and_ack(
        self,
        delivery: Delivery,
        task_id: str,
        outcome: bytes,
        *,
        ttl: float,
        reply_to: str | None,
        claim_ttl: float | None = None,
    ) -> bool:
        """Store (first wins), then ack, in one step; False if the message was no longer the
        worker's (its lease was taken over): the first outcome stored for the task stands.
        ``claim_ttl`` as in :meth:`ClaimsTaskIds.store`."""


@runtime_checkable
class ListensForReplies(Protocol):
    """Optional: a backend that pushes outcomes to the process that sent the tasks.

    ``App.connect`` starts listening before the first send, so every message it sends names a
    reply channel that is already being read, and ``get()`` in the sending process costs no read.
    """

    async def start_listening(self) -> None:
        """Subscribe this process's reply channel (or declare its reply queue) now."""


@runtime_checkable
class ClaimsTaskIds(Protocol):
    """Optional: a backend that can take a task id atomically, so a second send enqueues nothing.

    Only sends that ask for it (an explicit ``task_id``, a ``unique_for`` task) claim, and only
    their messages carry the envelope's ``claim`` field; so ``store`` and ``store_and_ack`` get
    ``claim_ttl`` only for those, and a plain message costs nothing extra anywhere.
    """

    async def claim(self, task_id: str, ttl: float, *, fresh: bool) -> bool:
        """Take ``task_id`` for ``ttl`` seconds; False if it is held already.

        ``fresh=False`` (an explicit id): a result still kept for the id also refuses the claim.
        ``fresh=True`` (``unique_for``, an id derived from the arguments): an earlier run's
        result under the id is deleted instead, so this run's outcome can be stored.
        """

    async def end_claim(self, task_id: str, claim_ttl: float) -> None:
        """Keep the claim ``claim_ttl`` more seconds from now, or release it now if 0."""

    async def store(
        self,
        task_id: str,
        outcome: bytes,
        *,
        ttl: float,
        reply_to: str | None,
        claim_ttl: float | None = None,
    ) -> None:
        """``ResultBackend.store``, and with ``claim_ttl`` the claim's end set in the same step."""


@runtime_checkable
class LeasesSteps(Protocol):
    """Optional: a backend that leases a workflow step's run, so two copies of one step (a
    worker died between publishing the next step and acking its own) never both run.

    Used only where a step's follow-ups are not settled in one script with its ack (RabbitMQ,
    or results on another Redis than the broker's); plain tasks never take a lease.
    """

    async def take_step(self, task_id: str, run: int, token: str, lease: float) -> float:
        """Take the run ``run`` (its retry count) of step ``task_id`` for ``lease`` seconds:
        0.0 when taken (or already held by ``token``), -1.0 when its final outcome is stored,
        else the seconds until its holder's lease ends (a dead holder's lapses)."""

    async def renew_step(self, task_id: str, run: int, token: str, lease: float) -> bool:
        """Keep the lease ``lease`` more seconds if ``token`` still holds it."""


@runtime_checkable
class ReadsMany(Protocol):
    """Optional: a backend that reads many outcomes in a few round trips (a workflow's tree)."""

    async def get_many(self, task_ids: Sequence[str]) -> list[bytes | None]:
        """What ``get`` returns for each id, in order."""


@runtime_checkable
class Watches(Protocol):
    """Optional: a backend that pushes every state change of a task (``result.watch()``)."""

    def watch(self, task_id: str, token: object = None) -> AsyncIterator[bytes]:
        """The stored outcome (if any), then each state stored after it, ending with the final
        one; pushed, never polled. Nothing stored between the subscription and the first read
        is missed. A state equal to the one before it is not repeated."""
