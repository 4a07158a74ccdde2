"""arq: Redis only. Worker: ``arq c_arq.WorkerSettings``.

Speed settings: max_jobs=200 (default 10); poll_delay=0.01 s on the worker and when awaiting a
result (default 0.5 s: arq polls the queue and the result key); uvloop policy set here (arq's
CLI uses the default loop). No batch enqueue API. Sync work uses arq's documented recipe:
``loop.run_in_executor`` on a ProcessPoolExecutor(2) / ThreadPoolExecutor(50) made at startup.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, ClassVar

from _common import (
    REDIS_URL,
    RESULT_TTL,
    Contestant,
    payload,
    payload_size,
    sleep_ms,
    spin_ms,
    use_uvloop,
    venv_bin,
)
from arq import create_pool
from arq.connections import RedisSettings
from arq.jobs import Job

LOOP = use_uvloop()
POLL = 0.01
MAX_JOBS = 200
REDIS = RedisSettings.from_dsn(REDIS_URL)


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def payload_task(ctx: dict[str, Any], data: str) -> int:
    return payload_size(data)


async def cpu(ctx: dict[str, Any], ms: float) -> int:
    return await asyncio.get_running_loop().run_in_executor(ctx["pool"], spin_ms, ms)


async def block(ctx: dict[str, Any], ms: float) -> None:
    await asyncio.get_running_loop().run_in_executor(ctx["pool"], sleep_ms, ms)


async def startup(ctx: dict[str, Any]) -> None:
    kind = os.environ.get("BENCH_KIND", "noop")
    pool: Executor | None = None
    if kind == "cpu":
        pool = ProcessPoolExecutor(2)
    elif kind == "block":
        pool = ThreadPoolExecutor(50)
    ctx["pool"] = pool


async def shutdown(ctx: dict[str, Any]) -> None:
    if ctx.get("pool") is not None:
        ctx["pool"].shutdown(wait=False, cancel_futures=True)


class WorkerSettings:
    functions: ClassVar[list[Any]] = [noop, payload_task, cpu, block]
    redis_settings = REDIS
    max_jobs = MAX_JOBS
    poll_delay = POLL
    keep_result = RESULT_TTL
    on_startup = startup
    on_shutdown = shutdown


class Arq(Contestant):
    name: ClassVar[str] = "arq"
    dists: ClassVar[tuple[str, ...]] = ("arq", "redis", "hiredis", "uvloop")
    unsupported: ClassVar[dict[str, str]] = {
        "enqueue_batch": "no batch enqueue API",
        "queues": "a worker consumes one queue (WorkerSettings.queue_name)",
    }

    def __init__(self, transport: str) -> None:
        super().__init__(transport)
        self.pool: Any = None
        self.settings = {
            "worker": f"arq c_arq.WorkerSettings; max_jobs={MAX_JOBS}, poll_delay={POLL}s "
            "(default 0.5s), keep_result=3600s, queue_read_limit default (max_jobs*5)",
            "client": f"create_pool(); enqueue_job(); Job.result(poll_delay={POLL}) polls GET",
            "loop": LOOP,
            "sync": "run_in_executor: ProcessPoolExecutor(2) for cpu, ThreadPoolExecutor(50) "
            "for block (arq docs' recipe; arq has no executor option)",
            "serializer": "pickle (default)",
        }

    async def start(self) -> None:
        self.pool = await create_pool(REDIS)

    async def stop(self) -> None:
        await self.pool.aclose()

    async def send(self, kind: str = "noop", ms: float = 0.0) -> Any:
        if kind == "noop":
            return await self.pool.enqueue_job("noop")
        if kind == "payload":
            return await self.pool.enqueue_job("payload_task", payload())
        return await self.pool.enqueue_job(kind, ms)

    async def wait(self, handle: Job, timeout: float) -> None:
        await handle.result(timeout=timeout, poll_delay=POLL)

    def result_key(self, handle: Job) -> str | None:
        return f"arq:result:{handle.job_id}"

    def worker_argv(self, kind: str) -> tuple[list[str], dict[str, str]]:
        return [venv_bin("arq"), "c_arq.WorkerSettings"], {"BENCH_KIND": kind}


def make(transport: str) -> Contestant:
    return Arq(transport)
