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
from typing import Any

import hiredis
from hiredis import pack_command
from redis import exceptions as redis_errors
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

__all__ = ["LinkSettings", "RedisLink", "link_settings", "reply_error"]

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


def link_settings(client: Any) -> LinkSettings:
    """The settings a redis-py client was made with (from its URL, see the module docstring)."""
    pool = client.connection_pool
    kwargs: dict[str, Any] = dict(pool.connection_kwargs)
    kind = pool.connection_class
    tls = None
    if issubclass(kind, SSLConnection):
        # redis-py's own context for these options, so rediss:// verifies the same way.
        tls = kind(**kwargs).ssl_context.get()
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


class RedisLink:
    """One connection, spoken to a batch at a time: write all commands, read all replies."""

    __slots__ = ("_parser", "_reader", "_writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader(
            notEnoughData=_MORE,
            replyError=redis_errors.ResponseError,
            protocolError=redis_errors.ConnectionError,
        )

    @classmethod
    async def open(cls, settings: LinkSettings) -> RedisLink:
        """Connect and introduce ourselves (AUTH, CLIENT SETNAME, SELECT) within the timeout."""
        try:
            async with asyncio.timeout(settings.connect_timeout):
                if settings.path is not None:
                    reader, writer = await asyncio.open_unix_connection(settings.path)
                else:
                    reader, writer = await asyncio.open_connection(
                        settings.host, settings.port, ssl=settings.tls
                    )
                link = cls(reader, writer)
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
        sock = self._writer.get_extra_info("socket")
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
        return not self._writer.is_closing() and not self._reader.at_eof()

    async def roundtrip(self, payload: bytes, count: int) -> list[Any]:
        """Write ``payload`` (``count`` packed commands) and read their ``count`` replies."""
        self._writer.write(payload)
        await self._writer.drain()
        replies: list[Any] = []
        gets = self._parser.gets
        while True:
            reply = gets(False)
            while reply is not _MORE:
                replies.append(reply)
                if len(replies) == count:
                    return replies
                reply = gets(False)
            data = await self._reader.read(_READ_SIZE)
            if not data:
                raise redis_errors.ConnectionError("Redis closed the connection")
            self._parser.feed(data)

    def abort(self) -> None:
        """Drop the connection at once (its state is unknown, so no goodbye)."""
        transport = self._writer.transport
        with contextlib.suppress(Exception):
            transport.abort()

    async def aclose(self, timeout: float = 1.0) -> None:
        """Close politely, waiting at most ``timeout``: a dead peer must not hold anyone up."""
        self._writer.close()
        try:
            async with asyncio.timeout(timeout):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            self.abort()
