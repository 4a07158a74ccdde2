"""Real worker subprocesses started through the CLI: crashes, signals, process pools, burst.

Each test runs ``python -m aioqueue.cli worker cli_app:app`` (see tests/workers.py) against
Redis db 15 under a key prefix of its own, with a 0.2 s heartbeat and a 1 s heartbeat TTL so a
dead worker's messages come back in about a second. Nothing waits on a fixed sleep: every wait
polls a condition (a log line, a Redis key, a process exit) with a deadline.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from cli_app import (
    add,
    gated,
    process_gated,
    process_nap,
    process_pid,
    process_record,
    process_sleep,
    record,
    thread_add,
    thread_gated,
    thread_record,
)
from conftest import wait_until
from workers import WorkerProcess, WorkerSet, worker_env

from aioqueue import App, States, WorkerLostError
from aioqueue.brokers.base import attempt_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

QUEUE = "default"
ONE_PROCESS = ("--processes", "1")
# How long a worker may take to exit once it must stop running tasks: the grace period plus
# ending a pool child and closing connections. Generous, for a loaded 2-core CI machine.
PROMPTLY = 8.0
# record(token, first_sleep) on each executor: async, thread and process-pool child.
RECORD_TASKS = pytest.mark.parametrize(
    "task_name",
    [record.name, thread_record.name, process_record.name],
    ids=["async", "thread", "process"],
)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
async def workers(
    redis_url: str, key_prefix: str, redis_cleanup: None, tmp_path: Path
) -> AsyncIterator[WorkerSet]:
    """Starts workers for this test; ends every one of them (by pid) before keys are deleted."""
    group = WorkerSet(worker_env(redis_url, key_prefix), tmp_path)
    try:
        yield group
    finally:
        await group.close()


@pytest.fixture
async def client(redis_url: str, key_prefix: str) -> AsyncIterator[App]:
    """The sending side, in this process, on the workers' broker, backend and prefix."""
    app = App("client", broker=redis_url, backend=redis_url, key_prefix=key_prefix)
    async with app:
        yield app


@pytest.fixture
async def rdb(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain Redis client for looking at the broker's keys."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# -- looking at Redis -------------------------------------------------------------------


def as_bytes(value: bytes | str) -> bytes:
    """redis-py types replies as bytes or str; without decode_responses they are bytes."""
    assert isinstance(value, bytes), value
    return value


class Keys:
    """The broker's keys for QUEUE and the keys cli_app's tasks record under."""

    def __init__(self, rdb: aioredis.Redis, prefix: str) -> None:
        self.rdb = rdb
        self.prefix = prefix
        self.queue = f"{prefix}:{{{QUEUE}}}"

    def processing(self, worker_id: str | None) -> str:
        assert worker_id is not None
        return f"{self.queue}:processing:{worker_id}"

    def alive(self, worker_id: str | None) -> str:
        assert worker_id is not None
        return f"{self.queue}:alive:{worker_id}"

    async def queued(self) -> list[bytes]:
        """Waiting messages, next to run first."""
        return [as_bytes(body) for body in reversed(await self.rdb.lrange(self.queue, 0, -1))]

    async def held(self) -> dict[str, int]:
        """Length of every non-empty processing list, by key."""
        out = {}
        async for key in self.rdb.scan_iter(match=f"{self.queue}:processing:*", count=1000):
            out[key.decode()] = int(await self.rdb.llen(key))
        return {key: n for key, n in out.items() if n}

    async def workers(self) -> set[str]:
        return {as_bytes(m).decode() for m in await self.rdb.smembers(f"{self.queue}:workers")}

    async def runs(self, token: str) -> int:
        return int(await self.rdb.get(f"{self.prefix}:t:runs:{token}") or 0)

    async def log(self, token: str) -> list[dict[str, Any]]:
        return [
            orjson.loads(e) for e in await self.rdb.lrange(f"{self.prefix}:t:log:{token}", 0, -1)
        ]

    async def open_gate(self, gate: str) -> None:
        await self.rdb.set(f"{self.prefix}:t:gate:{gate}", b"1")

    async def child_pid(self, token: str) -> int | None:
        raw = await self.rdb.get(f"{self.prefix}:t:child:{token}")
        return int(raw) if raw is not None else None


@pytest.fixture
def keys(rdb: aioredis.Redis, key_prefix: str) -> Keys:
    return Keys(rdb, key_prefix)


def token() -> str:
    return uuid.uuid4().hex


async def wait_runs(keys: Keys, tok: str, count: int, timeout: float = 10.0) -> None:
    async def reached() -> bool:
        return await keys.runs(tok) >= count

    await wait_until(reached, timeout=timeout)


async def wait_drained(keys: Keys) -> None:
    """Until the queue is empty and no worker holds a message (acks follow stores)."""

    async def drained() -> bool:
        return not await keys.queued() and not await keys.held()

    await wait_until(drained, timeout=10)


def ran_in(worker: WorkerProcess, entry: dict[str, Any]) -> bool:
    """True if a logged execution ran in this worker or one of its pool children."""
    worker.children()
    return entry["pid"] == worker.pid or entry["pid"] in worker.pool_children


async def stop(worker: WorkerProcess, timeout: float = 15.0) -> int:
    worker.send_signal(signal.SIGTERM)
    return await worker.wait_exit(timeout)


# -- crash and signals --------------------------------------------------------------------


async def test_sigkill_mid_task_is_redelivered_to_another_worker(
    workers: WorkerSet, client: App, keys: Keys
) -> None:
    a = await workers.start(*ONE_PROCESS, name="A")
    tok = token()
    result = await client.send_task(record.name, [tok, 30.0])
    await wait_runs(keys, tok, 1)
    assert await keys.log(tok) == [{"pid": a.pid, "attempt": 1, "run": 1}]

    a.send_signal(signal.SIGKILL)
    assert await a.wait_exit(5) == -signal.SIGKILL
    # Nobody has taken it back yet: it is still in the dead worker's processing list.
    assert await keys.held() == {keys.processing(a.worker_id): 1}

    b = await workers.start(*ONE_PROCESS, name="B")
    value = await result.get(timeout=15)  # B's sweep returns it once A's heartbeat expires
    assert value == {"pid": b.pid, "attempt": 2, "run": 2}
    assert await keys.log(tok) == [
        {"pid": a.pid, "attempt": 1, "run": 1},
        {"pid": b.pid, "attempt": 2, "run": 2},
    ]
    await wait_drained(keys)
    assert await keys.workers() == {b.worker_id}  # the sweep forgot A
    assert await stop(b) == 0, b.output()
    assert await keys.runs(tok) == 2  # exactly twice: once killed on A, once on B


async def test_sigterm_drains_running_tasks_and_starts_no_new_ones(
    workers: WorkerSet, client: App, keys: Keys
) -> None:
    # Five slots, four busy (async, async, thread, process): the free one is waiting on the
    # queue when SIGTERM arrives.
    worker = await workers.start("-c", "5", "--shutdown-timeout", "20", *ONE_PROCESS)
    gate = token()
    running_tasks = [gated.name, gated.name, thread_gated.name, process_gated.name]
    running_tokens = [token() for _ in running_tasks]
    running = [
        await client.send_task(name, [tok, gate])
        for name, tok in zip(running_tasks, running_tokens, strict=True)
    ]
    for tok in running_tokens:
        await wait_runs(keys, tok, 1)

    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    await worker.wait_for_log(r"SIGTERM: finishing running tasks")
    await worker.wait_for_log(r"draining 4 running task\(s\)")
    waiting_tokens = [token() for _ in range(4)]
    waiting = [await client.send_task(record.name, [t, 0.0]) for t in waiting_tokens]
    assert worker.returncode is None  # still draining: the gate is closed
    await keys.open_gate(gate)

    assert await worker.wait_exit(15) == 0, worker.output()
    assert time.monotonic() - started < 15
    for tok, result in zip(running_tokens, running, strict=True):
        entry = await result.get(timeout=5)
        assert entry["attempt"] == 1 and entry["run"] == 1 and ran_in(worker, entry)
        assert await keys.runs(tok) == 1
    for tok, result in zip(waiting_tokens, waiting, strict=True):
        assert await keys.runs(tok) == 0, "a task started after SIGTERM"
        assert await result.state() == States.PENDING
    queued = await keys.queued()
    assert len(queued) == 4
    assert [attempt_of(body) for body in queued] == [1, 1, 1, 1]  # never started: not raised
    assert await keys.held() == {}
    assert await keys.workers() == set()
    assert not await keys.rdb.exists(keys.alive(worker.worker_id))


@RECORD_TASKS
async def test_sigterm_past_shutdown_timeout_returns_the_task(
    workers: WorkerSet, client: App, keys: Keys, task_name: str
) -> None:
    worker = await workers.start("--shutdown-timeout", "0.5", *ONE_PROCESS, name="short")
    tok = token()
    result = await client.send_task(task_name, [tok, 30.0])
    await wait_runs(keys, tok, 1)

    started = time.monotonic()
    assert await stop(worker, timeout=PROMPTLY) == 0, worker.output()
    assert time.monotonic() - started < PROMPTLY
    queued = await keys.queued()
    assert len(queued) == 1 and tok.encode() in queued[0]
    assert attempt_of(queued[0]) == 2  # it was taken and not finished
    assert await keys.held() == {}
    assert await result.state() == States.PENDING  # cancelled, not failed
    assert await keys.runs(tok) == 1

    second = await workers.start(*ONE_PROCESS, name="second")
    value = await result.get(timeout=10)
    assert value["attempt"] == 2 and value["run"] == 2 and ran_in(second, value)
    await wait_drained(keys)
    assert await stop(second) == 0, second.output()
    assert await keys.runs(tok) == 2


@RECORD_TASKS
async def test_second_signal_stops_at_once_and_returns_the_task(
    workers: WorkerSet, client: App, keys: Keys, task_name: str
) -> None:
    worker = await workers.start("--shutdown-timeout", "30", *ONE_PROCESS)
    tok = token()
    result = await client.send_task(task_name, [tok, 30.0])
    await wait_runs(keys, tok, 1)

    worker.send_signal(signal.SIGTERM)
    await worker.wait_for_log(r"SIGTERM: finishing running tasks")
    started = time.monotonic()
    worker.send_signal(signal.SIGINT)
    # cli.py: a second signal cancels running tasks, returns them, and exits 1.
    assert await worker.wait_exit(PROMPTLY) == 1, worker.output()
    assert time.monotonic() - started < PROMPTLY
    assert "SIGINT again: cancelling running tasks" in worker.stderr()
    queued = await keys.queued()
    assert len(queued) == 1 and tok.encode() in queued[0]
    assert attempt_of(queued[0]) == 2
    assert await keys.held() == {}
    assert await result.state() == States.PENDING
    assert await keys.runs(tok) == 1


async def test_sigterm_to_worker_and_pool_child_still_drains(
    workers: WorkerSet, client: App, keys: Keys
) -> None:
    """systemd's default stop (KillMode=control-group) sends SIGTERM to every process of the
    service at once; `kill -TERM -<pgid>` does the same. The child ignores SIGINT so that "the
    parent decides how its children stop" (worker/child.py); SIGTERM must not kill it either."""
    worker = await workers.start("--shutdown-timeout", "20", *ONE_PROCESS)
    gate, tok = token(), token()
    result = await client.send_task(process_gated.name, [tok, gate])
    await wait_runs(keys, tok, 1)
    (entry,) = await keys.log(tok)
    child = entry["pid"]
    assert child in worker.children()

    worker.send_signal(signal.SIGTERM)
    os.kill(child, signal.SIGTERM)
    await worker.wait_for_log(r"draining 1 running task\(s\)")
    await keys.open_gate(gate)
    assert await worker.wait_exit(15) == 0, worker.output()
    assert await result.get(timeout=5) == entry  # finished, not WorkerLostError
    assert await keys.queued() == []
    assert await keys.held() == {}


# -- process pool ---------------------------------------------------------------------------


async def test_killed_pool_child_fails_its_task_and_the_pool_heals(
    workers: WorkerSet, client: App, keys: Keys
) -> None:
    worker = await workers.start(*ONE_PROCESS)
    tok = token()
    doomed = await client.send_task(process_sleep.name, [tok, 30.0])

    async def child_known() -> bool:
        return await keys.child_pid(tok) is not None

    await wait_until(child_known)
    child = await keys.child_pid(tok)
    assert child is not None and child in worker.children()
    os.kill(child, signal.SIGKILL)

    with pytest.raises(WorkerLostError, match="SIGKILL") as caught:
        await doomed.get(timeout=10)
    assert str(child) in str(caught.value)
    assert await doomed.state() == States.FAILURE

    healed = await client.send_task(process_pid.name, [])
    new_child = await healed.get(timeout=15)
    assert new_child != child
    assert new_child in worker.children()
    await wait_drained(keys)
    assert worker.returncode is None
    assert await stop(worker) == 0, worker.output()


async def test_max_tasks_per_child_replaces_children(
    workers: WorkerSet, client: App, keys: Keys
) -> None:
    worker = await workers.start("--max-tasks-per-child", "2", *ONE_PROCESS)
    results = [await client.send_task(process_pid.name, []) for _ in range(5)]
    pids = [await r.get(timeout=20) for r in results]
    assert len(set(pids)) >= 3, pids
    assert max(Counter(pids).values()) <= 2, pids
    await wait_drained(keys)
    assert await stop(worker) == 0, worker.output()


# -- burst and start-up errors -------------------------------------------------------------


async def test_burst_runs_everything_then_exits(
    workers: WorkerSet, client: App, keys: Keys
) -> None:
    sums = [await client.send_task(add.name, [i, i]) for i in range(5)]
    threaded = [await client.send_task(thread_add.name, [i, 1]) for i in range(2)]
    naps = [await client.send_task(process_nap.name, [0.05]) for _ in range(2)]
    assert len(await keys.queued()) == 9

    worker = await workers.start("--burst", *ONE_PROCESS, ready=False)
    assert await worker.wait_exit(20) == 0, worker.output()
    assert [await r.get(timeout=1) for r in sums] == [0, 2, 4, 6, 8]
    assert [await r.get(timeout=1) for r in threaded] == [[1, True], [2, True]]
    for r in naps:
        seconds, pid = await r.get(timeout=1)
        assert seconds == 0.05 and pid != worker.pid
    assert await keys.queued() == []
    assert await keys.held() == {}
    assert "stopped: 9 task(s) settled, 0 returned" in worker.stderr()


@pytest.mark.parametrize(
    ("app_path", "message"),
    [
        ("no_such_module_for_aioqueue:app", "cannot import 'no_such_module_for_aioqueue'"),
        ("cli_app:no_such_app", "has no attribute 'no_such_app'"),
        ("cli_app:add", "not an aioqueue App"),
    ],
)
async def test_unknown_app_path_fails_with_a_clear_message(
    workers: WorkerSet, app_path: str, message: str
) -> None:
    worker = await workers.start(app_path=app_path, ready=False)
    code = await worker.wait_exit(15)
    stderr = worker.stderr()
    assert code != 0, worker.output()
    assert message in stderr, worker.output()
    assert "Traceback" not in stderr, worker.output()
