"""Where control commands travel: pushed to live workers, kept for workers that start later.

A revocation is ``(task id, terminate, expires at)``. Each bus does two things with one:

* keeps it until it expires (``revoke_ttl``), so a worker that starts later loads it;
* pushes it to every worker listening now.

A worker listens *before* it loads the kept ones, so a revocation made while it starts is
either pushed to it or found by the load (or both: applying one twice changes nothing).

Buses, chosen from the app's transports (the first that applies):

* **Redis** (the result backend's Redis, else the broker's), under prefix ``p``::

      p:revoked     sorted set   member ``<t|r>:<task id>`` (t: terminate), score: expiry time
      p:control     channel      every command, as JSON, for the live workers

  With ``signing_key`` set, each member and each command carries its MAC (see
  :mod:`aioqueue.signing`); a listener ignores, with a warning, any that does not check out.

  A revoke is one MULTI/EXEC (ZADD, trim of the expired, PUBLISH). A worker subscribes, waits for
  the confirmation, then reads the set; after a reconnect it reads the set again.
* **memory**: one per MemoryBroker (the process is the whole deployment).

* **RabbitMQ** (AMQP broker with ``rpc://`` results): a stream, see :mod:`._control_amqp`.

Requests (``app.control.inspect()``, ``ping``, ``shutdown``) travel the same way, as a
``{"verb": "request", ...}`` command carrying its expiry and where to reply: a Redis list
``p:control:reply:<id>`` (the client BLPOPs it), an exclusive reply queue on RabbitMQ, an
asyncio queue in memory. The client waits until every worker listening when it asked has
replied (Redis counts the channel's subscribers) or until its
timeout, whichever comes first: a bounded wait, short when everyone answers. (On RabbitMQ alone
requests go to a fanout exchange, and the listeners are counted as the consumers of a queue
each of them consumes and nothing is sent to, see :mod:`._control_amqp`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import orjson

from .errors import AioQueueError, BadSignature, ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .app import App
    from .signing import Signer

__all__ = [
    "ControlBus",
    "Listening",
    "OnLimit",
    "OnRequest",
    "OnRevoke",
    "Replies",
    "control_bus_for",
    "gather",
    "load_command",
]

log = logging.getLogger("aioqueue.control")

OnRevoke = Callable[[list[str], bool, float], None]
"""Called with (task ids, terminate, expires at) for each revocation a worker learns of."""
OnLimit = Callable[[str, str, Any], None]
"""Called with (task name, "rate" or "cap", value or None) for each limit a worker learns of;
("reset", None): back to the limits the task declares."""


def _no_limits(task: str, kind: str, value: Any) -> None:
    return None


OnRequest = Callable[[dict[str, Any]], None]
"""Called with each request command (``verb`` "request") a worker receives; it replies (or
not) through :meth:`ControlBus.reply` with the command's ``reply_to``."""


class Listening(Protocol):
    async def aclose(self) -> None: ...


class ControlBus(Protocol):
    async def revoke(self, task_ids: list[str], terminate: bool, ttl: float) -> None:
        """Keep the revocation for ``ttl`` seconds and push it to every listening worker."""

    async def set_limit(self, task: str, kind: str, value: Any) -> None:
        """Keep a task's limit (``kind`` "rate" or "cap"; None: none) and push it; ``kind``
        "reset" forgets both kept ones (back to the task's own)."""

    async def listen(
        self,
        on_revoke: OnRevoke,
        on_limit: OnLimit = _no_limits,
        on_request: OnRequest | None = None,
    ) -> Listening:
        """Start receiving; returns once listening and every kept command was delivered."""

    async def request(self, command: dict[str, Any], timeout: float, limit: int | None) -> Replies:
        """Push ``command`` to the listening workers; their replies, gathered for at most
        ``timeout`` seconds, fewer once each listener (or ``limit`` of them) replied."""

    async def reply(self, to: str, payload: dict[str, Any]) -> None:
        """Send a worker's reply to a request's ``reply_to``."""

    async def aclose(self) -> None: ...


class Replies(list[dict[str, Any]]):
    """Workers' replies to one request, and how many were expected (None: not known)."""

    def __init__(self, expected: int | None) -> None:
        super().__init__()
        self.expected = expected

    @property
    def everyone(self) -> bool:
        """Every worker that was listening when the request went out replied."""
        return self.expected is not None and len(self) >= self.expected


async def gather(take: Callable[[float], Any], timeout: float, expected: int | None) -> Replies:
    """Replies from ``await take(seconds left)`` (None: nothing came in that time) until
    ``expected`` of them arrived or ``timeout`` passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    replies = Replies(expected)
    while expected is None or len(replies) < expected:
        left = deadline - loop.time()
        if left <= 0:
            break
        raw = await take(left)
        if raw is None:
            continue
        try:
            reply = orjson.loads(raw) if isinstance(raw, bytes | str) else raw
        except ValueError:
            log.warning("ignored a malformed control reply")
            continue
        if isinstance(reply, dict):
            replies.append(reply)
    return replies


def _expected(listeners: int, limit: int | None) -> int:
    return listeners if limit is None else min(listeners, limit)


# -- memory ----------------------------------------------------------------------------------


class MemoryBus:
    """Revocations in a dict, pushed by calling the listeners directly."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, bool], float] = {}
        self._limits: dict[tuple[str, str], Any] = {}
        self._listeners: set[_MemoryListening] = set()
        self._replies: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    async def revoke(self, task_ids: list[str], terminate: bool, ttl: float) -> None:
        now = time.time()
        expires = now + ttl
        self._kept = {key: at for key, at in self._kept.items() if at > now}
        for task_id in task_ids:
            self._kept[(task_id, terminate)] = expires
        for listening in list(self._listeners):
            listening.on_revoke(task_ids, terminate, expires)

    async def set_limit(self, task: str, kind: str, value: Any) -> None:
        if kind == "reset":
            self._limits.pop((task, "rate"), None)
            self._limits.pop((task, "cap"), None)
        else:
            self._limits[(task, kind)] = value
        for listening in list(self._listeners):
            listening.on_limit(task, kind, value)

    async def listen(
        self,
        on_revoke: OnRevoke,
        on_limit: OnLimit = _no_limits,
        on_request: OnRequest | None = None,
    ) -> Listening:
        listening = _MemoryListening(self, on_revoke, on_limit, on_request)
        self._listeners.add(listening)
        now = time.time()
        for (task_id, terminate), expires in list(self._kept.items()):
            if expires > now:
                on_revoke([task_id], terminate, expires)
        for (task, kind), value in list(self._limits.items()):
            on_limit(task, kind, value)
        return listening

    async def request(self, command: dict[str, Any], timeout: float, limit: int | None) -> Replies:
        key = str(command["id"])
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._replies[key] = inbox
        command = {**command, "reply_to": key}
        listeners = [item for item in self._listeners if item.on_request is not None]
        for listening in listeners:
            assert listening.on_request is not None
            listening.on_request(command)

        async def take(left: float) -> dict[str, Any] | None:
            try:
                async with asyncio.timeout(left):
                    return await inbox.get()
            except TimeoutError:
                return None

        try:
            return await gather(take, timeout, _expected(len(listeners), limit))
        finally:
            del self._replies[key]

    async def reply(self, to: str, payload: dict[str, Any]) -> None:
        inbox = self._replies.get(to)
        if inbox is not None:  # else the asker stopped waiting
            inbox.put_nowait(payload)

    async def aclose(self) -> None:
        return None  # the bus lives as long as its broker: the kept revocations are the state


class _MemoryListening:
    def __init__(
        self,
        bus: MemoryBus,
        on_revoke: OnRevoke,
        on_limit: OnLimit = _no_limits,
        on_request: OnRequest | None = None,
    ) -> None:
        self._bus = bus
        self.on_revoke = on_revoke
        self.on_limit = on_limit
        self.on_request = on_request

    async def aclose(self) -> None:
        self._bus._listeners.discard(self)


_memory_buses: weakref.WeakKeyDictionary[object, MemoryBus] = weakref.WeakKeyDictionary()


# -- Redis -----------------------------------------------------------------------------------

_RELOAD_BACKOFF = (0.05, 2.0)


class RedisBus:
    """Revocations in a sorted set, pushed on a channel; see the module docstring."""

    def __init__(
        self,
        client: Redis,
        key_prefix: str,
        errors: Callable[[], contextlib.AbstractContextManager[None]],
        signer: Signer | None = None,
    ) -> None:
        self._client = client
        self.signer = signer
        self._errors = errors
        self.key = f"{key_prefix}:revoked"
        self.limits_key = f"{key_prefix}:limits"
        self.channel = f"{key_prefix}:control"

    async def revoke(self, task_ids: list[str], terminate: bool, ttl: float) -> None:
        now = time.time()
        expires = now + ttl
        flag = b"t:" if terminate else b"r:"
        payload = orjson.dumps(
            {"verb": "revoke", "ids": task_ids, "terminate": terminate, "expires": expires}
        )
        members = [flag + task_id.encode() for task_id in task_ids]
        if self.signer is not None:
            payload = self.signer.sign(payload)
            members = [self.signer.sign(member) for member in members]
        px = max(1, int(ttl * 1000))
        with self._errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zadd(self.key, dict.fromkeys(members, expires))
                pipe.zremrangebyscore(self.key, "-inf", now)
                pipe.pexpire(self.key, px, nx=True)  # the set goes once its newest entry has
                pipe.pexpire(self.key, px, gt=True)
                pipe.publish(self.channel, payload)
                await pipe.execute()

    async def set_limit(self, task: str, kind: str, value: Any) -> None:
        """One MULTI/EXEC: HSET into ``p:limits`` (kept, no expiry), PUBLISH."""
        payload = orjson.dumps({"verb": "limit", "task": task, "kind": kind, "value": value})
        kept = orjson.dumps(value)
        if self.signer is not None:  # kept and pushed limits are checked as revocations are
            payload, kept = self.signer.sign(payload), self.signer.sign(kept)
        with self._errors():
            async with self._client.pipeline(transaction=True) as pipe:
                if kind == "reset":
                    pipe.hdel(self.limits_key, f"rate:{task}", f"cap:{task}")
                else:
                    pipe.hset(self.limits_key, f"{kind}:{task}", kept)
                pipe.publish(self.channel, payload)
                await pipe.execute()

    async def load_limits(self, on_limit: OnLimit) -> None:
        with self._errors():
            kept = cast("dict[Any, Any]", await self._client.hgetall(self.limits_key))
        for field, value in kept.items():
            text = field.decode() if isinstance(field, bytes) else str(field)
            kind, _, task = text.partition(":")
            if self.signer is not None:
                try:
                    value = self.signer.verify(value)
                except BadSignature as exc:
                    log.warning("ignored a kept limit %s in %s: %s", text, self.limits_key, exc)
                    continue
            on_limit(task, kind, orjson.loads(value))

    async def listen(
        self,
        on_revoke: OnRevoke,
        on_limit: OnLimit = _no_limits,
        on_request: OnRequest | None = None,
    ) -> Listening:
        listening = _RedisListening(self, on_revoke, on_limit, on_request)
        await listening.start()
        return listening

    async def request(self, command: dict[str, Any], timeout: float, limit: int | None) -> Replies:
        key = f"{self.channel}:reply:{command['id']}"
        command = {**command, "reply_to": key}
        with self._errors():
            body = orjson.dumps(command)
            if self.signer is not None:  # listeners verify every command when signing is on
                body = self.signer.sign(body)
            listeners = int(await self._client.publish(self.channel, body))

        async def take(left: float) -> bytes | None:
            # in slices of at most a second: far below the client's socket timeout
            with self._errors():
                got = await self._client.blpop([key], timeout=min(max(left, 0.01), 1.0))
            return None if got is None else cast("bytes", got[1])

        try:
            return await gather(take, timeout, _expected(listeners, limit))
        finally:
            with contextlib.suppress(Exception):
                await self._client.delete(key)

    async def reply(self, to: str, payload: dict[str, Any]) -> None:
        with self._errors():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.rpush(to, orjson.dumps(payload))
                pipe.expire(to, 60)  # the asker deletes it; this is for one that gave up
                await pipe.execute()

    async def load(self, on_revoke: OnRevoke) -> None:
        with self._errors():
            members = cast(
                "list[tuple[Any, float]]",
                await self._client.zrangebyscore(self.key, time.time(), "+inf", withscores=True),
            )
        for member, expires in members:
            raw = member if isinstance(member, bytes) else str(member).encode()
            if self.signer is not None:
                try:
                    raw = self.signer.verify(raw)
                except BadSignature as exc:
                    log.warning("ignored a kept revocation in %s: %s", self.key, exc)
                    continue
            text = raw.decode(errors="replace")
            on_revoke([text[2:]], text.startswith("t:"), float(expires))

    def pubsub(self) -> Any:
        return self._client.pubsub()

    async def aclose(self) -> None:
        return None  # the client belongs to the backend (or broker) it came from


class _RedisListening:
    """A subscription to the control channel of its own, re-established after a loss."""

    def __init__(
        self,
        bus: RedisBus,
        on_revoke: OnRevoke,
        on_limit: OnLimit = _no_limits,
        on_request: OnRequest | None = None,
    ) -> None:
        self._bus = bus
        self._on_revoke = on_revoke
        self._on_limit = on_limit
        self._on_request = on_request
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._task = loop.create_task(self._run())
        try:
            await asyncio.shield(self._ready)
        except BaseException:
            await self.aclose()
            raise

    async def _run(self) -> None:
        backoff = _RELOAD_BACKOFF[0]
        while True:
            pubsub = self._bus.pubsub()
            try:
                await self._subscribe_and_load(pubsub)
                backoff = _RELOAD_BACKOFF[0]
                await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._ready is not None and not self._ready.done():
                    self._ready.set_exception(_as_error(exc, self._bus.channel))
                    return
                (log.warning if backoff == _RELOAD_BACKOFF[0] else log.debug)(
                    "control channel %s lost (%s); listening again", self._bus.channel, exc
                )
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RELOAD_BACKOFF[1])

    async def _subscribe_and_load(self, pubsub: Any) -> None:
        """Subscribed (confirmed by the server) first, then the kept revocations read."""
        await pubsub.subscribe(self._bus.channel)
        async with asyncio.timeout(10.0):
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "subscribe":
                    break
                if message is not None:
                    self._dispatch(message)
        await self._bus.load(self._on_revoke)
        await self._bus.load_limits(self._on_limit)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def _receive(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=30.0)
            if message is None:
                continue
            if message["type"] == "subscribe":
                # redis-py subscribed again after a reconnect: pushes may have been missed
                await self._bus.load(self._on_revoke)
                await self._bus.load_limits(self._on_limit)
            else:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        try:
            command = load_command(message["data"], self._bus.signer)
            verb = command.get("verb")
            if verb == "revoke":
                ids = [str(task_id) for task_id in command["ids"]]
                self._on_revoke(ids, bool(command["terminate"]), float(command["expires"]))
            elif verb == "limit":
                self._on_limit(str(command["task"]), str(command["kind"]), command["value"])
            elif verb == "request" and self._on_request is not None:
                self._on_request(command)
        except (ValueError, KeyError, TypeError, AttributeError, BadSignature) as exc:
            log.warning("ignored a malformed control command on %s: %s", self._bus.channel, exc)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)


def load_command(raw: bytes, signer: Signer | None) -> Any:
    """A control command's JSON, its MAC checked first when signing is on (BadSignature)."""
    if signer is None:
        return orjson.loads(raw)
    return orjson.loads(signer.verify(raw))


def _as_error(exc: Exception, channel: str) -> AioQueueError:
    if isinstance(exc, AioQueueError):
        return exc
    from .errors import ResultBackendError

    error = ResultBackendError(f"cannot listen on control channel {channel}: {exc}")
    error.__cause__ = exc
    return error


# -- choosing one ----------------------------------------------------------------------------


def control_bus_for(app: App) -> ControlBus:
    """The app's bus: its result backend's Redis, its broker's Redis, memory, or a RabbitMQ
    stream (an AMQP broker with ``rpc://`` results)."""
    from .backends.memory import MemoryBackend
    from .brokers.memory import MemoryBroker

    backend, broker = app.backend, app.broker
    if type(backend).__name__ == "RedisBackend":
        from .backends.redis import RedisBackend

        assert isinstance(backend, RedisBackend)
        return RedisBus(backend.client, backend.key_prefix, backend.errors, app.codec.signer)
    if type(broker).__name__ == "RedisBroker":
        from .brokers.redis import RedisBroker

        assert isinstance(broker, RedisBroker)
        return RedisBus(broker.client, broker.key_prefix, broker.errors, app.codec.signer)
    if isinstance(broker, MemoryBroker) or isinstance(backend, MemoryBackend):
        owner: object = broker if isinstance(broker, MemoryBroker) else backend
        bus = _memory_buses.get(owner)
        if bus is None:
            bus = _memory_buses[owner] = MemoryBus()
        return bus
    if type(broker).__name__ == "AmqpBroker":
        from ._control_amqp import AmqpStreamBus
        from .brokers.amqp import AmqpBroker

        assert isinstance(broker, AmqpBroker)
        return AmqpStreamBus(broker, app.conf.revoke_ttl, app.codec.signer)
    raise ConfigurationError(
        f"app {app.name!r}: revoke needs somewhere every worker can read revocations from; "
        f"broker {broker.url!r} with result backend {backend.url!r} has none"
    )
