"""Shared pieces for every contestant module.

Each contestant module (``c_*.py``) defines a subclass of :class:`Contestant` and a module-level
``make(transport: str) -> Contestant``. The driver (``_driver.py``) runs inside that contestant's
own virtualenv and calls the methods below; worker processes are started by the orchestrator
from the argv that :meth:`Contestant.worker_argv` returns.

Environment shared by driver and workers (set by ``run.py``):

* ``BENCH_REDIS_URL``  redis://127.0.0.1:6379/14 by default (the run flushes that db only)
* ``BENCH_AMQP_URL``   amqp://guest:guest@127.0.0.1:5672/
* ``BENCH_RUN_ID``     unique per run; used in RabbitMQ queue names so they never collide
* ``BENCH_TRANSPORT``  "redis" or "amqp"
* ``BENCH_PAYLOAD_BYTES`` size of the one str argument of a "payload" task (100,000)
* ``BENCH_QUEUES``     how many queues the "queues" kind spreads its tasks over (20)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RUN_ID = os.environ.get("BENCH_RUN_ID", "dev")
TRANSPORT = os.environ.get("BENCH_TRANSPORT", "redis")
RESULT_TTL = 3600  # seconds results are kept, for every contestant that takes a TTL
PAYLOAD_BYTES = int(os.environ.get("BENCH_PAYLOAD_BYTES", "100000"))
N_QUEUES = int(os.environ.get("BENCH_QUEUES", "20"))
HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
_PAYLOAD: list[str] = []


def payload() -> str:
    """The argument of a "payload" task: PAYLOAD_BYTES ASCII letters and digits, built once.
    Not one repeated character, so nothing along the way can make it small by compressing."""
    if not _PAYLOAD:
        import random
        import string

        rng = random.Random(15)
        _PAYLOAD.append("".join(rng.choices(string.ascii_letters + string.digits, k=PAYLOAD_BYTES)))
    return _PAYLOAD[0]


def payload_size(data: str) -> int:
    """What a payload task returns: a small int (the result is never the cost measured)."""
    return len(data)


def multi_queues(base: str) -> list[str]:
    """The N_QUEUES queue names of the "queues" kind, from a contestant's own queue name."""
    return [f"{base}-q{i:02d}" for i in range(N_QUEUES)]


class RoundRobin:
    """Hands out the names in turn: tasks spread evenly over the queues, in sending order."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.i = -1

    def next(self) -> str:
        self.i = (self.i + 1) % len(self.names)
        return self.names[self.i]


def queue_name(base: str) -> str:
    """A queue name unique to this benchmark run (RabbitMQ queues are deleted afterwards)."""
    return f"bench.{base}.{RUN_ID}"


def version_of(*dists: str) -> dict[str, str]:
    # imported here: importlib.metadata pulls in email, zipfile and csv (~3 MB), and workers
    # import this module, so a top-level import would inflate every worker's peak RSS
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def spin_ms(ms: float) -> int:
    """Burn CPU for about ``ms`` milliseconds in pure Python; returns the loop count."""
    import time

    end = time.perf_counter() + ms / 1000.0
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def sleep_ms(ms: float) -> None:
    import time

    time.sleep(ms / 1000.0)


class Unsupported(Exception):
    """Raised by a contestant for a workload it cannot run; the message is the reason."""


class Contestant:
    """The small interface every contestant implements.

    Handles returned by :meth:`send` are opaque to the driver except through
    :meth:`result_key`, :meth:`wait` and :meth:`count_remaining`.
    """

    name: ClassVar[str] = "?"
    #: distributions whose versions are recorded
    dists: ClassVar[tuple[str, ...]] = ()
    #: True when send/wait are coroutines that do not block the loop
    async_client: ClassVar[bool] = True
    #: tasks per call of send_batch, or None when the library has no batch API
    batch_size: ClassVar[int | None] = None
    #: workload -> reason, for workloads this contestant cannot run
    unsupported: ClassVar[dict[str, str]] = {}
    #: Redis key prefixes a purge must keep (e.g. kombu bindings)
    keep_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.settings: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect the client."""

    async def stop(self) -> None:
        """Disconnect the client."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transport": self.transport,
            "versions": version_of(*self.dists),
            "settings": self.settings,
            "async_client": self.async_client,
            "batch_size": self.batch_size,
            "unsupported": self.unsupported,
        }

    # -- client ---------------------------------------------------------------------------
    async def send(self, kind: str = "noop", ms: float = 0.0) -> Any:
        """Send one task of ``kind`` and return a handle: "noop", "cpu" or "block" (``ms``
        each), "payload" (one str argument, :func:`payload`, a tiny result) or "queues" (a noop
        on the next of :func:`multi_queues`, round robin)."""
        raise NotImplementedError

    async def send_batch(self, count: int) -> list[Any]:
        """Send ``count`` noop tasks with the library's batch API."""
        raise Unsupported("no batch enqueue API")

    async def wait(self, handle: Any, timeout: float) -> None:
        """Wait for the task behind ``handle`` to finish, through the library's result API."""
        raise NotImplementedError

    def result_key(self, handle: Any) -> str | None:
        """Redis key (db 14) whose existence means the task finished; None -> count_remaining."""
        return None

    async def count_remaining(self, handles: Sequence[Any]) -> int:
        """Tasks not finished yet; only used when result_key() returns None."""
        raise NotImplementedError

    # -- worker ---------------------------------------------------------------------------
    def worker_argv(self, kind: str) -> tuple[list[str], dict[str, str]]:
        """argv and extra env for one worker process for workload ``kind``.

        kind: "noop" (drain, round trip, fan-in, scaling, memory), "cpu", "block", "payload"
        (configured as noop) or "queues" (as noop, listening on every one of multi_queues).
        The process is started with cwd = this directory and PYTHONPATH including it.
        """
        raise NotImplementedError

    # -- housekeeping ---------------------------------------------------------------------
    async def purge(self) -> None:
        """Remove every queued task and stored result (no worker is running)."""
        await flush_db(self.keep_prefixes)
        await self.after_flush()

    async def after_flush(self) -> None:
        """Re-create anything a flush of db 14 removed that the client set up."""

    async def cleanup(self) -> None:
        """Final cleanup: delete RabbitMQ queues and anything else outside db 14."""
        await flush_db(self.keep_prefixes)


async def flush_db(keep_prefixes: Sequence[str] = ()) -> None:
    """FLUSHDB on db 14, or delete every key except ``keep_prefixes`` ones."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        if not keep_prefixes:
            await client.flushdb()
            return
        keep = tuple(p.encode() for p in keep_prefixes)
        batch: list[bytes] = []
        async for key in client.scan_iter(count=1000):
            if not key.startswith(keep):
                batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose() if hasattr(client, "aclose") else await client.close()


async def delete_amqp_queues(names: Sequence[str]) -> None:
    """Delete RabbitMQ queues by name (used by the AMQP contestants' cleanup)."""
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL, timeout=5)
    try:
        for name in names:
            ch = await conn.channel()
            with contextlib.suppress(Exception):  # may not exist; a failed op closes the channel
                await ch.queue_delete(name)
    finally:
        await conn.close()


async def delete_amqp_exchanges(names: Sequence[str]) -> None:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL, timeout=5)
    try:
        for name in names:
            ch = await conn.channel()
            with contextlib.suppress(Exception):  # may not exist; a failed op closes the channel
                await ch.exchange_delete(name)
    finally:
        await conn.close()


async def purge_amqp_queues(names: Sequence[str]) -> None:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL, timeout=5)
    try:
        for name in names:
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                q = await ch.declare_queue(name, passive=True)
                await q.purge()
    finally:
        await conn.close()


def run_sync(fn: Any, *args: Any) -> Any:
    """For sync clients: run a blocking call in the default executor."""
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


def venv_bin(name: str) -> str:
    """Path of a console script in the running interpreter's virtualenv."""
    return os.path.join(os.path.dirname(PY), name)


def use_uvloop() -> str:
    """Install uvloop's policy for libraries whose worker CLI does not pick a loop itself."""
    try:
        import uvloop
    except ImportError:
        return "asyncio (uvloop not installed)"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop (policy set in the task module)"
