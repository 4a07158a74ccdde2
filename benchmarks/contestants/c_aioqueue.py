"""aioqueue (this repository), on Redis or AMQP, results in Redis.

Worker: ``aioqueue worker benchmarks_aq_tasks:app --concurrency 200 --processes 2 --threads 50
--loglevel warning`` (through aq_worker.py, which only installs uvloop first).
Batch API: ``Task.send_many`` (100 calls per round trip here). Many queues: ``noop.options(
queue=q).send()`` round robin, worker ``--queues q00,...,q19``.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from _common import (
    PY,
    TRANSPORT,
    Contestant,
    RoundRobin,
    Unsupported,
    delete_amqp_exchanges,
    delete_amqp_queues,
    payload,
    purge_amqp_queues,
)

CONCURRENCY = 200
BATCH = 100


class AioQueue(Contestant):
    name: ClassVar[str] = "aioqueue"
    dists: ClassVar[tuple[str, ...]] = (
        "aioqueue",
        "redis",
        "hiredis",
        "aio-pika",
        "orjson",
        "anyio",
        "uvloop",
    )
    batch_size: ClassVar[int | None] = BATCH

    def __init__(self, transport: str) -> None:
        super().__init__(transport)
        self.app: Any = None
        self.tasks: Any = None
        self.settings = {
            "worker": f"aioqueue worker benchmarks_aq_tasks:app --concurrency {CONCURRENCY} "
            "--processes 2 --threads 50 --loglevel warning",
            "client": f"task.send(); AsyncResult.get(timeout); task.send_many() x{BATCH}",
            "app": "key_prefix=aqbench, result_ttl=3600, backend redis db 14, defaults otherwise "
            "(json, acks_late=True)",
            "loop": "uvloop (policy installed by aq_worker.py; the CLI does not pick it)",
        }
        if os.environ.get("BENCH_VARIANT") == "noconfirm":
            self.settings["confirms"] = "amqp_publisher_confirms=False (at-most-once sends)"

    async def start(self) -> None:
        try:
            import benchmarks_aq_tasks as tasks
        except Exception as exc:
            raise Unsupported(f"aioqueue not importable: {exc}") from exc
        self.tasks = tasks
        self.app = tasks.app
        self.multi = RoundRobin(tasks.QUEUES)
        self.on_queue = {q: tasks.noop.options(queue=q) for q in tasks.QUEUES}
        try:
            await self.app.connect()
            await self.app.ready_broker()
        except Exception as exc:
            raise Unsupported(
                f"aioqueue cannot use {TRANSPORT}: {type(exc).__name__}: {exc}"
            ) from exc

    async def stop(self) -> None:
        await self.app.close()

    async def send(self, kind: str = "noop", ms: float = 0.0) -> Any:
        if kind == "noop":
            return await self.tasks.noop.send()
        if kind == "payload":
            return await self.tasks.payload.send(payload())
        if kind == "queues":
            return await self.on_queue[self.multi.next()].send()
        return await (self.tasks.cpu if kind == "cpu" else self.tasks.block).send(ms)

    async def send_batch(self, count: int) -> list[Any]:
        return list(await self.tasks.noop.send_many([() for _ in range(count)]))

    async def wait(self, handle: Any, timeout: float) -> None:
        await handle.get(timeout=timeout)

    def result_key(self, handle: Any) -> str | None:
        return f"aqbench:result:{handle.id}"

    def worker_argv(self, kind: str) -> tuple[list[str], dict[str, str]]:
        here = os.path.dirname(os.path.abspath(__file__))
        argv = [
            PY,
            os.path.join(here, "aq_worker.py"),
            "worker",
            "benchmarks_aq_tasks:app",
            "--concurrency",
            str(CONCURRENCY),
            "--processes",
            "2",
            "--threads",
            "50",
            "--loglevel",
            "warning",
        ]
        if kind == "queues":
            argv += ["--queues", ",".join(self.tasks.QUEUES)]
        return argv, {"BENCH_KIND": kind}

    def amqp_queues(self) -> list[str]:
        # aioqueue's AMQP names: <key_prefix>.<queue> and its dead-letter queue <...>.dead
        names = [f"aqbench.{q}" for q in (self.tasks.QUEUE, *self.tasks.QUEUES)]
        return [x for q in names for x in (q, f"{q}.dead")]

    async def purge(self) -> None:
        await super().purge()
        if self.transport == "amqp":
            await purge_amqp_queues(self.amqp_queues())

    async def cleanup(self) -> None:
        await super().cleanup()
        if self.transport == "amqp":
            await delete_amqp_queues(self.amqp_queues())
            await delete_amqp_exchanges(["aqbench.dead"])


def make(transport: str) -> Contestant:
    return AioQueue(transport)
