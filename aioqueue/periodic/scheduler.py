"""The scheduler: sleeps until the next due tick, claims it, sends it.

One asyncio task per worker (or per ``aioqueue beat``), apart from the consuming loop: it
wakes only when a tick is due (or once a minute, to notice a wall-clock jump), so it adds
nothing to the worker's hot path. ``step(now)`` is the whole decision, with the time passed
in, so tests drive it with an injected clock instead of waiting.

Lateness: a tick is sent when the event loop wakes at its due time, normally within a few
milliseconds; the message carries ``expires`` (the interval by default) so a backlog does
not run stale ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from .claims import MemoryClaims, RedisClaims, TickClaims, claim_ttl
from .entries import Entry

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Scheduler", "Tick", "claims_for", "tick_id"]

log = logging.getLogger("aioqueue.periodic")

_MAX_SLEEP = 60.0
_RETRY_DELAY = 1.0


@dataclass(frozen=True)
class Tick:
    """A tick this scheduler claimed and sent."""

    entry: str
    due: float
    task_id: str


def tick_id(entry: str, due: float) -> str:
    """The task id of a tick: the same in every scheduler, so a second send is a duplicate."""
    return f"periodic:{entry}:{round(due * 1000)}"


def claims_for(app: App, *, compete: bool = True) -> TickClaims:
    """The claim store that goes with the app's transports.

    Redis broker: its Redis. AMQP broker with a Redis result backend: that Redis. AMQP with
    ``rpc://`` results: a RabbitMQ single-active-consumer lease. ``memory://``: this process.
    """
    from ..connections import AMQP_SCHEMES, REDIS_SCHEMES
    from ..tls import with_tls

    conf = app.conf
    broker_scheme = conf.broker_url.partition("://")[0].lower()
    if broker_scheme == "memory":
        return MemoryClaims(app.broker)
    redis_url = None
    if broker_scheme in REDIS_SCHEMES:
        redis_url = with_tls(conf.broker_url, conf)
    elif broker_scheme in AMQP_SCHEMES:
        from ..backends.redis import RedisBackend

        backend = app.backend
        if isinstance(backend, RedisBackend):
            redis_url = backend.connect_url  # not .url: that one has the password masked
        else:
            from .amqp_lease import AmqpLeaseClaims

            return AmqpLeaseClaims(
                with_tls(conf.broker_url, conf),
                key_prefix=conf.key_prefix,
                connect_timeout=conf.broker_connect_timeout,
                heartbeat=conf.amqp_heartbeat,
                reconnect_interval=conf.amqp_reconnect_interval,
                client_name=f"aioqueue:{app.name}",
                compete=compete,
            )
    if redis_url is None:
        raise ConfigurationError(f"no schedule claims for broker scheme {broker_scheme!r}")
    return RedisClaims(
        redis_url,
        key_prefix=conf.key_prefix,
        connect_timeout=conf.broker_connect_timeout,
        client_name=f"aioqueue:{app.name}:beat",
    )


class Scheduler:
    """Sends the app's periodic entries; any number may run, each tick goes out once."""

    def __init__(
        self,
        app: App,
        *,
        claims: TickClaims | None = None,
        clock: Callable[[], float] | None = None,
        owner: str = "scheduler",
    ) -> None:
        self.app = app
        self.entries: list[Entry] = app.periodic_entries()  # checked here, before any I/O
        self.claims = claims if claims is not None else claims_for(app)
        self.clock = app.clock if clock is None else clock
        """The app's clock unless given: a test's virtual clock drives the schedule too."""
        self.owner = owner
        self.sent = 0
        """Ticks this scheduler claimed and sent."""
        self._next: dict[str, float] = {}
        self._stop = asyncio.Event()

    async def start_at(self, now: float) -> None:
        """Plan each entry's first tick: the next one after ``now`` (``skip``), or the first
        after its last claimed tick (``catch_up``, sent by the first ``step``)."""
        await self.claims.open()
        catching = [e.name for e in self.entries if e.missed == "catch_up"]
        last = await self.claims.last(catching) if catching else {}
        for entry in self.entries:
            record = last.get(entry.name)
            since = record.due if record is not None and record.due < now else now
            self._next[entry.name] = entry.schedule.next_after(since)

    def next_wake(self) -> float | None:
        return min(self._next.values(), default=None)

    async def step(self, now: float) -> list[Tick]:
        """Send what is due at ``now``: the latest due tick (``skip``), or every tick missed
        since the last one planned, at most ``catch_up_limit`` of the latest (``catch_up``)."""
        sent: list[Tick] = []
        for entry in self.entries:
            planned = self._next.get(entry.name)
            if planned is None or planned > now:
                continue
            latest = entry.schedule.latest_at(now)
            dues = [latest]
            if entry.missed == "catch_up":
                while len(dues) < entry.catch_up_limit:
                    earlier = entry.schedule.previous_before(dues[-1])
                    if earlier < planned:
                        break
                    dues.append(earlier)
                dues.reverse()
            self._next[entry.name] = entry.schedule.next_after(latest)
            for due in dues:
                tick = await self._fire(entry, due)
                if tick is not None:
                    sent.append(tick)
        return sent

    async def _fire(self, entry: Entry, due: float) -> Tick | None:
        task_id = tick_id(entry.name, due)
        if not await self.claims.claim(
            entry.name, due, task_id, claim_ttl(entry.tick_expires(due))
        ):
            return None
        options = dict(entry.options)
        options.setdefault("queue", self._queue_of(entry))
        options["task_id"] = task_id
        options["expires"] = entry.tick_expires(due)
        # The tick's id is held for its own window, not for the result TTL: the tick claim
        # above already keeps a tick from being sent twice, and a day-long hold per tick
        # would pile up one claim per tick (a queue each on rpc://, 86,400 a day for every=1).
        options.setdefault("unique_for", entry.tick_expires(due))
        try:
            await self.app.send_task(entry.task, entry.args, dict(entry.kwargs), **options)
        except Exception:
            log.exception("periodic entry %r: sending the tick due %s failed", entry.name, due)
            return None
        self.sent += 1
        return Tick(entry.name, due, task_id)

    def _queue_of(self, entry: Entry) -> str:
        task = self.app.tasks.get(entry.task)
        return (task.queue if task is not None else None) or self.app.conf.default_queue

    # -- running --------------------------------------------------------------------------

    async def run(self) -> None:
        """Send ticks until ``stop()``; a failing claim store or broker is retried, not fatal."""
        try:
            while not self._stop.is_set():
                try:
                    await self.start_at(self.clock())
                    break
                except Exception as exc:
                    log.warning("scheduler cannot start yet: %s; retrying", exc)
                    await self._sleep(_RETRY_DELAY)
            if self._stop.is_set():
                return
            log.info(
                "%s scheduling %d periodic entr%s (claims: %s)",
                self.owner,
                len(self.entries),
                "y" if len(self.entries) == 1 else "ies",
                self.claims.description,
            )
            while not self._stop.is_set():
                try:
                    await self.step(self.clock())
                except Exception:
                    log.exception("periodic scheduler step failed; retrying")
                    await self._sleep(_RETRY_DELAY)
                    continue
                wake = self.next_wake()
                delay = _MAX_SLEEP if wake is None else wake - self.clock()
                await self._sleep(min(max(delay, 0.0), _MAX_SLEEP))
        finally:
            await self.claims.close()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
