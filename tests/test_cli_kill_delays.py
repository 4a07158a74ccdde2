"""Delayed and expiring tasks while two real CLI workers run and one of them is SIGKILLed.

Issue 8 ("task semantics"), on Redis and on RabbitMQ. Each test runs two ``python -m aioqueue.cli
worker cli_app:app`` processes (tests/workers.py) under a key prefix of its own, with a 0.2 s
heartbeat and a 1 s heartbeat TTL, so a killed Redis worker's messages come back within about
1.2 s (a live worker's sweep returns them once the dead one's heartbeat key expires); RabbitMQ
returns a killed worker's unacked messages as soon as its connection drops. Results live on Redis
in both cases, and the tasks (``cli_app.stamp`` / ``cli_app.hold``) record every execution there,
with its start time and pid, so the test counts runs per task id.

Where a delayed message waits: a message sent with an eta waits in the broker (Redis: the delayed
sorted set; RabbitMQ: the delay buckets), held by no worker. To also have messages *held by* the
worker that gets killed, the tests publish some straight to the work queue with their eta only in
the envelope (what a publisher whose clock runs behind, or a failed RabbitMQ re-route, produces):
a worker that takes one parks it until its eta, keeping it in its processing list (Redis) or
unacked (RabbitMQ).

Nothing waits on a fixed sleep: every wait polls a condition (a Redis key, a queue length, a
process exit, a result) with a deadline. The helpers are in :class:`Harness`, kept apart from
the scenarios so more can be written with them (see the note above it).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from cli_app import hold, record_key, retry_stamp, stamp
from conftest import AMQP_URL, REDIS_URL, delete_prefixed, require_server, wait_until
from workers import WorkerProcess, WorkerSet, worker_env

from aioqueue import App, States, TaskRevoked
from aioqueue.brokers.amqp_consumer import DELAY_BUCKETS_MS
from aioqueue.message import Message

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

QUEUE = "default"
LATE = 1.5
"""The bound this file states: a delayed task starts no earlier than its eta and at most this
many seconds after it, also when the worker that held it was SIGKILLed (measured here: at most
0.02 s late on Redis and on RabbitMQ; the rest is room for a loaded CI machine)."""
RETURN_WITHIN = 3.0
"""A killed Redis worker's messages are back in the queue this soon (1 s TTL, 0.2 s beats)."""


# -- the harness: two CLI workers on one broker, and what their tasks recorded ---------------
#
# For the lead's "retried task" scenario (not written here): add to tests/cli_app.py a task
# that logs each run as stamp() does (RPUSH {"pid", "at"} to ``record_key("stamp", token)``) and
# then raises ``aioqueue.Retry(countdown=...)`` (or an exception in its ``retry_for``) until
# some run; start two workers with ``h.start(...)``, send it with ``task_id=token``, kill the
# worker that ran the first try with ``h.kill(worker)`` while the retry waits (``h.stamps``
# tells which pid ran it), then check with ``h.wait_stamped`` / ``h.stamps`` that each try ran
# once, each retry no earlier than its countdown after the try before (``assert_on_time``),
# and ``h.client.AsyncResult(token)`` for the final state (``h.wait_drained()`` first, so no
# copy is left that could still run). ``h.inject_parked`` puts a message with a future eta into
# a worker's hands directly, should the retry need to be held by the worker that dies.


class Harness:
    """Two (or more) ``aioqueue worker`` processes on one broker, and a client app beside them.

    ``broker`` is "redis" or "amqp"; results are on Redis in both cases (the tasks record there).
    """

    def __init__(
        self, broker: str, workers: WorkerSet, client: App, rdb: aioredis.Redis, prefix: str
    ) -> None:
        self.broker = broker
        self.workers = workers
        self.client = client
        self.rdb = rdb
        self.prefix = prefix
        self.queue_key = f"{prefix}:{{{QUEUE}}}"

    async def start(self, name: str, concurrency: int) -> WorkerProcess:
        """A worker consuming the default queue, ready (its "consuming" line) on return."""
        return await self.workers.start(
            "--concurrency", str(concurrency), "--processes", "1", name=name
        )

    async def kill(self, worker: WorkerProcess) -> float:
        """SIGKILL ``worker`` and reap it; the time of the kill."""
        killed_at = time.time()
        worker.send_signal(signal.SIGKILL)
        assert await worker.wait_exit(5) == -signal.SIGKILL
        return killed_at

    # -- sending

    async def send_stamp(self, token: str, **options: Any) -> None:
        """stamp(token) with ``task_id=token`` and the given send options."""
        await self.client.send_task(stamp.name, [token], task_id=token, **options)

    async def inject_parked(
        self, tokens: Iterable[str], *, eta: float, expires: float | None = None
    ) -> None:
        """stamp(token) messages with a future eta in the envelope, published straight to the
        work queue (no eta given to the broker): the worker that takes one parks it."""
        broker = await self.client.ready_broker()
        for token in tokens:
            message = Message(
                id=token,
                task=stamp.name,
                queue=QUEUE,
                args=(token,),
                eta=eta,
                expires=expires,
                reply_to=self.client.backend.reply_to(),
                sent_at=time.time(),
            )
            await broker.publish(QUEUE, self.client.codec.encode(message))

    # -- looking at the broker

    async def queued(self) -> int:
        """Messages ready in the work queue (not delayed, not held by a worker)."""
        broker = await self.client.ready_broker()
        return await broker.queue_length(QUEUE)

    async def held_by(self, worker: WorkerProcess) -> int:
        """Redis only: messages in ``worker``'s processing list."""
        assert self.broker == "redis" and worker.worker_id is not None
        return int(await self.rdb.llen(f"{self.queue_key}:processing:{worker.worker_id}"))

    async def wait_taken_by(self, worker: WorkerProcess, count: int) -> None:
        """Until ``worker`` holds ``count`` messages and the queue is empty (on RabbitMQ, with
        one consumer running, an empty queue means that consumer holds them unacked)."""

        async def taken() -> bool:
            if await self.queued():
                return False
            return self.broker == "amqp" or await self.held_by(worker) == count

        await wait_until(taken, timeout=10)

    async def wait_queued(self, count: int, timeout: float = 10.0) -> None:
        async def back() -> bool:
            return await self.queued() == count

        await wait_until(back, timeout=timeout)

    async def wait_drained(self) -> None:
        """Until nothing is queued, delayed or (Redis) held by any worker."""

        async def drained() -> bool:
            if await self.queued():
                return False
            if self.broker == "amqp":
                return True
            if await self.rdb.zcard(f"{self.queue_key}:delayed"):
                return False
            async for key in self.rdb.scan_iter(match=f"{self.queue_key}:processing:*"):
                if await self.rdb.llen(key):
                    return False
            return True

        await wait_until(drained, timeout=10)

    # -- what the tasks recorded

    async def stamps(self, token: str) -> list[dict[str, Any]]:
        """Every execution of stamp(token) (or hold(token)): {"pid", "at"}, in order."""
        raw = await self.rdb.lrange(record_key("stamp", token, self.prefix), 0, -1)
        return [orjson.loads(entry) for entry in raw]

    async def wait_stamped(self, tokens: Iterable[str], timeout: float) -> None:
        """Until every token ran at least once."""
        wanted = list(tokens)

        async def all_ran() -> bool:
            for token in wanted:
                if not await self.rdb.exists(record_key("stamp", token, self.prefix)):
                    return False
            return True

        await wait_until(all_ran, timeout=timeout, interval=0.05)

    async def open_gate(self, gate: str) -> None:
        await self.rdb.set(record_key("gate", gate, self.prefix), b"1")


def assert_on_time(token: str, at: float, eta: float) -> None:
    """Started no earlier than its eta, and at most LATE after it."""
    assert at >= eta, f"{token} started {eta - at:.3f}s before its eta"
    assert at - eta <= LATE, f"{token} started {at - eta:.3f}s after its eta (bound {LATE}s)"


def token() -> str:
    return uuid.uuid4().hex


def utc(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> str:
    require_server(REDIS_URL, "Redis")  # results, and the tasks' records, are on Redis
    if request.param == "amqp":
        require_server(AMQP_URL, "RabbitMQ")
    return str(request.param)


@pytest.fixture
async def harness(broker: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """The client app and the workers; afterwards every worker is ended (by pid) and every key
    and queue of the test's prefix is deleted (also the delay buckets a worker declared)."""
    url = AMQP_URL if broker == "amqp" else REDIS_URL
    workers = WorkerSet(worker_env(REDIS_URL, key_prefix, broker_url=url), tmp_path)
    rdb = aioredis.Redis.from_url(REDIS_URL)
    client = App("client", broker=url, backend=REDIS_URL, key_prefix=key_prefix)
    try:
        async with client:
            yield Harness(broker, workers, client, rdb, key_prefix)
    finally:
        await workers.close()
        await rdb.aclose()
        await delete_prefixed(REDIS_URL, key_prefix)
        if broker == "amqp":
            await delete_amqp_queues(key_prefix)


async def delete_amqp_queues(prefix: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        base = f"{prefix}.{QUEUE}"
        for name in [f"{base}.delay.{ms}ms" for ms in DELAY_BUCKETS_MS] + [base, f"{base}.dead"]:
            await channel.queue_delete(name)
        await channel.exchange_delete(f"{prefix}.dead")
    finally:
        await connection.close()


# -- scenarios ------------------------------------------------------------------------------


async def test_delayed_tasks_run_once_on_time_when_a_worker_is_killed(harness: Harness) -> None:
    """(a) 10 messages parked in worker A and 40 tasks sent with an eta 3 s ahead; A is
    SIGKILLed while all of them wait. Each runs exactly once, on B, no earlier than its eta and
    at most LATE after it."""
    h = harness
    a = await h.start("A", concurrency=50)
    parked_eta = time.time() + 8.0  # room for B to start, also on a loaded machine
    parked = [token() for _ in range(10)]
    await h.inject_parked(parked, eta=parked_eta)
    await h.wait_taken_by(a, len(parked))
    b = await h.start("B", concurrency=50)

    base = time.time() + 3.0
    etas = {tok: base + i * 0.025 for i, tok in enumerate(token() for _ in range(40))}
    await asyncio.gather(*(h.send_stamp(tok, eta=utc(eta)) for tok, eta in etas.items()))
    etas.update(dict.fromkeys(parked, parked_eta))
    assert not any([await h.stamps(tok) for tok in etas]), "a delayed task ran before the kill"

    killed_at = await h.kill(a)
    # The premise: everything still waits, with time to spare for A's messages to come back.
    assert killed_at < min(etas.values()) - 1.5, "setup too slow: the kill came near the etas"
    if h.broker == "redis":
        # A's lease lapses and B's sweep returns what A parked, long before it is due.
        await wait_until(lambda: _is_zero(h.held_by(a)), timeout=RETURN_WITHIN)

    await h.wait_stamped(etas, timeout=max(etas.values()) - time.time() + 10)
    for tok in etas:
        assert await h.client.AsyncResult(tok).get(timeout=10) >= etas[tok]
    await h.wait_drained()  # nothing left anywhere that could still run a second time
    lateness = []
    for tok, eta in etas.items():
        runs = await h.stamps(tok)
        assert len(runs) == 1, f"{tok} ran {len(runs)} times: {runs}"
        assert runs[0]["pid"] == b.pid
        assert_on_time(tok, runs[0]["at"], eta)
        lateness.append(runs[0]["at"] - eta)
    print(f"\n{h.broker}: 50 delayed tasks across a SIGKILL, max lateness {max(lateness):.3f}s")


async def test_expired_tasks_are_revoked_unrun_when_the_worker_holding_them_is_killed(
    harness: Harness,
) -> None:
    """(b) B is kept busy on its one slot. Five tasks are sent with countdown 3 s and expires
    1 s; five messages parked in A are due in 3.5 s and expire 0.3 s later. A is SIGKILLed before
    they are due; its messages come back but B reaches them only after they expired. None of the
    ten ever runs; each is REVOKED and ``get()`` raises TaskRevoked."""
    h = harness
    b = await h.start("B", concurrency=1)
    gate = token()
    busy = await h.client.send_task(hold.name, [gate], task_id=gate)
    await h.wait_stamped([gate], timeout=10)  # B's only slot is taken: it fetches nothing more
    a = await h.start("A", concurrency=20)

    sent = [token() for _ in range(5)]
    await asyncio.gather(*(h.send_stamp(tok, countdown=3.0, expires=1.0) for tok in sent))
    eta = time.time() + 3.5
    expires = eta + 0.3
    parked = [token() for _ in range(5)]
    await h.inject_parked(parked, eta=eta, expires=expires)
    await h.wait_taken_by(a, len(parked))

    killed_at = await h.kill(a)
    assert killed_at < eta - 0.5, "setup too slow: the kill came near the eta"
    # Back in the queue (Redis: B's sweep once A's lease lapsed; RabbitMQ: at once), where
    # nobody takes them while B is busy.
    await h.wait_queued(len(parked), timeout=RETURN_WITHIN)

    async def expired() -> bool:
        return time.time() > expires

    await wait_until(expired, timeout=10)
    await h.open_gate(gate)
    assert await busy.get(timeout=10) == b.pid

    for tok in sent + parked:
        result = h.client.AsyncResult(tok)
        with pytest.raises(TaskRevoked, match="expired"):
            await result.get(timeout=15)
        assert await result.state() == States.REVOKED
    await h.wait_drained()
    for tok in sent + parked:
        assert await h.stamps(tok) == [], f"{tok} ran though it had expired"


async def test_retried_tasks_run_each_try_once_when_a_worker_is_killed(harness: Harness) -> None:
    """(c) Two workers run the first tries of 12 tasks, each of which waits 3 s and then asks
    to be retried 2 s later. The worker running some of them is SIGKILLed mid-try: those tries
    come back and run again on the survivor. Every task then retries exactly once (its retry
    never before its countdown) and ends SUCCESS with one retry: no try is lost, and no retry
    is sent twice, although a worker died in the middle."""
    h = harness
    a = await h.start("A", concurrency=20)
    b = await h.start("B", concurrency=20)
    pause, countdown = 3.0, 2.0
    tokens = [token() for _ in range(12)]
    await asyncio.gather(
        *(
            h.client.send_task(retry_stamp.name, [tok, pause, countdown], task_id=tok)
            for tok in tokens
        )
    )
    await h.wait_stamped(tokens, timeout=15)
    first_pids = {(await h.stamps(tok))[0]["pid"] for tok in tokens}
    victim = a if a.pid in first_pids else b
    survivor = b if victim is a else a
    killed_at = await h.kill(victim)
    killed_tries = [tok for tok in tokens if (await h.stamps(tok))[0]["pid"] == victim.pid]
    assert killed_tries, "the victim ran no first try"
    first_at = max([(await h.stamps(tok))[0]["at"] for tok in tokens])
    assert killed_at < first_at + pause, "setup too slow: the kill came after the tries ended"

    for tok in tokens:
        assert await h.client.AsyncResult(tok).get(timeout=30) == 1
    await h.wait_drained()  # nothing left anywhere that could still run again
    for tok in tokens:
        runs = await h.stamps(tok)
        firsts = [run for run in runs if run["retries"] == 0]
        retries = [run for run in runs if run["retries"] == 1]
        assert len(retries) == 1, f"{tok}: the retry ran {len(retries)} times: {runs}"
        assert len(runs) == len(firsts) + 1, f"{tok}: unexpected runs {runs}"
        expected_firsts = 2 if tok in killed_tries else 1  # the killed try ran again
        assert len(firsts) == expected_firsts, f"{tok}: first try ran {len(firsts)} times"
        assert retries[0]["pid"] == survivor.pid  # due after the kill
        assert retries[0]["at"] >= firsts[-1]["at"] + pause + countdown - 0.05
        assert await h.client.AsyncResult(tok).retries() == 1
        assert await h.client.AsyncResult(tok).state() == States.SUCCESS


async def _is_zero(count: Any) -> bool:
    return bool(await count == 0)
