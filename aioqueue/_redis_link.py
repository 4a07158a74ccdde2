"""The command batcher's own Redis connection: an asyncio stream and a ``hiredis.Reader``.

Why not a redis-py ``Connection``: the batcher writes a whole batch at once and reads every
reply of it under one deadline. redis-py's public API puts a timeout context around each reply
(``read_response``) and a ``wait_for`` around each write (``send_packed_command``); measured
with 200 coroutines sharing one batcher, that halves the throughput. Reading redis-py's parser
and stream directly is private API (it broke on redis-py 5.2). Everything here is public:

- The settings come from redis-py's own URL parsing (the pool's ``connection_kwargs``), so a
  URL means the same to the batcher as to the redis-py client beside it: host and port or
  unix socket path, db, username and password (in the userinfo or as ``?password=``), client
  name, and TLS for ``rediss://`` with redis-py's ``ssl_*`` options and defaults.
- Cancelling a read is harmless: the stream is ours, and a link whose state is unknown (an
  error, a cancellation or the deadline hit it mid-batch) is aborted by its owner, never reused.
- Error replies come back as values (:class:`redis.exceptions.ResponseError`);
  :func:`reply_error` gives them redis-py's finer classes (``NoScriptError`` and so on).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from hiredis import pack_command
from redis import exceptions as redis_errors
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

__all__ = ["LinkSettings", "RedisLink", "link_settings", "reply_error", "tls_context"]

_READ_SIZE = 65536
_MORE = object()  # hiredis's "not enough data yet"

# Error reply prefixes that redis-py maps to its own classes; the rest stay ResponseError.
_ERROR_CLASSES: dict[str, type[redis_errors.RedisError]] = {
    "NOSCRIPT": redis_errors.NoScriptError,
    "READONLY": redis_errors.ReadOnlyError,
    "LOADING": redis_errors.BusyLoadingError,
    "NOAUTH": redis_errors.AuthenticationError,
    "WRONGPASS": redis_errors.AuthenticationError,
    "NOPERM": redis_errors.NoPermissionError,
    "OOM": redis_errors.OutOfMemoryError,
    "EXECABORT": redis_errors.ExecAbortError,
}


def reply_error(reply: redis_errors.ResponseError) -> redis_errors.RedisError:
    """The redis-py exception class for an error reply, as its own clients would raise it."""
    text = str(reply)
    kind = _ERROR_CLASSES.get(text.partition(" ")[0])
    if kind is not None:
        return kind(text)
    if text.startswith("ERR max number of clients reached"):
        return redis_errors.ConnectionError(text)
    return reply


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Where and how to connect; ``describe`` names the server without any secret."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    client_name: str | None = None
    connect_timeout: float | None = None
    keepalive: bool = False
    tls: ssl.SSLContext | None = None

    def describe(self) -> str:
        where = f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"
        return f"{where}/{self.db}"


def tls_context(kind: type[Any], kwargs: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context of a redis-py connection class and its options, None without TLS.

    redis-py's own context for those options, so a link of ours verifies exactly as the
    redis-py client beside it does (CA, host name, client certificate).
    """
    if not issubclass(kind, SSLConnection):
        return None
    context: ssl.SSLContext = kind(**kwargs).ssl_context.get()
    return context


def link_settings(client: Any) -> LinkSettings:
    """The settings a redis-py client was made with (from its URL, see the module docstring)."""
    pool = client.connection_pool
    kwargs: dict[str, Any] = dict(pool.connection_kwargs)
    kind = pool.connection_class
    tls = tls_context(kind, kwargs)
    return LinkSettings(
        host=str(kwargs.get("host") or "localhost"),
        port=int(kwargs.get("port") or 6379),
        path=str(kwargs.get("path") or "")
        if issubclass(kind, UnixDomainSocketConnection)
        else None,
        db=int(kwargs.get("db") or 0),
        username=kwargs.get("username") or None,
        password=kwargs.get("password") or None,
        client_name=kwargs.get("client_name") or None,
        connect_timeout=kwargs.get("socket_connect_timeout"),
        keepalive=bool(kwargs.get("socket_keepalive")),
        tls=tls,
    )


class _Replies(asyncio.Protocol):
    """The link's socket end: bytes go straight into hiredis, replies straight to the waiter.

    A protocol rather than an asyncio stream: a stream copies every read into its buffer, wakes
    the reader through a future of its own and wants a ``drain()`` await per write; here the
    transport hands each chunk to the parser and the round trip's one future is resolved once
    all its replies are in (one event-loop hop per round trip). Replies nobody waits for yet
    (a pub/sub notice, or the rest after a cancelled read) stay in the parser for the next one.
    """

    __slots__ = ("closed", "count", "error", "parser", "replies", "transport", "waiter")

    def __init__(self) -> None:
        self.parser = hiredis.Reader(
            notEnoughData=_MORE,
            replyError=redis_errors.ResponseError,
            protocolError=redis_errors.ConnectionError,
        )
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[list[Any]] | None = None
        self.replies: list[Any] = []
        self.count = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None  # why the link cannot be used any more

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance check
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        self.collect()

    def collect(self) -> None:
        """Move parsed replies to the waiting round trip; resolve it once it has them all."""
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            replies = self.replies
            gets = self.parser.gets
            reply = gets(False)
            while reply is not _MORE:
                replies.append(reply)
                if len(replies) == self.count:
                    self.waiter = None
                    waiter.set_result(replies)
                    return
                reply = gets(False)
        except redis_errors.ConnectionError as exc:  # a protocol error: the stream is lost
            self.fail(exc)
            if self.transport is not None:
                self.transport.abort()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.error)

    def eof_received(self) -> bool:
        self.fail(redis_errors.ConnectionError("Redis closed the connection"))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis_errors.ConnectionError(f"Redis closed the connection ({exc!r})"))
        if not self.closed.done():
            self.closed.set_result(None)


def _expire(waiter: asyncio.Future[list[Any]]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class RedisLink:
    """One connection, spoken to a batch at a time: write all commands, read all replies."""

    __slots__ = ("_protocol", "_transport")

    def __init__(self, transport: asyncio.Transport, protocol: _Replies) -> None:
        self._transport = transport
        self._protocol = protocol

    @classmethod
    async def open(cls, settings: LinkSettings) -> RedisLink:
        """Connect and introduce ourselves (AUTH, CLIENT SETNAME, SELECT) within the timeout."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(settings.connect_timeout):
                if settings.path is not None:
                    transport, protocol = await loop.create_unix_connection(_Replies, settings.path)
                else:
                    transport, protocol = await loop.create_connection(
                        _Replies, settings.host, settings.port, ssl=settings.tls
                    )
                link = cls(transport, protocol)
                try:
                    await link._hello(settings)
                except BaseException:
                    link.abort()
                    raise
        except TimeoutError as exc:
            raise redis_errors.TimeoutError(
                f"no connection to {settings.describe()} within {settings.connect_timeout}s"
            ) from exc
        return link

    async def _hello(self, settings: LinkSettings) -> None:
        sock = self._transport.get_extra_info("socket")
        if settings.keepalive and sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        commands: list[tuple[Any, ...]] = []
        if settings.password is not None:
            user = (settings.username,) if settings.username is not None else ()
            commands.append(("AUTH", *user, settings.password))
        if settings.client_name:
            commands.append(("CLIENT", "SETNAME", settings.client_name))
        if settings.db:
            commands.append(("SELECT", settings.db))
        if not commands:
            return
        payload = b"".join([pack_command(command) for command in commands])
        for reply in await self.roundtrip(payload, len(commands)):
            if isinstance(reply, redis_errors.ResponseError):
                raise reply_error(reply)

    @property
    def usable(self) -> bool:
        """False once the server closed its side or the transport went away (seen idle)."""
        return self._protocol.error is None and not self._transport.is_closing()

    async def roundtrip(
        self, payload: bytes | list[bytes], count: int, timeout: float | None = None
    ) -> list[Any]:
        """Write ``payload`` (``count`` packed commands, in one object or in pieces written in
        order) and read their ``count`` replies.

        ``timeout``: TimeoutError if the replies are not all in by then (one timer handle on
        the round trip's own future: cheaper than a timeout scope per call). Cancelling it is
        safe for the link only between whole replies: its owner aborts a link whose round
        trip was cut short, except a reader of pub/sub notices (``payload`` empty), whose
        unread notices stay in the parser.
        """
        protocol = self._protocol
        if protocol.error is not None:
            raise protocol.error
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[list[Any]] = loop.create_future()
        protocol.waiter = waiter
        protocol.replies = []
        protocol.count = count
        if payload:
            if isinstance(payload, bytes):
                self._transport.write(payload)
            else:
                self._transport.writelines(payload)  # no join: big pieces are not copied
        protocol.collect()  # replies already parsed (notices that came while nobody read)
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if protocol.waiter is waiter:
                protocol.waiter = None

    def abort(self) -> None:
        """Drop the connection at once (its state is unknown, so no goodbye)."""
        with contextlib.suppress(Exception):
            self._transport.abort()

    async def aclose(self, timeout: float = 1.0) -> None:
        """Close politely, waiting at most ``timeout``: a dead peer must not hold anyone up."""
        self._transport.close()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._protocol.closed)
        except (OSError, TimeoutError):
            self.abort()
