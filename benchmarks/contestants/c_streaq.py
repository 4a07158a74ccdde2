"""streaq: Redis streams (coredis). Worker: ``streaq run c_streaq:worker``.

Speed settings: concurrency=200 (default 16; prefetch defaults to concurrency); uvloop through
anyio's backend option. Batch API: Worker.enqueue_many (one pipeline). Results are pushed over
pub/sub (Task.result). No process executor: sync tasks run in threads (sync_concurrency=50).
"""

from __future__ import annotations

from typing import Any, ClassVar

from _common import REDIS_URL, Contestant, payload, payload_size, sleep_ms, venv_bin
from streaq import Worker

CONCURRENCY = 200
worker = Worker(
    redis_url=REDIS_URL,
    concurrency=CONCURRENCY,
    sync_concurrency=50,
    queue_name="bench",
    anyio_kwargs={"use_uvloop": True},
)


@worker.task()
async def noop() -> None:
    return None


@worker.task()
async def payload_task(data: str) -> int:
    return payload_size(data)


@worker.task()
def block(ms: float) -> None:
    sleep_ms(ms)


class Streaq(Contestant):
    name: ClassVar[str] = "streaq"
    dists: ClassVar[tuple[str, ...]] = ("streaq", "coredis", "anyio", "uvloop")
    batch_size: ClassVar[int | None] = 100
    unsupported: ClassVar[dict[str, str]] = {
        "cpu": "no process executor (sync tasks run in threads)",
        "queues": "a worker consumes one queue (Worker(queue_name=...))",
    }

    def __init__(self, transport: str) -> None:
        super().__init__(transport)
        self.stack: Any = None
        self.settings = {
            "worker": f"streaq run c_streaq:worker; concurrency={CONCURRENCY}, prefetch default "
            "(= concurrency), sync_concurrency=50",
            "client": "task.enqueue() awaited; Worker.enqueue_many() for batches; Task.result() "
            "(pub/sub per waiter)",
            "loop": "uvloop (anyio_kwargs use_uvloop)",
            "serializer": "pickle (default)",
        }

    async def start(self) -> None:
        self.stack = worker.__asynccontextmanager__()
        await self.stack.__aenter__()

    async def stop(self) -> None:
        await self.stack.__aexit__(None, None, None)

    async def send(self, kind: str = "noop", ms: float = 0.0) -> Any:
        if kind == "noop":
            return await noop.enqueue()
        if kind == "payload":
            return await payload_task.enqueue(payload())
        return await block.enqueue(ms)

    async def send_batch(self, count: int) -> list[Any]:
        tasks = [noop.enqueue() for _ in range(count)]
        await worker.enqueue_many(tasks)
        return tasks

    async def wait(self, handle: Any, timeout: float) -> None:
        await handle.result(timeout=timeout)

    def result_key(self, handle: Any) -> str | None:
        return f"{worker.results_key}{handle.id}"

    def worker_argv(self, kind: str) -> tuple[list[str], dict[str, str]]:
        return [venv_bin("streaq"), "run", "c_streaq:worker"], {"BENCH_KIND": kind}


def make(transport: str) -> Contestant:
    return Streaq(transport)
