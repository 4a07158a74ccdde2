"""Tick claims for AMQP-only deployments (``rpc://`` results): a RabbitMQ-held lease.

RabbitMQ delivers a single-active-consumer queue's messages to one consumer at a time, and
hands them to the next consumer the moment that one's connection drops. Every scheduler
consumes ``<prefix>.beat.lock`` with a prefetch of one; the active one receives the lock's
token and keeps it unacknowledged: it is the only scheduler whose claims succeed. Its
claims go to ``<prefix>.beat.state`` (a queue of length one holding the latest state), which
the next holder reads before claiming anything, so a handover neither repeats nor skips the
ticks already claimed (both queues outlive every scheduler: they are the schedule's state,
and are not deleted by ``amqp_delete_queues_on_close``). The token is renewed (republished,
then acknowledged) well within RabbitMQ's ``consumer_timeout``.

This is a lease, not a leader election the scheduler has to run: when the holder dies,
RabbitMQ moves the token; nothing waits for a timeout of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from .._amqp import amqp_errors, close_quietly, connection_name, open_connection
from .claims import TickRecord

__all__ = ["AmqpLeaseClaims"]

log = logging.getLogger("aioqueue.periodic")

_RENEW_EVERY = 600.0  # seconds; RabbitMQ's consumer_timeout defaults to 30 minutes
_CLOSE_TIMEOUT = 5.0


class AmqpLeaseClaims:
    """Claims succeed only in the scheduler holding the lock queue's token."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str,
        connect_timeout: float,
        heartbeat: float,
        reconnect_interval: float,
        client_name: str,
        compete: bool = True,
    ) -> None:
        self.url = url
        self.lock_name = f"{key_prefix}.beat.lock"
        self.state_name = f"{key_prefix}.beat.state"
        self.description = f"amqp lease {self.lock_name}"
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._reconnect_interval = reconnect_interval
        self._client_name = client_name
        self._compete = compete
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._lock_queue: AbstractQueue | None = None
        self._state_queue: AbstractQueue | None = None
        self._token: AbstractIncomingMessage | None = None
        self._token_since = 0.0
        self._records: dict[str, tuple[TickRecord, float]] = {}  # entry -> (record, expires at)
        self._loaded = asyncio.Event()
        self._loading: asyncio.Task[None] | None = None

    async def open(self) -> None:
        if self._connection is not None:
            return
        with amqp_errors(self.url, what="schedule lease"):
            self._connection = await open_connection(
                self.url,
                name=connection_name(self._client_name, "beat"),
                timeout=self._connect_timeout,
                heartbeat=self._heartbeat,
                reconnect_interval=self._reconnect_interval,
            )
            channel = await self._connection.channel()
            self._channel = channel
            await channel.set_qos(prefetch_count=1)
            lock = await channel.declare_queue(
                self.lock_name,
                durable=True,
                arguments={"x-single-active-consumer": True, "x-max-length": 1},
            )
            self._lock_queue = lock
            self._state_queue = await channel.declare_queue(
                self.state_name, durable=True, arguments={"x-max-length": 1}
            )
            if not self._compete:
                return
            declared = lock.declaration_result
            if declared.message_count == 0 and declared.consumer_count == 0:
                await self._publish_token()  # the first one in; a second token is harmless
            await lock.consume(self._on_token)

    async def _publish_token(self) -> None:
        assert self._channel is not None
        await self._channel.default_exchange.publish(
            aio_pika.Message(b"token", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.lock_name,
        )

    async def _on_token(self, message: AbstractIncomingMessage) -> None:
        previous = self._token
        self._token = message
        self._token_since = time.monotonic()
        if previous is not None and previous.channel is message.channel and self._loaded.is_set():
            return  # our own renewal: the state we hold is current
        self._loaded.clear()
        log.info("schedule lease %s taken: this scheduler sends the ticks", self.lock_name)
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        """Adopt the last holder's claims before claiming anything."""
        try:
            state = await self._read_state()
        except Exception:
            log.exception("reading the schedule state from %s failed", self.state_name)
            state = {}
        now = time.time()
        for name, record in state.items():
            mine = self._records.get(name)
            if mine is None or mine[0].due < record.due:
                self._records[name] = (record, now + 7 * 86400.0)
        self._loaded.set()

    async def _read_state(self) -> dict[str, TickRecord]:
        assert self._state_queue is not None
        with amqp_errors(self.url, what="schedule lease"):
            message = await self._state_queue.get(no_ack=False, fail=False)
            if message is None:
                return {}
            body = message.body
            await message.reject(requeue=True)
        raw: dict[str, Any] = orjson.loads(body)
        return {
            name: TickRecord(float(item["due"]), str(item["task_id"]), float(item["sent_at"]))
            for name, item in raw.items()
        }

    def holding(self) -> bool:
        token = self._token
        return token is not None and not token.channel.is_closed

    async def claim(self, entry: str, due: float, task_id: str, ttl: float) -> bool:
        if not self.holding():
            return False
        await self._loaded.wait()
        last = self._records.get(entry)
        if last is not None and last[0].due >= due:
            return False
        now = time.time()
        self._records[entry] = (TickRecord(due, task_id, now), now + ttl)
        await self._publish_state(now)
        if time.monotonic() - self._token_since > _RENEW_EVERY:
            await self._renew()
        return self.holding()

    async def _publish_state(self, now: float) -> None:
        assert self._channel is not None
        for name in [n for n, (_, until) in self._records.items() if until < now]:
            del self._records[name]  # an entry removed from the code: its state goes too
        body = orjson.dumps(
            {
                name: {"due": r.due, "task_id": r.task_id, "sent_at": r.sent_at}
                for name, (r, _) in self._records.items()
            }
        )
        with amqp_errors(self.url, what="schedule lease"):
            await self._channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=self.state_name,
            )

    async def _renew(self) -> None:
        """Republish the token, then let go of the held one: RabbitMQ would otherwise close a
        channel holding a delivery past its consumer_timeout. We stay the active consumer, so
        the new token comes back to us."""
        token = self._token
        if token is None or token.processed:
            return  # renewed already; the new token is on its way to us
        with amqp_errors(self.url, what="schedule lease"):
            await self._publish_token()
            await token.ack()
        self._token_since = time.monotonic()

    async def last(self, entries: list[str]) -> dict[str, TickRecord]:
        await self.open()
        if self.holding():
            await self._loaded.wait()
            known = {name: record for name, (record, _) in self._records.items()}
        else:
            known = await self._read_state()
        return {name: known[name] for name in entries if name in known}

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._loading is not None:
            self._loading.cancel()
            with contextlib.suppress(BaseException):
                await self._loading
        await close_quietly(connection, _CLOSE_TIMEOUT)
