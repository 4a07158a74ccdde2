"""The worker's side of rate limits and concurrency caps: which apply, and the gate before a run.

:class:`Limits` is the table in force on this worker: each task's declared limits, overridden by
``app.control.rate_limit`` / ``concurrency_limit`` (loaded when the worker starts listening,
then pushed). The handler asks it one question per message (``if limits.active``: a dict's
truthiness), so a plain task pays nothing else.

:class:`Gate` decides for a limited task, before it takes its run:

* **over its rate**, a start within the horizon is reserved and the message *parked* until it
  (no slot held; reservations are handed out in fetch order, so order is kept). A start further
  out is not reserved: the message is *re-sent* due when the limiter says to come back (on Redis
  atomically with its ack, through the delayed set, whose mover puts it back at the front of its
  queue). Neither burns a retry or an attempt: a re-sent message is a new delivery.
* **over its cap**, the message is parked and tried again a moment later (jittered, and
  spread out by how many wait here, so a worker holding a thousand waiters does not ask a
  thousand times as often), without a slot; a permit is leased and renewed while the task
  runs (every third of ``concurrency_lease_ttl``), and released when it ends. A worker that
  dies stops renewing: its permits come back within one lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import AioQueueError, ConfigurationError
from ..limits import Rate, TaskLimits, check_concurrency_limit, parse_rate
from .settle import Resend

if TYPE_CHECKING:
    from .._limiter import Limiter
    from ..message import Message
    from ..message import MessageCodec as Codec
    from ..task import Task
    from .handler import Park

__all__ = ["Gate", "Limits", "Permit"]

log = logging.getLogger("aioqueue.worker")

_MIN_HORIZON = 1.0
"""Seconds of starts a rate limit reserves ahead (at least two intervals)."""
_LATE = 0.02
"""A reserved start resumed later than this (or than its burst of intervals) is reserved again."""
_UNAVAILABLE = 1.0
"""Seconds a task waits aside before asking a limiter that failed to answer again."""
_CAP_RETRY = (0.02, 0.25)
"""Bounds of the jittered wait before a capped task asks for a permit again."""


class Limits:
    """The limits in force on this worker, by task name (only limited tasks have an entry)."""

    def __init__(self, tasks: Mapping[str, Task[Any, Any]]) -> None:
        self._declared = {
            name: (getattr(task, "rate_limit", None), getattr(task, "concurrency_limit", None))
            for name, task in tasks.items()
        }
        self._changed: dict[tuple[str, str], Rate | int | None] = {}
        self.active: dict[str, TaskLimits] = {}
        """Mutated in place: the handler keeps a reference to it."""
        self._rebuild()

    def change(self, task: str, kind: str, value: Any) -> None:
        """A run-time change (``kind`` "rate" or "cap"; None: no limit; "reset": back to the
        declared ones) from app.control."""
        if kind == "reset":
            self._changed.pop(("rate", task), None)
            self._changed.pop(("cap", task), None)
            self._rebuild()
            log.info("limits of %s reset to the declared ones", task)
            return
        try:
            parsed: Rate | int | None
            if value is None:
                parsed = None
            elif kind == "rate":
                parsed = parse_rate(value, f"rate_limit of {task!r}")
            elif kind == "cap":
                parsed = check_concurrency_limit(value, f"concurrency_limit of {task!r}")
            else:
                raise ConfigurationError(f"unknown limit kind {kind!r}")
        except ConfigurationError as exc:
            log.warning("ignored a limit change for %s: %s", task, exc)
            return
        self._changed[(kind, task)] = parsed
        self._rebuild()
        log.info("limit of %s changed: %s = %s", task, kind, value)

    def _rebuild(self) -> None:
        names = set(self._declared) | {task for _, task in self._changed}
        active: dict[str, TaskLimits] = {}
        for name in names:
            rate, cap = self._declared.get(name, (None, None))
            if ("rate", name) in self._changed:
                changed = self._changed[("rate", name)]
                rate = changed if isinstance(changed, Rate) else None
            if ("cap", name) in self._changed:
                changed = self._changed[("cap", name)]
                cap = changed if isinstance(changed, int) else None
            if rate is not None or cap is not None:
                active[name] = TaskLimits(rate, cap)
        self.active.clear()
        self.active.update(active)


class Permit:
    """A concurrency permit held by one run; released (awaited) when the run ends."""

    __slots__ = ("_gate", "holder", "task")

    def __init__(self, gate: Gate, task: str, holder: str) -> None:
        self._gate = gate
        self.task = task
        self.holder = holder

    async def release(self) -> None:
        await self._gate.release(self)


class Gate:
    """Rate and cap checks against the shared limiter, and the renewal of held leases."""

    def __init__(
        self,
        limiter: Limiter,
        codec: Codec,
        *,
        worker_id: str,
        lease_ttl: float,
        max_hold: float | None,
    ) -> None:
        self.limiter = limiter
        self._codec = codec
        self._worker_id = worker_id
        self._lease_ttl = lease_ttl
        self._max_hold = max_hold
        self._held: dict[str, str] = {}
        self._waiting: dict[str, set[str]] = {}
        """Holders waiting here for a permit, by task (those given back on shutdown linger)."""
        self._keeper: asyncio.Task[None] | None = None

    def horizon(self, rate: Rate) -> float:
        horizon = max(_MIN_HORIZON, 2 * rate.interval)
        if self._max_hold is not None:
            horizon = min(horizon, self._max_hold / 2)
        return horizon

    async def enter(
        self, limits: TaskLimits, task: str, message: Message, parked: Park | None
    ) -> Park | Resend | Permit | None:
        """None or a Permit: run now. A Park or Resend: not yet (see the module docstring).

        ``parked``: how it waited, if it did. A reserved start resumed later than ``late``
        after its time (the worker was starved of CPU, say) is reserved again, once: run at
        once, the starts of a stall would bunch up over the limit as it catches up.
        """
        try:
            return await self._enter(limits, task, message, parked)
        except AioQueueError as exc:
            # The limiter's store is away: wait aside and ask again, costing no attempt.
            from .handler import Park

            log.warning("%s[%s]: limits cannot be checked (%s); retrying", task, message.id, exc)
            until, since = time.time() + _UNAVAILABLE, _held_since(parked)
            if self._max_hold is not None and until - since > self._max_hold / 2:
                return Park(until, give_back=True)
            return Park(until, give_back=False, held_since=since)

    async def _enter(
        self, limits: TaskLimits, task: str, message: Message, parked: Park | None
    ) -> Park | Resend | Permit | None:
        from .handler import Park

        rate = limits.rate
        if rate is not None and self._needs_reserving(rate, parked):
            horizon = self.horizon(rate)
            granted, at = await self.limiter.reserve(task, rate, horizon)
            if not granted:
                body = self._codec.encode(replace(message, eta=at))
                log.debug("%s[%s] over its rate limit: re-sent for %.3f", task, message.id, at)
                return Resend(message.queue, body, at, None)
            if at - time.time() > 0.0005:
                again = parked is not None and parked.reserved
                since = _held_since(parked)
                return Park(at, give_back=False, reserved=True, late_ok=again, held_since=since)
        cap = limits.cap
        if cap is None:
            return None
        holder = f"{self._worker_id}:{message.id}"
        waiting = self._waiting.setdefault(task, set())
        if not await self.limiter.acquire(task, cap, holder, self._lease_ttl):
            # Each waiter asks again after a jittered pause, longer the more of this task wait
            # here: this worker asks about cap / 0.135 times a second in all, however many.
            spread = max(1.0, (len(waiting) + 1) / cap)
            retry = random.uniform(_CAP_RETRY[0], min(_CAP_RETRY[1], self._lease_ttl / 4))
            until, since = time.time() + retry * spread, _held_since(parked)
            if self._max_hold is not None and until - since > self._max_hold / 2:
                # The broker would take it back (AMQP's consumer timeout): give it back first,
                # untouched, to wait in its queue (where any worker may take it).
                waiting.discard(holder)
                return Park(until, give_back=True)
            waiting.add(holder)
            return Park(until, give_back=False, reserved=True, late_ok=True, held_since=since)
        waiting.discard(holder)
        self._held[holder] = task
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep())
        return Permit(self, task, holder)

    def _needs_reserving(self, rate: Rate, parked: Park | None) -> bool:
        """Not reserved yet, or reserved but resumed late (once)."""
        if parked is None or not parked.reserved:
            return True
        if parked.late_ok:
            return False
        late = time.time() - parked.until
        if late <= max(_LATE, rate.interval * rate.burst):
            return False
        log.debug("a reserved start came %.3fs late: reserved again", late)
        return True

    async def release(self, permit: Permit) -> None:
        self._held.pop(permit.holder, None)
        try:
            await self.limiter.release(permit.task, permit.holder)
        except AioQueueError as exc:  # its lease lapses on its own
            log.warning("could not release a permit of %s (%s); it lapses", permit.task, exc)

    async def _keep(self) -> None:
        """Renew the leases of the permits held here, every third of a lease."""
        while self._held:
            await asyncio.sleep(self._lease_ttl / 3)
            held = [(task, holder) for holder, task in self._held.items()]
            try:
                await self.limiter.renew(held, self._lease_ttl)
            except AioQueueError as exc:
                log.warning("could not renew %d concurrency lease(s): %s", len(held), exc)

    async def aclose(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper


def _held_since(parked: Park | None) -> float:
    if parked is not None and parked.held_since is not None:
        return parked.held_since
    return time.time()
