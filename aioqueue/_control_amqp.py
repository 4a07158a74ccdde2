"""The control bus on RabbitMQ alone (AMQP broker, ``rpc://`` results): a stream.

::

    <prefix>.control    stream queue (durable, x-max-age = revoke_ttl): every command, JSON

A stream keeps its messages for every reader instead of handing each to one consumer, which is
both halves of what a revocation needs: a worker consumes it from its first message, so it
reads the kept revocations and then receives new ones as they are published, on one consumer.
To know when it has read everything kept, the worker publishes a marker of its own after it
starts consuming and is ready once the marker comes back (the stream is in publish order).

RabbitMQ drops a stream's old messages a segment at a time, so a revocation can outlive
``x-max-age``; each carries its expiry and a stale one is skipped. The queue's ``x-max-age`` is
fixed when it is first declared: changing ``revoke_ttl`` later means deleting the queue.

Requests (inspect, ping, shutdown) are not kept: they go to a fanout exchange,
``<prefix>.control.requests``, to which each listening worker binds an exclusive queue of its
own, carrying their expiry and the name of the asker's exclusive reply queue. RabbitMQ does not
count an exchange's queues, so each listening worker also consumes ``<prefix>.control.workers``,
a queue nothing is published to (x-expires: it goes a minute after the last worker): its
consumer count, read by a passive declare, is the number of workers listening, and the asker
stops waiting once that many replied (a roll call, not a message). A worker consumes it only
after its request queue is bound, so it is never counted before it can be asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from ._amqp import close_quietly
from ._control_bus import Listening, OnLimit, OnRequest, OnRevoke, Replies, gather, load_command
from .errors import BadSignature, BrokerConnectionError

if TYPE_CHECKING:
    from .brokers.amqp import AmqpBroker
    from .signing import Signer

__all__ = ["AmqpStreamBus"]

log = logging.getLogger("aioqueue.control")

_CATCH_UP_TIMEOUT = 30.0
_PREFETCH = 500
_ROLL_CALL_EXPIRES_MS = 60_000


async def _ignore(message: AbstractIncomingMessage) -> None:
    """The roll-call queue carries nothing: anything published to it is dropped."""


class AmqpStreamBus:
    """Revocations in a RabbitMQ stream; see the module docstring."""

    def __init__(self, broker: AmqpBroker, ttl: float, signer: Signer | None = None) -> None:
        self.broker = broker
        self.signer = signer
        self.queue = f"{broker.key_prefix}.control"
        self.requests = f"{broker.key_prefix}.control.requests"
        self.roll_call = f"{broker.key_prefix}.control.workers"
        self._arguments = {"x-queue-type": "stream", "x-max-age": f"{max(1, math.ceil(ttl))}s"}
        self._publisher: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()

    async def declare(self, channel: Any) -> Any:
        return await channel.declare_queue(self.queue, durable=True, arguments=self._arguments)

    async def declare_requests(self, channel: Any) -> Any:
        return await channel.declare_exchange(self.requests, aio_pika.ExchangeType.FANOUT)

    async def _channel(self) -> AbstractRobustChannel:
        async with self._lock:
            if self._publisher is None or self._publisher.is_closed:
                await self.broker.connect()
                connection = self.broker.connection
                assert connection is not None
                with self.broker.errors():
                    # reconnecting (perhaps to another host): a channel needs the connection
                    async with asyncio.timeout(self.broker.connect_timeout):
                        await connection.ready()
                    channel = connection.channel(publisher_confirms=True)
                    await channel.initialize(timeout=self.broker.connect_timeout)
                    await self.declare(channel)
                self._publisher = channel
            return self._publisher

    async def publish(self, command: dict[str, Any]) -> None:
        channel = await self._channel()
        body = orjson.dumps(command)
        if self.signer is not None:
            body = self.signer.sign(body)
        message = aio_pika.Message(body, delivery_mode=2)
        with self.broker.errors():
            await channel.default_exchange.publish(
                message, routing_key=self.queue, timeout=self.broker.publish_timeout
            )

    async def revoke(self, task_ids: list[str], terminate: bool, ttl: float) -> None:
        expires = time.time() + ttl
        await self.publish(
            {"verb": "revoke", "ids": task_ids, "terminate": terminate, "expires": expires}
        )

    async def set_limit(self, task: str, kind: str, value: Any) -> None:
        """Kept as long as the stream keeps messages (``revoke_ttl``); the last one wins."""
        await self.publish({"verb": "limit", "task": task, "kind": kind, "value": value})

    async def request(self, command: dict[str, Any], timeout: float, limit: int | None) -> Replies:
        await self.broker.connect()
        connection = self.broker.connection
        assert connection is not None
        inbox: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            inbox.put_nowait(message.body)

        async def take(left: float) -> bytes | None:
            try:
                async with asyncio.timeout(left):
                    return await inbox.get()
            except TimeoutError:
                return None

        with self.broker.errors():
            channel = connection.channel(publisher_confirms=False)
            await channel.initialize(timeout=self.broker.connect_timeout)
        try:
            with self.broker.errors():
                exchange = await self.declare_requests(channel)
                # named under the key prefix, as every resource is (least-privilege users)
                replies = await channel.declare_queue(
                    f"{self.requests}.reply.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
                )
                await replies.consume(on_reply, no_ack=True)
                body = orjson.dumps({**command, "reply_to": replies.name})
                if self.signer is not None:  # listeners verify every command when signing
                    body = self.signer.sign(body)
                # no worker bound (none running) is an answer, not an error: not mandatory
                await exchange.publish(aio_pika.Message(body), routing_key="", mandatory=False)
            # Counted after the request went out: a worker that starts meanwhile may be
            # counted without having been asked (the wait is then the whole timeout).
            (counted,) = (await self.broker.probe_many([self.roll_call])).values()
            listeners = counted[1] if counted is not None else 0
            return await gather(
                take, timeout, listeners if limit is None else min(listeners, limit)
            )
        finally:
            await close_quietly(channel, self.broker.connect_timeout)

    async def reply(self, to: str, payload: dict[str, Any]) -> None:
        channel = await self._channel()
        with self.broker.errors():
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(payload)),
                routing_key=to,
                timeout=self.broker.publish_timeout,
            )

    async def listen(
        self,
        on_revoke: OnRevoke,
        on_limit: OnLimit | None = None,
        on_request: OnRequest | None = None,
    ) -> Listening:
        listening = _StreamListening(self, on_revoke, on_limit, on_request)
        try:
            await listening.start()
        except BaseException:
            await listening.aclose()
            raise
        return listening

    async def aclose(self) -> None:
        channel, self._publisher = self._publisher, None
        if self.broker.delete_queues_on_close and self.broker.connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.broker.connect_timeout):
                    async with self.broker.connection.channel() as admin:
                        underlay = await admin.get_underlay_channel()
                        await underlay.queue_delete(self.queue)
                        await underlay.exchange_delete(self.requests)
        if channel is not None:
            await close_quietly(channel, self.broker.connect_timeout)


class _StreamListening:
    """A consumer of the stream from its first message, on a connection of its own."""

    def __init__(
        self,
        bus: AmqpStreamBus,
        on_revoke: OnRevoke,
        on_limit: OnLimit | None = None,
        on_request: OnRequest | None = None,
    ) -> None:
        self._bus = bus
        self._on_revoke = on_revoke
        self._on_limit = on_limit
        self._on_request = on_request
        self._marker = uuid.uuid4().hex
        self._caught_up: asyncio.Future[None] | None = None
        self._connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        broker = self._bus.broker
        self._caught_up = asyncio.get_running_loop().create_future()
        with broker.errors():
            self._connection = await broker.connect_role("control")
            channel = self._connection.channel(publisher_confirms=False)
            await channel.initialize(timeout=broker.connect_timeout)
            await channel.set_qos(prefetch_count=_PREFETCH)
            queue = await self._bus.declare(channel)
            await queue.consume(self._on_message, arguments={"x-stream-offset": "first"})
            if self._on_request is not None:
                requests = await self._bus.declare_requests(channel)
                inbox = await channel.declare_queue(
                    f"{self._bus.requests}.inbox.{uuid.uuid4().hex}",
                    exclusive=True,
                    auto_delete=True,
                )
                await inbox.bind(requests)
                await inbox.consume(self._on_request_message, no_ack=True)
                roll_call = await channel.declare_queue(
                    self._bus.roll_call, arguments={"x-expires": _ROLL_CALL_EXPIRES_MS}
                )
                await roll_call.consume(_ignore, no_ack=True)
        await self._bus.publish({"verb": "marker", "id": self._marker})
        try:
            async with asyncio.timeout(_CATCH_UP_TIMEOUT):
                await self._caught_up
        except TimeoutError as exc:
            raise BrokerConnectionError(
                f"could not read the revocations kept in {self._bus.queue} within "
                f"{_CATCH_UP_TIMEOUT}s"
            ) from exc

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            command = load_command(message.body, self._bus.signer)
            verb = command.get("verb")
            if verb == "revoke" and float(command["expires"]) > time.time():
                ids = [str(task_id) for task_id in command["ids"]]
                self._on_revoke(ids, bool(command["terminate"]), float(command["expires"]))
            elif verb == "limit" and self._on_limit is not None:
                self._on_limit(str(command["task"]), str(command["kind"]), command["value"])
            elif (
                verb == "marker"
                and command.get("id") == self._marker
                and self._caught_up is not None
                and not self._caught_up.done()
            ):
                self._caught_up.set_result(None)
        except (ValueError, KeyError, TypeError, AttributeError, BadSignature) as exc:
            log.warning("ignored a malformed control command on %s: %s", self._bus.queue, exc)
        finally:
            await message.ack()

    async def _on_request_message(self, message: AbstractIncomingMessage) -> None:
        try:
            command = load_command(message.body, self._bus.signer)
        except (ValueError, BadSignature) as exc:
            log.warning("ignored a malformed control request on %s: %s", self._bus.requests, exc)
            return
        if isinstance(command, dict) and command.get("verb") == "request" and self._on_request:
            self._on_request(command)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await close_quietly(connection, self._bus.broker.connect_timeout)
