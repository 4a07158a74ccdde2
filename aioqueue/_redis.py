"""Redis plumbing shared by the Redis broker and the Redis result backend.

The one idea here is :class:`CommandBatcher`: every coroutine that wants a write hands it a
small "stage" function; whatever accumulates while the previous round trip is in flight goes out
as the next pipeline. Many concurrent sends, acks and result stores then cost one round trip per
batch instead of one each, without any coroutine waiting longer than one round trip extra.

The batcher speaks over a connection of its own (:mod:`._redis_link`); everything else goes
through redis-py clients made by :func:`connect_redis`, with socket timeouts and a blocking pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from hiredis import pack_command
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis

from ._redis_link import LinkSettings, RedisLink, link_settings, reply_error
from .config import mask_url
from .errors import AioQueueError, BrokerConnectionError, BrokerError, ConfigurationError

__all__ = [
    "CLUSTER_SCHEMES",
    "CommandBatcher",
    "Commands",
    "Payload",
    "Script",
    "Stage",
    "connect_redis",
    "eviction_warning",
    "is_cluster_url",
    "new_batcher",
    "pack",
    "redis_errors_as",
    "reply_or_raise",
    "subscriber_settings",
]

# redis-py's annotations assume str replies; we speak bytes, so clients are typed loosely.
RedisClient = Any
Stage = Callable[["Commands"], object]
Payload = bytes | list[bytes]
"""Packed commands: one bytes object, or pieces written in order (see :func:`pack`)."""
_MAX_BATCH = 512
# An argument this long goes to the socket as the object it is, beside the packed rest, not
# copied into one payload twice (by hiredis's packer, then by the join): a 100 KB message body
# acked by value was a quarter of a worker's CPU per task in those two copies.
BIG_ARGUMENT = 16384
REPLY_DEADLINE = 30.0  # seconds for a whole batch's replies before the link counts as dead
# Every redis-py read and write gives up after this, so a blocking command sent through a
# redis-py client must block for less. BLMOVE (1 s at a time) goes through a batcher, whose
# REPLY_DEADLINE bounds it the same way; the result listener reads pub/sub in timed slices.
SOCKET_TIMEOUT = 30.0
MAX_CONNECTIONS = 100  # per client; callers past it queue for a connection (POOL_TIMEOUT)
POOL_TIMEOUT = 30.0
# Redis Cluster URLs, plain and TLS: told apart here so the single-node path never imports the
# cluster module (:mod:`._redis_cluster`).
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def connect_redis(
    url: str,
    *,
    connect_timeout: float,
    client_name: str,
    socket_timeout: float | None = None,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
) -> RedisClient:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or a cluster URL (connects lazily).

    Unset limits take the module's values (:data:`SOCKET_TIMEOUT` and so on) at call time. The
    pool blocks: past ``max_connections`` a caller waits up to ``pool_timeout`` for a
    connection to come back instead of failing with "Too many connections".
    """
    if is_cluster_url(url):
        from ._redis_cluster import connect_cluster

        return connect_cluster(
            url,
            connect_timeout=connect_timeout,
            client_name=client_name,
            socket_timeout=SOCKET_TIMEOUT if socket_timeout is None else socket_timeout,
            max_connections=max_connections or MAX_CONNECTIONS,
        )
    # TCP only: redis-py's unix socket connection refuses the keepalive option.
    tcp = {} if url.lower().startswith("unix:") else {"socket_keepalive": True}
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            **tcp,
            max_connections=max_connections or MAX_CONNECTIONS,
            timeout=POOL_TIMEOUT if pool_timeout is None else pool_timeout,
            socket_connect_timeout=connect_timeout,
            socket_timeout=SOCKET_TIMEOUT if socket_timeout is None else socket_timeout,
            health_check_interval=30,
            client_name=client_name,
        )
    except ValueError as exc:  # redis-py's word for a URL it cannot parse
        raise ConfigurationError(f"invalid Redis URL {mask_url(url)!r}: {exc}") from exc
    return Redis.from_pool(pool)


@contextlib.contextmanager
def redis_errors_as(
    url: str,
    error: type[AioQueueError] = BrokerError,
    connection_error: type[AioQueueError] = BrokerConnectionError,
    what: str = "broker",
) -> Iterator[None]:
    """Translate redis-py errors into ours at the seam, naming the URL with its password masked."""
    try:
        yield
    except (
        redis_errors.ConnectionError,
        redis_errors.TimeoutError,
        redis_errors.RedisClusterException,  # a cluster without a master for a slot (failover)
        OSError,
    ) as exc:
        where = mask_url(url)
        _raise(connection_error, f"cannot reach {what} at {where}: {exc}{_tls_hint(url, exc)}", exc)
    except redis_errors.RedisError as exc:
        _raise(error, f"{what} at {mask_url(url)} failed: {exc}", exc)


# How a plain connection to a TLS-only port ends: the server drops it at its first bytes.
_DROPPED = ("reset by peer", "Connection closed by server", "Broken pipe")
_TLS_TWIN = {"redis": "rediss", "redis+cluster": "rediss+cluster"}


def _tls_hint(url: str, exc: BaseException) -> str:
    """For a plain URL whose server dropped the connection: the likely reason, and the fix.

    A TLS-only Redis answers a plain client with a reset, which alone reads like a crash.
    """
    twin = _TLS_TWIN.get(url.partition("://")[0].lower())
    if twin is None or not any(sign in str(exc) for sign in _DROPPED):
        return ""
    return f" (a server that speaks only TLS drops plain connections: if so, use {twin}://)"


def _raise(kind: type[AioQueueError], message: str, cause: BaseException) -> NoReturn:
    raise kind(message) from cause


class Commands:
    """The commands one batch will send, added through redis-py-like method names.

    Stages call ``pipe.lpush(...)`` etc. on this instead of on a redis-py Pipeline: we pack and
    send the batch ourselves on one dedicated connection, which costs a fraction of a Pipeline's
    per-call machinery (measured: about 2x the sequential throughput).
    """

    __slots__ = ("big", "stack")

    def __init__(self) -> None:
        self.stack: list[tuple[Any, ...]] = []
        self.big = False
        """An argument of :data:`BIG_ARGUMENT` bytes or more was added (see :func:`pack`).
        Set by the methods that carry message bodies and results, the only big values."""

    def _values(self, values: tuple[Any, ...]) -> None:
        for value in values:
            if type(value) is bytes and len(value) >= BIG_ARGUMENT:
                self.big = True
                return

    def lpush(self, key: str, *values: bytes) -> None:
        if not self.big:
            self._values(values)
        self.stack.append(("LPUSH", key, *values))

    def lrange(self, key: str, start: int, stop: int) -> None:
        self.stack.append(("LRANGE", key, start, stop))

    def lrem(self, key: str, count: int, value: bytes) -> None:
        if len(value) >= BIG_ARGUMENT:
            self.big = True
        self.stack.append(("LREM", key, count, value))

    def set(self, key: str, value: bytes, *, px: int, nx: bool = False) -> None:
        if len(value) >= BIG_ARGUMENT:
            self.big = True
        if nx:
            self.stack.append(("SET", key, value, "PX", px, "NX"))
        else:
            self.stack.append(("SET", key, value, "PX", px))

    def pexpire(self, key: str, milliseconds: int) -> None:
        self.stack.append(("PEXPIRE", key, milliseconds))

    def zadd(self, key: str, *scores_and_members: float | bytes) -> None:
        """ZADD score member [score member ...]. Two byte-identical messages are one member: the
        same task id, attempt and eta sent twice waits once, as a task id is meant to be unique."""
        if not self.big:
            self._values(scores_and_members)
        self.stack.append(("ZADD", key, *scores_and_members))

    def multi(self) -> None:
        self.stack.append(("MULTI",))

    def exec(self) -> None:
        self.stack.append(("EXEC",))

    def sadd(self, key: str, *members: str) -> None:
        self.stack.append(("SADD", key, *members))

    def smembers(self, key: str) -> None:
        self.stack.append(("SMEMBERS", key))

    def srem(self, key: str, *members: str) -> None:
        self.stack.append(("SREM", key, *members))

    def delete(self, *keys: str) -> None:
        self.stack.append(("DEL", *keys))

    def publish(self, channel: str, message: bytes) -> None:
        if len(message) >= BIG_ARGUMENT:
            self.big = True
        self.stack.append(("PUBLISH", channel, message))

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> None:
        if not self.big:
            self._values(keys_and_args[numkeys:])
        self.stack.append(("EVAL", script, numkeys, *keys_and_args))

    def blmove(self, source: str, destination: str, timeout: float) -> None:
        """Oldest of ``source`` to the head of ``destination``, waiting up to ``timeout``."""
        self.stack.append(("BLMOVE", source, destination, "RIGHT", "LEFT", timeout))

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        if not self.big:
            self._values(keys_and_args[numkeys:])
        self.stack.append(("EVALSHA", sha, numkeys, *keys_and_args))

    def get(self, key: str) -> None:
        self.stack.append(("GET", key))

    def mget(self, *keys: str) -> None:
        self.stack.append(("MGET", *keys))

    def ping(self) -> None:
        self.stack.append(("PING",))

    def xadd(self, key: str, field: str, value: bytes, *, maxlen: int) -> None:
        """XADD with an approximate MAXLEN trim (the cheap one: whole macro nodes)."""
        if len(value) >= BIG_ARGUMENT:
            self.big = True
        self.stack.append(("XADD", key, "MAXLEN", "~", maxlen, "*", field, value))


def pack(commands: Commands) -> Payload:
    """The commands as RESP: one bytes object, or, with a big argument among them, a list of
    pieces in which each big argument is its own piece, the very object the caller passed.

    The pieces hold exactly the bytes hiredis would have packed: each other argument is packed
    by hiredis alone (``*1\\r\\n`` and then the argument, whose prefix is dropped).
    """
    if not commands.big:
        return b"".join([pack_command(command) for command in commands.stack])
    pieces: list[bytes] = []
    small: list[bytes] = []
    for command in commands.stack:
        if not any(type(arg) is bytes and len(arg) >= BIG_ARGUMENT for arg in command):
            small.append(pack_command(command))
            continue
        small.append(b"*%d\r\n" % len(command))
        for arg in command:
            if type(arg) is bytes and len(arg) >= BIG_ARGUMENT:
                small.append(b"$%d\r\n" % len(arg))
                pieces += (b"".join(small), arg)
                small = [b"\r\n"]
            else:
                small.append(pack_command((arg,))[4:])
    pieces.append(b"".join(small))
    return pieces


class Script:
    """A Lua script run through a batcher: EVALSHA, and EVAL once if the server lost it."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def run(self, batcher: CommandBatcher, keys: list[str], args: list[Any]) -> Any:
        def by_sha(pipe: Commands) -> None:
            pipe.evalsha(self.sha, len(keys), *keys, *args)

        def by_text(pipe: Commands) -> None:
            pipe.eval(self.text, len(keys), *keys, *args)

        try:
            return await batcher.run(by_sha)
        except AioQueueError as exc:
            # A restarted or flushed server forgot the script (hiredis names it NoScriptError).
            if not isinstance(exc.__cause__, redis_errors.NoScriptError):
                raise
            return await batcher.run(by_text)


class CommandBatcher:
    """Coalesces concurrent writes into one round trip at a time on one connection.

    Order is kept: stages go out in the order they were submitted, and a batch is only sent
    after the previous one was answered, so a STARTED write can never overtake a SUCCESS. When
    nothing else is in flight the caller sends its own batch inline, with no task hop.
    """

    def __init__(
        self,
        client: RedisClient,
        translate: Callable[[], contextlib.AbstractContextManager[None]],
        *,
        reply_deadline: float = REPLY_DEADLINE,
    ) -> None:
        self._client = client
        self._translate = translate
        self._deadline = reply_deadline
        self._pending: list[tuple[Stage, asyncio.Future[Any]]] = []
        self._busy = False
        self._settings: LinkSettings | None = None
        self._link: RedisLink | None = None
        self._submitting: asyncio.Task[None] | None = None  # the round trip submit() started

    @property
    def busy(self) -> bool:
        """A round trip is in flight: what is submitted now waits for the next one."""
        return self._busy

    async def run(self, stage: Stage) -> Any:
        """Send ``stage``'s commands; returns the reply to its last command."""
        if self._busy:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending.append((stage, future))
            return await future
        payload, count = self._pack(stage)  # a command that cannot be sent fails alone
        self._busy = True
        try:
            replies = await self._roundtrip(payload, count)
        finally:
            self._after_batch()
        return self._result_of(replies)

    def submit(self, stage: Stage) -> asyncio.Future[Any]:
        """Queue ``stage`` for the next round trip without waiting for it.

        Whatever else is submitted or run before that round trip leaves goes in it, after this
        stage: an event staged just before a message's publish shares the publish's round trip
        and reaches Redis ahead of it. The future gets the reply to the stage's last command.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((stage, future))
        if not self._busy:
            self._busy = True
            self._submitting = loop.create_task(self._flush())
        return future

    def _pack(self, stage: Stage) -> tuple[Payload, int]:
        """The stage's commands as one RESP payload, and how many replies they will get.

        Packed per stage, so a value that cannot be sent (a bug, or a field a message should
        never have carried) fails its own caller instead of every write in the batch.
        """
        commands = Commands()
        stage(commands)
        try:
            payload = pack(commands)
        except (TypeError, ValueError) as exc:
            with self._translate():
                raise redis_errors.DataError(f"cannot send a command: {exc}") from exc
        return payload, len(commands.stack)

    def _after_batch(self) -> None:
        if self._pending:
            asyncio.get_running_loop().create_task(self._flush())
        else:
            self._busy = False

    async def _flush(self) -> None:
        batch = self._pending[:_MAX_BATCH]
        del self._pending[:_MAX_BATCH]
        try:
            waiting, payload, ends = self._pack_batch(batch)
            try:
                replies = await self._roundtrip(payload, ends[-1] if ends else 0)
            except BaseException as exc:
                for future in waiting:
                    if not future.done():
                        if isinstance(exc, Exception):
                            future.set_exception(exc)
                        else:
                            future.cancel()
                if not isinstance(exc, Exception):
                    raise
                return
            start = 0
            for future, end in zip(waiting, ends, strict=True):
                if not future.done():  # a cancelled submitter: its write still happened
                    try:
                        future.set_result(self._result_of(replies[start:end]))
                    except Exception as exc:
                        future.set_exception(exc)
                start = end
        finally:
            self._after_batch()

    def _pack_batch(
        self, batch: list[tuple[Stage, asyncio.Future[Any]]]
    ) -> tuple[list[asyncio.Future[Any]], Payload, list[int]]:
        """(the futures of the stages that packed, their payload, where each one's replies end).

        The whole batch is packed in one go; only if that fails is it packed stage by stage, so
        that the stage that cannot be packed gets its error and the others still go out.
        """
        commands = Commands()
        ends = []
        try:
            for stage, _ in batch:
                stage(commands)
                ends.append(len(commands.stack))
            payload = pack(commands)
        except Exception:
            return self._pack_each(batch)
        return [future for _, future in batch], payload, ends

    def _pack_each(
        self, batch: list[tuple[Stage, asyncio.Future[Any]]]
    ) -> tuple[list[asyncio.Future[Any]], Payload, list[int]]:
        waiting: list[asyncio.Future[Any]] = []
        parts: list[bytes] = []
        ends: list[int] = []
        total = 0
        for stage, future in batch:
            try:
                payload, count = self._pack(stage)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            waiting.append(future)
            if isinstance(payload, bytes):
                parts.append(payload)
            else:
                parts += payload
            total += count
            ends.append(total)
        return waiting, parts, ends

    def _result_of(self, replies: list[Any]) -> Any:
        return reply_or_raise(replies, self._translate)

    async def _roundtrip(self, payload: Payload, count: int) -> list[Any]:
        """Write every command, then read every reply; error replies come back as values.

        One write and one deadline for the whole batch, on a connection of the batcher's own
        (see :mod:`._redis_link` for why not redis-py's): per-command wrappers (a timeout
        context per reply, a task per write) were the largest costs of both the worker's settle
        step and a lone ``send()``. A link whose state is unknown after an error, a cancellation
        or the deadline is aborted, never reused: the next batch connects afresh.
        """
        if not count:
            return []
        # Translated only when something fails: a context manager per call (a generator
        # object, its frames) was a measurable part of a lone send() (see _redis_link).
        try:
            link = self._link
            if link is None or not link.usable:
                link = await self._ready_link()
            try:
                return await link.roundtrip(payload, count, self._deadline)
            except TimeoutError as exc:
                self._drop(link)
                raise redis_errors.TimeoutError(
                    f"no reply from Redis within {self._deadline}s"
                ) from exc
            except BaseException:
                self._drop(link)
                raise
        except (redis_errors.RedisError, OSError):
            with self._translate():
                raise

    async def _ready_link(self) -> RedisLink:
        link = self._link
        if link is not None and link.usable:
            return link
        # Never used, or the server closed it while idle: nothing of ours was lost with it.
        if link is not None:
            self._drop(link)
        if self._settings is None:
            self._settings = link_settings(self._client)
        self._link = await RedisLink.open(self._settings)
        return self._link

    def _drop(self, link: RedisLink) -> None:
        if self._link is link:
            self._link = None
        link.abort()

    async def aclose(self) -> None:
        """Close the connection; a batch in flight on it fails with a connection error."""
        link, self._link = self._link, None
        if link is not None:
            await link.aclose()


def reply_or_raise(
    replies: list[Any], translate: Callable[[], contextlib.AbstractContextManager[None]]
) -> Any:
    """The last reply of a stage, or its first error reply raised (translated)."""
    failed = next((r for r in replies if isinstance(r, Exception)), None)
    if failed is not None:
        with translate():
            if isinstance(failed, redis_errors.ResponseError):
                raise reply_error(failed)
            raise failed
    return replies[-1] if replies else None


def new_batcher(
    client: RedisClient,
    translate: Callable[[], contextlib.AbstractContextManager[None]],
    url: str,
) -> Any:
    """The batcher for a client made from ``url``: the raw single-node one, or the cluster's
    (chosen once, here)."""
    if isinstance(client, Redis):
        return CommandBatcher(client, translate)
    from ._redis_cluster import ClusterBatcher, parse_cluster_url

    parsed = parse_cluster_url(url)
    return ClusterBatcher(
        client,
        translate,
        wait_replicas=parsed.wait_replicas,
        wait_timeout_ms=parsed.wait_timeout_ms,
        tls=parsed.tls,
    )


async def subscriber_settings(client: RedisClient) -> LinkSettings:
    """Where a connection of our own for SUBSCRIBE goes: the client's server, or for a cluster
    one live primary (classic pub/sub reaches every node of a cluster)."""
    if isinstance(client, Redis):
        return link_settings(client)
    from ._redis_cluster import node_settings

    return await node_settings(client)


# -- start-up checks --------------------------------------------------------------------------


async def eviction_warning(target: CommandBatcher | RedisClient) -> str | None:
    """A one-line warning when Redis may evict keys that have no TTL, else None.

    Queues and processing lists have no TTL: under ``allkeys-*`` policies a full Redis deletes
    waiting and running tasks without a trace. ``noeviction`` (writes fail loudly instead) and
    the ``volatile-*`` policies (only keys with a TTL go) are safe. Managed Redis services often
    disable or rename CONFIG, or an ACL denies it: nothing can be said then, and None comes
    back. Connection errors are raised, as :class:`~aioqueue.errors.BrokerConnectionError`.
    """
    try:
        if isinstance(target, CommandBatcher):
            reply = await target.run(_stage_config_get)
        else:
            with redis_errors_as(_describe(target)):
                reply = await target.execute_command("CONFIG", "GET", _POLICY)
    except AioQueueError as exc:
        if isinstance(exc.__cause__, redis_errors.ResponseError):
            return None  # CONFIG disabled, renamed or not permitted
        raise
    policy = _policy_in(reply)
    if policy is None or policy == "noeviction" or policy.startswith("volatile-"):
        return None
    return (
        f"Redis maxmemory-policy is {policy!r}: when memory runs out Redis may evict keys "
        "without a TTL, which include queues and tasks in progress; set maxmemory-policy to "
        "'noeviction' (or a 'volatile-*' policy) on this server"
    )


_POLICY = "maxmemory-policy"


def _stage_config_get(pipe: Commands) -> None:
    pipe.stack.append(("CONFIG", "GET", _POLICY))


def _policy_in(reply: Any) -> str | None:
    """The policy from CONFIG GET's reply: a flat [name, value] list, or a dict (RESP3)."""
    if isinstance(reply, dict):
        pairs = list(reply.items())
    elif isinstance(reply, list | tuple):
        pairs = list(zip(reply[::2], reply[1::2], strict=False))
    else:
        return None
    for name, value in pairs:
        if _text(name) == _POLICY:
            return _text(value).lower()
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(client: RedisClient) -> str:
    """A URL naming the client's server (no credentials), for error messages."""
    settings = client.connection_pool.connection_kwargs
    if settings.get("path"):
        return f"unix://{settings['path']}"
    host, port, db = (
        settings.get("host", "localhost"),
        settings.get("port", 6379),
        settings.get("db", 0),
    )
    return f"redis://{host}:{port}/{db}"
