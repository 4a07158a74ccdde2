"""AMQP plumbing shared by the amqp:// broker and the rpc:// result backend.

Connections are aio-pika robust connections (they reconnect and restore their channels and
consumers by themselves); operations go to the live aiormq channel underneath.

One hazard of aiormq shapes this module: a channel writes through its connection's *bounded*
frame queue (ten frames). When the connection dies, nothing reads that queue any more, so a
publish, ack or RPC that is waiting for room in it (or for the channel lock held by such a
publish) waits forever: closing the channel fails the futures aiormq knows about, not a
``Queue.put``. Every operation on a channel therefore runs under :func:`guarded`, which
cancels it the moment the channel closes and raises ``ChannelInvalidStateError`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import weakref
from collections.abc import Iterator
from types import TracebackType
from typing import NoReturn

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel
from yarl import URL

from .config import MASK, mask_url
from .errors import AioQueueError, BrokerConnectionError, BrokerError, ConfigurationError
from .tls import split_amqp_tls

__all__ = [
    "ChannelPool",
    "amqp_errors",
    "close_quietly",
    "connection_name",
    "guarded",
    "open_connection",
    "ready_channel",
    "split_hosts",
]

_CLOSED = "aioqueue: the AMQP channel closed under this operation"


def connection_name(client_name: str, role: str) -> str:
    """``aioqueue:<app>/<role>@<host>:<pid>``: what ``rabbitmqctl list_connections`` shows."""
    return f"{client_name}/{role}@{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def amqp_errors(
    url: str,
    error: type[AioQueueError] = BrokerError,
    connection_error: type[AioQueueError] = BrokerConnectionError,
    what: str = "broker",
) -> Iterator[None]:
    """Translate aio-pika / aiormq errors into ours at the seam, the URL's password masked.

    aiormq cancels the futures of a channel that dies; a CancelledError that nobody asked for
    (our task is not being cancelled) is therefore a lost connection, not a cancellation.
    The masked URL is built only for an error: this wraps every publish.
    """
    try:
        yield
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        _raise(connection_error, f"lost the connection to {what} at {mask_url(url)}", exc)
    except aiormq.exceptions.PublishError as exc:
        _raise(error, f"{what} at {mask_url(url)} returned the message as unroutable: {exc}", exc)
    except aiormq.exceptions.DeliveryError as exc:
        _raise(error, f"{what} at {mask_url(url)} refused the message (nack): {exc}", exc)
    except aiormq.exceptions.AMQPChannelError as exc:
        _raise(error, f"{what} at {mask_url(url)} failed: {exc}", exc)
    except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
        _raise(connection_error, f"lost the connection to {what} at {mask_url(url)}: {exc!r}", exc)
    except (OSError, TimeoutError) as exc:
        _raise(connection_error, f"cannot reach {what} at {mask_url(url)}: {exc!r}", exc)
    except RuntimeError as exc:
        # aio-pika's word for a channel opened on a connection that is going away
        if "closed" not in str(exc):
            raise
        _raise(connection_error, f"lost the connection to {what} at {mask_url(url)}: {exc!r}", exc)


def _raise(kind: type[AioQueueError], message: str, cause: BaseException) -> NoReturn:
    raise kind(message) from cause


def split_hosts(url: str) -> list[str]:
    """One URL per host of ``amqp://user:pw@host1:port1,host2:port2/vhost?query``.

    A RabbitMQ cluster is reached through any of its nodes; the URL lists them with commas (the
    form Celery/kombu and the Java client know), and every host shares the user, password,
    vhost and query. A URL with one host comes back as it is.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return [url]
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hostlist = netloc.rpartition("@")
    if "," not in hostlist:
        return [url]
    hosts = [host.strip() for host in hostlist.split(",")]
    if not all(hosts):
        raise ConfigurationError(f"an empty host in the AMQP URL {mask_url(url)}")
    return [f"{scheme}://{userinfo}{at}{host}{tail}" for host in hosts]


async def open_connection(
    url: str,
    *,
    name: str,
    timeout: float,
    heartbeat: float,
    reconnect_interval: float,
    error: type[AioQueueError] = BrokerConnectionError,
) -> AbstractRobustConnection:
    """A robust connection: it reconnects by itself and restores its channels and consumers.

    ``heartbeat`` and ``reconnect_interval`` apply unless the URL's query sets them; amqps://
    URLs get the verifying context of :mod:`aioqueue.tls` (their TLS query options, as
    :func:`~aioqueue.tls.with_tls` left them, are taken out of the URL into it).

    A URL with several hosts (:func:`split_hosts`) connects to the first that answers, trying
    them in order; once connected, every lost connection and every failed reconnect attempt
    moves the robust connection on to the next host (:class:`_Failover`), so a worker or a
    sender whose node died carries on with a surviving node of the cluster.
    """
    plain, context = split_amqp_tls(url)
    hosts = [_with_options(one, name, heartbeat, reconnect_interval) for one in split_hosts(plain)]
    failures: list[str] = []
    for index, parsed in enumerate(hosts):
        try:
            connection = await aio_pika.connect_robust(
                parsed,
                client_properties={"connection_name": name},
                timeout=timeout,
                ssl_context=context,
            )
        except Exception as exc:  # aio-pika raises a wide variety here; all mean "cannot connect"
            reason = _connect_failure(exc, parsed, timeout)
            if len(hosts) == 1:
                _raise(error, f"cannot connect to {mask_url(url)}: {reason}", exc)
            failures.append(f"{parsed.host}:{parsed.port}: {reason}")
            last = exc
            continue
        if len(hosts) > 1:
            connection.close_callbacks.add(_Failover(connection, hosts, index))
        return connection
    _raise(error, f"cannot connect to any host of {mask_url(url)}: {'; '.join(failures)}", last)


def _with_options(url: str, name: str, heartbeat: float, reconnect_interval: float) -> URL:
    parsed = URL(url)
    query: dict[str, str] = {}
    if "heartbeat" not in parsed.query:
        query["heartbeat"] = str(int(heartbeat))
    if "reconnect_interval" not in parsed.query:
        query["reconnect_interval"] = str(reconnect_interval)
    if "name" not in parsed.query:
        # aiormq's own query option: aio-pika 9.4 drops client_properties given
        # beside a URL, and the name is what ``rabbitmqctl list_connections`` shows.
        query["name"] = name
    return parsed.update_query(query)


class _Failover:
    """A close callback that points a robust connection at the next host of its cluster.

    aio-pika's robust connection reconnects to its ``url``; it calls its ``close_callbacks``
    when an established connection is lost and when a (re)connection attempt fails, before it
    waits ``reconnect_interval`` and tries again. Moving ``url`` on there makes every retry go
    to the next host, round robin, with public API only (``url`` is the attribute aio-pika
    itself reassigns to rotate credentials).
    """

    __slots__ = ("_connection", "_hosts", "_index")

    def __init__(self, connection: aio_pika.RobustConnection, hosts: list[URL], index: int):
        self._connection = weakref.ref(connection)
        self._hosts = hosts
        self._index = index

    def __call__(self, *_: object) -> None:
        connection = self._connection()
        if connection is None or connection.is_closed:
            return
        self._index = (self._index + 1) % len(self._hosts)
        connection.url = self._hosts[self._index]


def _connect_failure(exc: BaseException, url: URL, timeout: float) -> str:
    """Why a connection attempt failed, in plain words instead of aiormq's frame reprs.

    The server's reason, when there is one, travels in a ``Connection.Close`` frame that
    aiormq puts in the exception's arguments (6.x) or only into its message (7.x, as
    ``<Connection.Close object at 0x...>``), so both are looked at.
    """
    user = url.user or "guest"
    vhost = url.path[1:] or "/"
    close = next((a for a in exc.args if hasattr(a, "reply_code")), None)
    said = f" ({close.reply_code} {close.reply_text})" if close is not None else ""
    text = str(exc)
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError) or "ACCESS_REFUSED" in text:
        return f"access refused: RabbitMQ rejected the user name or password of user {user!r}"
    if isinstance(exc, aiormq.exceptions.ConnectionNotAllowed) or (
        "Connection.Close" in text and "OpenOk" in text
    ):
        return (
            f"RabbitMQ refused virtual host {vhost!r}{said}: it does not exist, or user "
            f"{user!r} has no permission on it"
        )
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout}s (is {url.host}:{url.port} an AMQP server?)"
    code = _errno(exc)
    if code == errno.ECONNREFUSED or isinstance(exc, ConnectionRefusedError):
        return f"connection refused: nothing listens on {url.host}:{url.port}"
    if isinstance(exc, socket.gaierror) or (code is not None and code < 0):
        return f"cannot resolve host name {url.host!r}"
    detail = text if close is None else f"{close.reply_code} {close.reply_text}"
    if url.password:
        detail = detail.replace(url.password, MASK)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _errno(exc: BaseException) -> int | None:
    """The OS error number, also when aiormq re-raised it as ``AMQPConnectionError(n, text)``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    first = exc.args[0] if exc.args else None
    return first if isinstance(first, int) else None


async def close_quietly(
    closable: AbstractRobustConnection | AbstractRobustChannel, timeout: float
) -> None:
    """Close, waiting at most ``timeout``: a dead peer must not hold up a shutdown."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await closable.close()


# -- guarding operations on a channel ------------------------------------------------------


class _Watcher:
    """Per aiormq channel: the tasks waiting on it, cancelled when it closes."""

    __slots__ = ("__weakref__", "cancelled", "closed", "waiting")

    def __init__(self, channel: AbstractChannel) -> None:
        self.closed = channel.is_closed
        self.waiting: set[asyncio.Task[object]] = set()
        self.cancelled: set[asyncio.Task[object]] = set()
        if not self.closed:
            channel.closing.add_done_callback(self._on_close)

    def _on_close(self, closing: asyncio.Future[object]) -> None:
        if not closing.cancelled():
            closing.exception()
        self.closed = True
        for task in self.waiting:
            if not task.done() and task not in self.cancelled:
                self.cancelled.add(task)
                task.cancel(_CLOSED)


_watchers: weakref.WeakKeyDictionary[AbstractChannel, _Watcher] = weakref.WeakKeyDictionary()


class guarded:
    """Run the block's channel operation; if the channel closes meanwhile, stop waiting.

    Raises ``ChannelInvalidStateError`` (a lost connection, for :func:`amqp_errors`) when the
    channel is closed already or closes before the operation is done. A cancellation of the
    task from elsewhere stays a cancellation.
    """

    __slots__ = ("_task", "_watcher")

    def __init__(self, channel: AbstractChannel) -> None:
        watcher = _watchers.get(channel)
        if watcher is None:
            watcher = _watchers[channel] = _Watcher(channel)
        self._watcher = watcher

    def __enter__(self) -> None:
        if self._watcher.closed:
            raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
        task = asyncio.current_task()
        assert task is not None, "guarded() runs inside a task"
        self._task = task
        self._watcher.waiting.add(task)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        watcher, task = self._watcher, self._task
        watcher.waiting.discard(task)
        if task in watcher.cancelled:
            watcher.cancelled.discard(task)
            if task.uncancel() == 0 and isinstance(exc, asyncio.CancelledError):
                raise aiormq.exceptions.ChannelInvalidStateError(_CLOSED) from exc


async def ready_channel(channel: AbstractRobustChannel, timeout: float) -> AbstractChannel:
    """The live underlying channel, waiting (up to ``timeout``) while the connection recovers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"channel not ready within {timeout}s")
        async with asyncio.timeout(remaining):
            await channel.ready()
        with contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError):
            underlay = await channel.get_underlay_channel()
            if not underlay.is_closed:
                return underlay
        # Between the socket dying and the robust connection noticing, the old channel is
        # still the current one: wait a moment for the recovery to take over.
        await asyncio.sleep(0.02)


class ChannelPool:
    """A fixed number of confirm-mode channels on one connection, used round robin.

    aiormq pipelines publishes on a channel and matches confirms by delivery tag, so concurrent
    publishers on one channel already overlap; a few channels spread the work over RabbitMQ's
    per-channel processes. Channels are opened on first use and reopened by the robust
    connection after a reconnect; a channel that does not come back (its restore failed, or
    it was closed for good) is replaced by a new one.
    """

    def __init__(self, connection: AbstractRobustConnection, size: int, confirms: bool) -> None:
        self._connection = connection
        self._size = max(1, size)
        self._confirms = confirms
        self._channels: list[AbstractRobustChannel] = []
        self._live: list[AbstractChannel | None] = []  # the last underlay seen per channel
        self._opening: asyncio.Lock = asyncio.Lock()
        self._next = itertools.count()

    async def get(self, timeout: float) -> AbstractChannel:
        """The next channel's live underlay, round robin.

        Fast path: the underlay handed out last time for this slot, while it is open (a robust
        channel replaces its underlay on reconnect and the old one is closed by then), so a
        publish costs no ``ready()`` wait, no timeout scope and no extra awaits.
        """
        if len(self._channels) == self._size:
            index = next(self._next) % self._size
            live = self._live[index]
            if live is not None and not live.is_closed:
                return live
            underlay = await self._get(timeout, index)
        else:
            underlay = await self._get(timeout, None)
        return underlay

    async def _get(self, timeout: float, index: int | None) -> AbstractChannel:
        if index is None and len(self._channels) < self._size:
            async with self._opening:
                if len(self._channels) < self._size:
                    channel = await self._open(timeout)
                    self._channels.append(channel)
                    self._live.append(None)
                    underlay = await ready_channel(channel, timeout)
                    self._live[-1] = underlay
                    return underlay
        if index is None:
            index = next(self._next) % len(self._channels)
        channel = self._channels[index]
        try:
            underlay = await ready_channel(channel, timeout)
        except TimeoutError:
            if self._connection.is_closed or not self._connection.connected.is_set():
                raise  # the connection is away: every channel waits for it alike
            # The connection is up but this channel did not come back with it.
            async with self._opening:
                if self._channels[index] is channel:
                    self._channels[index] = await self._open(timeout)
                    await close_quietly(channel, timeout)
                underlay = await ready_channel(self._channels[index], timeout)
        self._live[index] = underlay
        return underlay

    async def discard(self, underlay: AbstractChannel, timeout: float) -> None:
        """Replace the pooled channel that ``underlay`` is, with a new one.

        For a channel RabbitMQ nacked a publish on: a channel that published to a quorum
        queue while its leader was being elected (its node died) can go on nacking every
        publish to that queue after the election (seen on RabbitMQ 3.10), while a new
        channel publishes fine. Found by asking each pooled channel for its live channel:
        nacks are rare, so this costs nothing on the publish path.
        """
        async with self._opening:
            for index, channel in enumerate(self._channels):
                try:
                    async with asyncio.timeout(timeout):
                        current = await channel.get_underlay_channel()
                except Exception:  # closed or not ready: not the one that just answered
                    continue
                if current is underlay:
                    self._channels[index] = await self._open(timeout)
                    break
            else:
                return
        await close_quietly(channel, timeout)

    async def _open(self, timeout: float) -> AbstractRobustChannel:
        channel = self._connection.channel(publisher_confirms=self._confirms)
        try:
            await channel.initialize(timeout=timeout)
        except BaseException:
            # Not kept: the robust connection must not try to restore it later.
            await close_quietly(channel, timeout)
            raise
        return channel
