"""One pub/sub connection per process, fanned out to every coroutine waiting for a result.

The listener owns a plain redis-py ``Connection`` (public API only: ``connect``,
``send_packed_command``, ``read_response``, ``disconnect``) rather than a ``PubSub`` object, so
that nothing but this module subscribes, reconnects or resubscribes on it:

* one **reader** task reads frames (replies pushed to this process, ``done`` notices for ids
  waited on by subscription, subscribe confirmations) and reconnects with back-off;
* one **writer** task sends every SUBSCRIBE / UNSUBSCRIBE, so concurrent waiters never write
  to the socket themselves (a waiter cancelled mid-write would otherwise tear the connection
  down for everyone), and whatever changed since its last write goes out as one command.

The listener also hears ``<prefix>:forgotten``: ``forget()`` anywhere (a requeued dead letter
is forgotten before it runs again) drops this process's pushed copy of that id.

Subscriptions to ``<prefix>:done:<id>`` are reference-counted: two waiters on one id share one
subscription, and the last to leave ends it. Each waiter has a future of its own, so one
waiter's timeout never touches another.

After a reconnect the writer sends every wanted ``done`` channel and then the reply channel in
one write; the reply channel's confirmation therefore means all are in place, and only then are
the keys of every waiting id read again (pushes sent while we were away are lost).

A silent link is probed: after ``ping_interval`` seconds without a frame the writer sends PING,
and a second silent interval counts as a dead connection.

A push can also be lost with the connection up: Redis Cluster carries a PUBLISH to the other
nodes over its bus, and drops it while a bus link is down. So a wait that outlives a whole
``recheck_interval`` has its key read (one MGET for all such waits, every interval): a lost push
then costs a few seconds, not the whole wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

from hiredis import pack_command

from ..errors import ResultBackendError
from ._pushcache import DEFAULT_MAX_BYTES, PushCache

__all__ = ["DEFAULT_REPLY_TTL", "ResultListener", "forgotten_channel", "parse_reply"]

log = logging.getLogger("aioqueue.backend.redis")

DEFAULT_REPLY_TTL = 86400.0
"""How long an outcome pushed in the old frame format (no TTL in it) serves waits here."""
_CHANNELS_PER_COMMAND = 5000


def forgotten_channel(key_prefix: str) -> str:
    """Where ``forget()`` announces an id, so every listener drops its pushed copy."""
    return f"{key_prefix}:forgotten"


def parse_reply(data: bytes) -> tuple[str, float | None, bytes]:
    """Split a reply frame into (task id, TTL seconds or None, outcome).

    Frames are ``b"<task id> <ttl seconds> <outcome>"``; the older ``b"<task id> <outcome>"``
    is read too. An outcome never starts with a digit (serialized outcomes are maps), so a
    middle field that starts with one is the TTL.
    """
    task_id, _, rest = data.partition(b" ")
    head, sep, tail = rest.partition(b" ")
    if sep and head[:1].isdigit():
        try:
            return task_id.decode(), float(head), tail
        except ValueError:
            pass
    return task_id.decode(), None, rest


class _Subscription:
    """One ``done`` channel: how many waiters want it, and whether the server confirmed it."""

    __slots__ = ("confirmed", "refs", "sent")

    def __init__(self, confirmed: asyncio.Future[None]) -> None:
        self.confirmed = confirmed
        self.refs = 0
        self.sent = False  # a SUBSCRIBE for it went out on the current connection


_FIRST_PROBE = 1.0
"""Seconds a new connection waits for its first confirmations before it probes (PING)."""


class ResultListener:
    """The reply channel of this process plus the ``done`` channels its waiters need."""

    ping_interval = 30.0
    recheck_interval = 5.0
    """Seconds after which (and then every so often) a wait's key is read (module docstring)."""

    def __init__(
        self,
        *,
        key_prefix: str,
        url: str,
        new_connection: Callable[[], Any],
        fetch: Callable[[Iterable[str]], None],
        cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.url = url
        self.channel = f"{key_prefix}:reply:{uuid.uuid4().hex}"
        self.epoch = 0
        self.cache = PushCache(cache_bytes)
        self._new_connection = new_connection
        self._fetch = fetch
        self._channel_bytes = self.channel.encode()
        self._forgotten = forgotten_channel(key_prefix)
        self._forgotten_bytes = self._forgotten.encode()
        self._done_prefix = f"{key_prefix}:done:"
        self._done_prefix_bytes = self._done_prefix.encode()
        self._waiters: dict[str, list[asyncio.Future[bytes]]] = {}
        self._subs: dict[str, _Subscription] = {}
        self._dirty: set[str] = set()
        self._confirming: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._conn: Any = None
        self._fresh = False  # _conn has been sent nothing yet
        self._ping = False
        self._wake = asyncio.Event()
        self._ready: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- what senders and waiters use --------------------------------------------------------

    def token(self) -> object:
        """Names this listener and every event since which a push to it may have been lost.

        Equal tokens at send and at wait time mean the outcome is (or will be) pushed here and
        kept until its TTL: the wait needs no subscription and no read. Another listener (an
        App closed and connected again), a reconnect, or an eviction from the cache all change
        it, and the waiter then subscribes and reads.
        """
        if not self.epoch:
            return None
        return (self.channel, self.epoch, self.cache.evictions)

    async def start(self) -> None:
        if self._ready is None:
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            self._tasks = [
                loop.create_task(self._read_forever()),
                loop.create_task(self._write_forever()),
                loop.create_task(self._recheck_forever()),
            ]
        await asyncio.shield(self._ready)

    def register(self, task_id: str) -> asyncio.Future[bytes]:
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, []).append(waiter)
        return waiter

    def unregister(self, task_id: str, waiter: asyncio.Future[bytes]) -> None:
        waiters = self._waiters.get(task_id)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[task_id]

    def waiting(self, task_id: str) -> bool:
        return task_id in self._waiters

    def wake(self, task_id: str, outcome: bytes) -> None:
        for waiter in self._waiters.pop(task_id, ()):
            if not waiter.done():
                waiter.set_result(outcome)

    def fail(self, task_id: str, exc: BaseException) -> None:
        for waiter in self._waiters.pop(task_id, ()):
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # its waiter may be gone already; it still raises if not

    def acquire_done(self, task_id: str) -> asyncio.Future[None]:
        """Want ``done:<task_id>``; the future resolves once the server confirmed it.

        Await it through ``asyncio.shield``: it is shared with other waiters on the same id.
        """
        name = self._done_prefix + task_id
        sub = self._subs.get(name)
        if sub is None:
            sub = self._subs[name] = _Subscription(asyncio.get_running_loop().create_future())
        sub.refs += 1
        if not sub.sent:
            self._dirty.add(name)
            self._wake.set()
        return sub.confirmed

    def release_done(self, task_id: str) -> None:
        name = self._done_prefix + task_id
        sub = self._subs.get(name)
        if sub is None:
            return
        sub.refs -= 1
        if sub.refs <= 0:
            sub.refs = 0
            self._dirty.add(name)
            self._wake.set()

    # -- the reader --------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        backoff = 0.05
        while not self._closing:
            conn = self._new_connection()
            try:
                await conn.connect()
                backoff = 0.05
                self._conn, self._fresh = conn, True
                self._wake.set()
                await self._read(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                if self._ready is not None and not self._ready.done():
                    self._give_up(exc)
                    return
                # Warn once per outage, not at every attempt.
                (log.warning if backoff == 0.05 else log.debug)(
                    "result listener lost %s (%s); reconnecting", self.url, exc
                )
            finally:
                if self._conn is conn:
                    self._conn = None
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _give_up(self, exc: Exception) -> None:
        """The very first connection failed: the caller of ``start()`` gets the error."""
        assert self._ready is not None
        self._ready.set_exception(ResultBackendError(f"cannot listen on {self.url}: {exc}"))
        self._ready = None
        writer = self._tasks[1] if len(self._tasks) > 1 else None
        if writer is not None:
            writer.cancel()
        self._tasks = []

    async def _read(self, conn: Any) -> None:
        probed = False
        while True:
            # Until the reply channel's SUBSCRIBE is confirmed every waiter waits on start():
            # the probe then comes after a second, not after ping_interval, and sends every
            # subscription again with its PING (SUBSCRIBE is idempotent), in case the first
            # write never reached the server.
            listening = self._ready is None or self._ready.done()
            wait = self.ping_interval if listening or probed else _FIRST_PROBE
            frame = await conn.read_response(disable_decoding=True, timeout=wait)
            if frame is None:
                if probed:
                    raise ConnectionError(f"no reply to PING within {self.ping_interval}s")
                probed = self._ping = True
                if not listening:
                    self._fresh = True
                self._wake.set()
                continue
            probed = False
            self._dispatch(frame)

    def _dispatch(self, frame: Any) -> None:
        if not isinstance(frame, list) or len(frame) != 3:
            return  # a PING reply (two items) or nothing we asked for
        kind, channel, data = frame
        if kind == b"message":
            if channel == self._channel_bytes:
                task_id, ttl, outcome = parse_reply(data)
                if self.cache.get(task_id) is not None:
                    return  # the first push wins, as the first store did
                if ttl is None:
                    self.cache.put(task_id, outcome, DEFAULT_REPLY_TTL, ttl_known=False)
                else:
                    self.cache.put(task_id, outcome, ttl)
                self.wake(task_id, outcome)
            elif channel.startswith(self._done_prefix_bytes):
                self._fetch((channel[len(self._done_prefix_bytes) :].decode(),))
            elif channel == self._forgotten_bytes:
                self.cache.pop(data.decode())
        elif kind == b"subscribe":
            if channel == self._channel_bytes:
                self._on_listening()
            else:
                self._confirm(channel)

    async def _recheck_forever(self) -> None:
        """Each interval, read the keys of the waits that were there at the previous one."""
        seen: set[str] = set()
        while True:
            await asyncio.sleep(self.recheck_interval)
            waiting = set(self._waiters)
            overdue = seen & waiting
            if overdue and self.epoch:
                self._fetch(overdue)
            seen = waiting

    def _on_listening(self) -> None:
        self.epoch += 1
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        elif self._waiters:
            # Reconnected: pushes may have been missed while we were away; read the keys.
            self._fetch(list(self._waiters))

    def _confirm(self, channel: bytes) -> None:
        queue = self._confirming.get(channel)
        if not queue:
            return
        future = queue.popleft()
        if not queue:
            del self._confirming[channel]
        if not future.done():
            future.set_result(None)

    # -- the writer --------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            conn = self._conn
            if conn is None or not conn.is_connected:
                continue  # the reader sets _fresh on the next connection: all is sent then
            commands = self._commands()
            if not commands:
                continue
            try:
                await conn.send_packed_command(commands, check_health=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The reader sees the dead link too, reconnects and resends everything.
                log.debug("result listener could not write to %s: %s", self.url, exc)
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    def _commands(self) -> list[bytes]:
        """What changed since the last write, packed; the whole set on a fresh connection."""
        fresh, self._fresh = self._fresh, False
        subscribe, unsubscribe = self._resubscribe_all() if fresh else self._changes()
        self._dirty.clear()
        for name in subscribe:
            sub = self._subs[name]
            sub.sent = True
            self._confirming.setdefault(name.encode(), deque()).append(sub.confirmed)
        if fresh:
            # last: the reply channel's confirmation means all are in place
            subscribe += [self._forgotten, self.channel]
        commands = [_pack("UNSUBSCRIBE", *c) for c in _chunks(unsubscribe)]
        commands += [_pack("SUBSCRIBE", *c) for c in _chunks(subscribe)]
        if self._ping:
            self._ping = False
            commands.append(_pack("PING"))
        return commands

    def _resubscribe_all(self) -> tuple[list[str], list[str]]:
        self._confirming.clear()
        subscribe = []
        for name, sub in list(self._subs.items()):
            if sub.refs:
                sub.sent = False
                subscribe.append(name)
            else:
                del self._subs[name]
        return subscribe, []

    def _changes(self) -> tuple[list[str], list[str]]:
        subscribe, unsubscribe = [], []
        for name in self._dirty:
            sub = self._subs.get(name)
            if sub is None:
                continue
            if sub.refs and not sub.sent:
                subscribe.append(name)
            elif not sub.refs:
                del self._subs[name]
                if sub.sent:
                    unsubscribe.append(name)
        return subscribe, unsubscribe

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the socket under the reader first, then cancel its tasks.

        A read cancelled mid-flight has to clean up after itself; a read on a closed socket
        fails at once and leaves the reader in its back-off sleep, where cancelling is clean.
        """
        self._closing = True
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        closed = ResultBackendError(f"the result backend {self.url} was closed")
        for task_id in list(self._waiters):
            self.fail(task_id, closed)
        for sub in self._subs.values():
            if not sub.confirmed.done():
                sub.confirmed.set_exception(closed)
                sub.confirmed.exception()  # retrieved: nobody may be awaiting it any more
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(closed)
            self._ready.exception()


def _pack(*command: str) -> bytes:
    packed: bytes = pack_command(cast(Any, command))
    return packed


def _chunks(names: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(names), _CHANNELS_PER_COMMAND):
        yield names[start : start + _CHANNELS_PER_COMMAND]
