"""Fault-injection harness: private servers to break, workers to kill, a checker to count.

Nothing here touches the shared servers. Each test gets:

* :class:`PrivateRedis`: a ``redis-server`` of its own on a free loopback port with AOF on
  (``appendfsync always``) in the test's temp dir; SIGKILLed and started again on the same port
  and dir, its clients' connections killed by client name (``CLIENT LIST`` + ``CLIENT KILL ID``).
* :class:`PrivateVhost`: a RabbitMQ vhost of its own (``rabbitmqctl add_vhost``), deleted after;
  connections are closed with ``rabbitmqctl close_connection`` only when they belong to it.
* Workers: ``aioqueue worker fault_app:app`` subprocesses (:mod:`workers`) on those servers, with
  a 0.2 s heartbeat and a 1 s lease; :class:`Sender` streams single sends in the test process,
  keeping only the ids whose ``send()`` returned (a send that raised has an unknown outcome).
* :class:`RunLog` and :func:`tally`: what the workers ran (the run log :mod:`fault_app` writes)
  against what was sent and what results exist, as ``sent / completed / ran / duplicated / lost``
  plus ``stores`` (final-result writes, counted on the backend's ``done`` channels by
  :class:`StoreCounter`). :func:`report` prints the one-line summary and keeps the latest line
  per scenario in ``/tmp/aioqueue-fault-summary.txt``.

Every process a test starts is ended by that test, by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from conftest import AMQP_URL, IN_CI
from fault_app import RUN_LOG_ENV, FaultTasks
from workers import worker_env

from aioqueue import AioQueueError

SUMMARY_PATH = Path("/tmp/aioqueue-fault-summary.txt")
APP = "fault_app:app"
WORKER_NAME = "aioqueue:fault-app"  # client names of the workers' connections: <this>:<role>
SENDER_NAME = "aioqueue:fault-sender"
ONE_PROCESS = ("--processes", "1")
LEASE = {"worker_heartbeat_interval": "0.2", "worker_heartbeat_ttl": "1.0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def poll(
    predicate: Callable[[], Awaitable[bool]],
    what: str,
    timeout: float = 15.0,
    interval: float = 0.05,
) -> None:
    """Poll an async condition until it holds; AssertionError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(interval)


# -- Redis ---------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server only this test uses; started, SIGKILLed and restarted by its pid."""

    def __init__(self, workdir: Path, *, aof: bool = True) -> None:
        if shutil.which("redis-server") is None:
            if IN_CI:
                pytest.fail("redis-server is needed for the fault-injection tests")
            pytest.skip("redis-server not installed")
        self.port = free_port()
        self.workdir = workdir
        self.aof = aof
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else []
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + (aof or ["--appendonly", "no"])
            + ["--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_up(self, timeout: float = 10.0) -> None:
        """Until it answers PING (after a restart, once it has loaded its AOF)."""

        async def answers() -> bool:
            client = self.client()
            try:
                return bool(await client.ping())
            except Exception:
                return False
            finally:
                await client.aclose()

        await poll(answers, f"private redis on port {self.port} up", timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it; the AOF stays in the dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            self.kills += 1

    async def restart(self) -> None:
        self.kill()
        self.start()
        await self.wait_up()

    def client(self) -> Any:
        return aioredis.Redis.from_url(self.url, socket_timeout=5.0)

    async def clients(self) -> list[dict[str, str]]:
        """CLIENT LIST, one dict per connection."""
        client = self.client()
        try:
            raw = await client.execute_command("CLIENT", "LIST")
        finally:
            await client.aclose()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        out = []
        for line in text.splitlines():
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            out.append(fields)
        return out

    async def client_kill(self, name_part: str) -> int:
        """Kill every connection whose client name contains ``name_part``; returns how many."""
        victims = [c["id"] for c in await self.clients() if name_part in c.get("name", "")]
        client = self.client()
        try:
            for client_id in victims:
                with contextlib.suppress(Exception):  # it may have gone by itself meanwhile
                    await client.execute_command("CLIENT", "KILL", "ID", client_id)
        finally:
            await client.aclose()
        return len(victims)


# -- RabbitMQ ------------------------------------------------------------------------------


async def rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:  # as in test_amqp.py: a broker in a container
        pytest.skip("rabbitmqctl is not available")
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


class PrivateVhost:
    """A RabbitMQ vhost only this test uses (guest gets full rights on it); deleted after."""

    def __init__(self, name: str) -> None:
        self.name = name
        base = AMQP_URL.rstrip("/")
        self.url = f"{base}/{name}"

    async def create(self) -> None:
        await rabbitmqctl("add_vhost", self.name)
        await rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")

    async def delete(self) -> None:
        with contextlib.suppress(AssertionError):
            await rabbitmqctl("delete_vhost", self.name)

    async def close_connections(self, *name_parts: str) -> dict[str, int]:
        """Close (server side) this vhost's connections whose client properties contain one of
        ``name_parts`` (connection names are ``aioqueue:<app>/<role>@<host>:<pid>``), all at
        once; returns how many were closed per name part."""
        listing = await rabbitmqctl(
            "list_connections", "--no-table-headers", "pid", "vhost", "client_properties"
        )
        victims: dict[str, str] = {}
        for line in listing.splitlines():
            parts = line.split("\t", 2)
            if len(parts) != 3 or parts[1] != self.name:
                continue
            for name_part in name_parts:
                if name_part in parts[2]:
                    victims[parts[0]] = name_part
        await asyncio.gather(
            *(
                rabbitmqctl("close_connection", pid, "closed by aioqueue fault test")
                for pid in victims
            )
        )
        return Counter(victims.values())


# -- workers -------------------------------------------------------------------------------


def fault_env(
    broker_url: str, backend_url: str, key_prefix: str, run_log: Path, **settings: str
) -> dict[str, str]:
    """A fault worker's environment: private servers, short lease, the run log's path."""
    env = worker_env(broker_url, key_prefix, **{**LEASE, **settings})
    env["AIOQUEUE_RESULT_BACKEND"] = backend_url
    env[RUN_LOG_ENV] = str(run_log)
    return env


# -- sending -------------------------------------------------------------------------------


def new_ids(n: int, tag: str = "t") -> list[str]:
    return [f"{tag}{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]


class Sender:
    """Sends ``work`` one message at a time until stopped; keeps the ids whose send returned."""

    def __init__(self, tasks: FaultTasks, seconds: float = 0.01) -> None:
        self.tasks = tasks
        self.seconds = seconds
        self.sent: list[str] = []
        self.failed = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            tid = f"s{len(self.sent)}-{uuid.uuid4().hex[:8]}"
            try:
                await self.tasks.work.options(task_id=tid).send(tid, self.seconds)
            except AioQueueError:
                self.failed += 1  # outcome unknown: not counted as sent
                await asyncio.sleep(0.01)
                continue
            self.sent.append(tid)
            await asyncio.sleep(0.002)

    async def sent_more(self, n: int, timeout: float = 15.0) -> None:
        """Wait until ``n`` more sends have returned."""
        target = len(self.sent) + n

        async def enough() -> bool:
            if self._task is not None and self._task.done():
                self._task.result()  # a send raised something that is not ours: show it
            return len(self.sent) >= target

        await poll(enough, f"{n} more sends", timeout)

    async def stop(self) -> list[str]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.sent


# -- the checker ---------------------------------------------------------------------------


class RunLog:
    """Reads the run log the fault tasks append to (see :mod:`fault_app`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def events(self) -> list[tuple[str, str, int]]:
        out = []
        for line in self.path.read_text().splitlines():
            event, task_id, pid = line.split()
            out.append((event, task_id, int(pid)))
        return out

    def starts(self) -> Counter[str]:
        return Counter(task_id for event, task_id, _ in self.events() if event == "start")

    def pids_of(self, task_id: str, event: str = "start") -> list[int]:
        return [pid for ev, tid, pid in self.events() if tid == task_id and ev == event]


class StoreCounter:
    """Counts final-result writes per task id: every store publishes ``<prefix>:done:<id>``.

    Listens with PSUBSCRIBE on the backend's server from :meth:`start` to :meth:`stop`.
    """

    def __init__(self, url: str, key_prefix: str) -> None:
        self.url = url
        self.prefix = f"{key_prefix}:done:"
        self.counts: Counter[str] = Counter()
        self._client: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._client = aioredis.Redis.from_url(self.url)
        self._pubsub = self._client.pubsub()
        await self._pubsub.psubscribe(f"{self.prefix}*")
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self._pubsub.listen():
            if message["type"] == "pmessage":
                self.counts[message["channel"].decode()[len(self.prefix) :]] += 1

    async def sync(self, timeout: float = 5.0) -> None:
        """Return once every store published before this call has been counted.

        Redis delivers one connection's messages in order: publish a marker, wait for it.
        """
        marker = f"marker-{uuid.uuid4().hex}"
        client = aioredis.Redis.from_url(self.url)
        try:
            await client.publish(f"{self.prefix}{marker}", b"")
        finally:
            await client.aclose()

        async def seen() -> bool:
            return self.counts[marker] > 0

        await poll(seen, "store counter caught up", timeout, 0.01)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait({self._reader})
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._client is not None:
            await self._client.aclose()


async def read_results(url: str, key_prefix: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The stored final outcomes (decoded JSON records) of ``ids``, read straight from Redis."""
    ids = list(ids)
    client = aioredis.Redis.from_url(url, socket_timeout=10.0)
    out: dict[str, dict[str, Any]] = {}
    try:
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            values = await client.mget([f"{key_prefix}:result:{tid}" for tid in chunk])
            for tid, raw in zip(chunk, values, strict=True):
                if raw is not None:
                    out[tid] = orjson.loads(raw)
    finally:
        await client.aclose()
    return out


async def locate(url: str, key_prefix: str, ids: Iterable[str]) -> dict[str, str]:
    """Where each id's message sits now (queue, a processing list, dead letters), by key.

    For failure messages: a lost task found in a live worker's processing list was stranded
    there; one found nowhere was dropped.
    """
    wanted = {tid.encode(): tid for tid in ids}
    found = dict.fromkeys(wanted.values(), "nowhere")
    client = aioredis.Redis.from_url(url, socket_timeout=10.0)
    try:
        async for key in client.scan_iter(match=f"{key_prefix}:{{*}}*", count=1000):
            if await client.type(key) != b"list":
                continue
            for body in await client.lrange(key, 0, -1):
                for raw, tid in wanted.items():
                    if raw in body:
                        found[tid] = key.decode()
    finally:
        await client.aclose()
    return found


@dataclass
class Tally:
    """What happened to the tasks of one scenario."""

    sent: int
    completed: int
    ran: int
    duplicated: int
    lost: int
    stores: int | None = None  # final-result writes, when a StoreCounter listened
    multi_stored: int | None = None  # ids whose final result was written more than once
    lost_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = (
            f"sent={self.sent} completed={self.completed} ran={self.ran} "
            f"duplicated={self.duplicated} lost={self.lost}"
        )
        if self.stores is not None:
            text += f" stores={self.stores} multi_stored={self.multi_stored}"
        return text


async def wait_results(
    url: str, prefix: str, ids: list[str], timeout: float = 30.0, stall: float = 4.0
) -> dict[str, dict[str, Any]]:
    """Poll until every id has a final result; give up at ``timeout``, or once no new result
    came for ``stall`` seconds (so a run that strands tasks fails in seconds, not minutes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    progress = loop.time()
    pending = list(ids)
    found: dict[str, dict[str, Any]] = {}
    while pending and loop.time() < min(deadline, progress + stall):
        new = await read_results(url, prefix, pending)
        if new:
            found.update(new)
            progress = loop.time()
            pending = [tid for tid in pending if tid not in found]
        if pending:
            await asyncio.sleep(0.1)
    return found


def tally(
    sent: Iterable[str],
    results: dict[str, dict[str, Any]],
    runs: Counter[str],
    stores: Counter[str] | None = None,
) -> Tally:
    """Compare what was sent (ids whose ``send()`` returned) with what ran and what is stored."""
    sent_ids = list(dict.fromkeys(sent))
    completed = [tid for tid in sent_ids if tid in results]
    lost = [tid for tid in sent_ids if tid not in results]
    duplicated = [tid for tid in sent_ids if runs[tid] > 1]
    out = Tally(
        sent=len(sent_ids),
        completed=len(completed),
        ran=sum(1 for tid in sent_ids if runs[tid]),
        duplicated=len(duplicated),
        lost=len(lost),
        lost_ids=lost[:20],
        duplicated_ids=duplicated[:20],
    )
    if stores is not None:
        out.stores = sum(stores[tid] for tid in sent_ids)
        out.multi_stored = sum(1 for tid in sent_ids if stores[tid] > 1)
    return out


def report(scenario: str, title: str, counts: Tally, note: str = "") -> None:
    """Print the scenario's one-line summary and keep it in the summary file, one line per
    scenario id (``"01"``, ``"07-amqp"``...), replaced by the latest run of that scenario."""
    line = f"{scenario} {title}: {counts.line()}" + (f" ({note})" if note else "")
    print(f"\n[fault] {line}")
    lines: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for old in SUMMARY_PATH.read_text().splitlines():
            lines[old.split(" ", 1)[0]] = old
    lines[scenario] = line
    with contextlib.suppress(OSError):
        SUMMARY_PATH.write_text("".join(f"{v}\n" for _, v in sorted(lines.items())))


__all__ = [
    "APP",
    "LEASE",
    "ONE_PROCESS",
    "SENDER_NAME",
    "WORKER_NAME",
    "PrivateRedis",
    "PrivateVhost",
    "RunLog",
    "Sender",
    "StoreCounter",
    "Tally",
    "fault_env",
    "free_port",
    "locate",
    "new_ids",
    "poll",
    "rabbitmqctl",
    "read_results",
    "report",
    "tally",
    "wait_results",
]
