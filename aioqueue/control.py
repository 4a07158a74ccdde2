"""``app.control``: commands to every worker: revoke by task id, rate or concurrency limits by
task name (kept like revocations, pushed the same way; see aioqueue.worker.limiting), inspect,
ping, shutdown, add and cancel consumers.

A revoke is kept (for ``revoke_ttl`` seconds, default seven days) where every worker can read
it and pushed to the workers running now; a worker loads the kept ones when it starts, after
it began listening, so none is missed. A worker checks each delivery against its local set of
revoked ids (one dict lookup): revoking costs the hot path nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._control_bus import ControlBus, Listening, OnLimit, OnRequest, OnRevoke, control_bus_for
from .errors import ConfigurationError
from .inspection import DEFAULT_TIMEOUT, Inspect, request
from .limits import check_concurrency_limit, parse_rate
from .message import Outcome, States

if TYPE_CHECKING:
    from .app import App

__all__ = ["Control", "RevokeReport"]

log = logging.getLogger("aioqueue.control")


@dataclass(frozen=True, slots=True)
class RevokeReport:
    """What a revoke did. Truthy when it was recorded, falsy for a no-op."""

    task_id: str
    revoked: bool
    """False: the task had already finished (the revoke changed nothing)."""
    state: str
    """The task's state when the revoke was made (PENDING also for an id nobody knows)."""
    detail: str

    def __bool__(self) -> bool:
        return self.revoked


@runtime_checkable
class Broadcasts(Protocol):
    """A backend whose clients wait on a reply channel of their own (Redis)."""

    async def broadcast(self, task_id: str, outcome: bytes, *, ttl: float) -> int: ...


class Control:
    """Commands to all workers: ``await app.control.revoke(task_id, terminate=True)``."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._bus: ControlBus | None = None

    def bus(self) -> ControlBus:
        if self._bus is None:
            self._bus = control_bus_for(self._app)
        return self._bus

    async def revoke(self, task_id: str, *, terminate: bool = False) -> RevokeReport:
        """Stop ``task_id`` from ever starting, on every worker, including later ones.

        ``terminate=True`` also stops it if it is running: an async task is cancelled, a
        process task's child killed (and replaced), a thread task told through
        ``ctx.cancelled`` and its result discarded. Its outcome is REVOKED and ``get()`` raises
        :class:`~aioqueue.TaskRevoked`.

        A task that has finished is left alone (the report says so, falsy). An id with no
        record cannot be told from a task still waiting in its queue (states are only stored
        once a worker takes a task), so it is recorded either way; the report says which.
        """
        if not isinstance(task_id, str) or not task_id:
            raise ConfigurationError(f"revoke takes a task id, not {task_id!r}")
        app = self._app
        ttl = app.conf.revoke_ttl
        bus = self.bus()
        backend = await app.ready_backend()
        raw = await backend.get(task_id)
        outcome = app.codec.decode_outcome(raw) if raw is not None else None
        state = outcome.state if outcome is not None else States.PENDING
        if outcome is not None and outcome.ready:
            detail = f"task {task_id} already finished ({state}): nothing to revoke"
            log.info("%s", detail)
            return RevokeReport(task_id, False, state, detail)
        await bus.revoke([task_id], terminate, ttl)
        running = state not in (States.PENDING, States.RETRY)
        if running and not terminate:
            detail = (
                f"task {task_id} is running ({state}): it finishes, but will not start again "
                "(a retry of it is revoked)"
            )
        else:
            if not running:
                # Waiting (or unknown): REVOKED now, so get() need not wait for a worker to
                # take the message; the first outcome stored wins, so the worker's is moot.
                await self._mark_revoked(task_id)
            detail = (
                f"task {task_id} ({'no record of it' if outcome is None else state}) "
                f"will never start; revocation kept {ttl:g}s"
                if not running
                else f"task {task_id} ({state}) is being terminated"
            )
        log.info("revoked: %s", detail)
        return RevokeReport(task_id, True, state, detail)

    async def _mark_revoked(self, task_id: str) -> None:
        """Store REVOKED now and tell whoever waits, so ``get()`` need not wait for a worker to
        take the message (at its eta, maybe hours away). The first outcome stored wins, so a
        worker's later one changes nothing."""
        app = self._app
        backend = await app.ready_backend()
        ttl = app.conf.result_ttl
        revoked = app.codec.encode_outcome(Outcome.revoked(task_id, "revoked"))
        # rpc:// stores nothing: the REVOKED goes to this process's own reply queue.
        local = None if getattr(backend, "persistent", True) else backend.reply_to()
        await backend.store(task_id, revoked, ttl=ttl, reply_to=local)
        if isinstance(backend, Broadcasts) and await backend.get(task_id) == revoked:
            await backend.broadcast(task_id, revoked, ttl=ttl)

    async def rate_limit(self, task_name: str, rate: str | None) -> None:
        """Set ``task_name``'s rate limit on every worker, now and started later (None: none).

        Kept where workers read it when they start, and pushed to the running ones; it
        overrides the task's ``rate_limit=`` until changed again.
        """
        _check_task_name(task_name)
        if rate is not None:
            parse_rate(rate, f"rate limit of {task_name!r}")
        await self.bus().set_limit(task_name, "rate", rate)
        log.info("rate limit of %s set to %s", task_name, rate)

    async def concurrency_limit(self, task_name: str, limit: int | None) -> None:
        """Set how many ``task_name`` runs may run at once across all workers (None: no cap)."""
        _check_task_name(task_name)
        if limit is not None:
            check_concurrency_limit(limit, f"concurrency limit of {task_name!r}")
        await self.bus().set_limit(task_name, "cap", limit)
        log.info("concurrency limit of %s set to %s", task_name, limit)

    async def reset_limits(self, task_name: str) -> None:
        """Forget the run-time rate and concurrency limits of ``task_name`` on every worker:
        each goes back to what the task declares (``@app.task(rate_limit=...)``)."""
        _check_task_name(task_name)
        await self.bus().set_limit(task_name, "reset", None)
        log.info("limits of %s reset to the declared ones", task_name)

    async def listen(
        self,
        on_revoke: OnRevoke,
        on_limit: OnLimit | None = None,
        on_request: OnRequest | None = None,
    ) -> Listening:
        """For workers: receive revocations and limits (the kept ones first) and requests."""
        if on_limit is None:
            return await self.bus().listen(on_revoke, on_request=on_request)
        return await self.bus().listen(on_revoke, on_limit, on_request)

    def inspect(
        self, destination: str | Sequence[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> Inspect:
        """Questions to the workers (all, or those of ``destination``), each answered within
        ``timeout`` seconds: ``await app.control.inspect().active()``."""
        return Inspect(self, destination, timeout)

    async def ping(
        self, destination: str | Sequence[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """{worker id: "pong"} for each live worker that answered within ``timeout``."""
        return await self.inspect(destination, timeout=timeout).ping()

    async def shutdown(
        self, destination: str | Sequence[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Ask workers to stop as on SIGTERM (finish running tasks, give back the rest);
        {worker id: "shutting down"} for those that acknowledged."""
        return await request(self, "shutdown", destination=destination, timeout=timeout)

    async def add_consumer(
        self,
        queue: str,
        destination: str | Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict[str, Any]:
        """Workers also consume ``queue``; {worker id: the queues it now consumes}."""
        return await request(
            self, "add_consumer", {"queue": queue}, destination=destination, timeout=timeout
        )

    async def cancel_consumer(
        self,
        queue: str,
        destination: str | Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict[str, Any]:
        """Workers stop consuming ``queue`` (running tasks of it finish); {worker id: the
        queues it still consumes}, or ``{"error": ...}`` for a worker that did not have it."""
        return await request(
            self, "cancel_consumer", {"queue": queue}, destination=destination, timeout=timeout
        )

    async def aclose(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.aclose()


def _check_task_name(task_name: object) -> None:
    if not isinstance(task_name, str) or not task_name:
        raise ConfigurationError(f"a limit is set on a task name, not {task_name!r}")
