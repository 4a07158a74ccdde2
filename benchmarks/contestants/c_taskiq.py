"""taskiq: RedisStreamBroker or AioPikaBroker, results in RedisAsyncResultBackend.

Worker: ``taskiq worker c_taskiq:broker --workers 1 --max-async-tasks 200 --no-parse``
(taskiq's CLI runs uvloop itself when installed). Sync work: ``--use-process-pool
--max-process-pool-processes 2`` for cpu, ``--max-threadpool-threads 50`` for block.
Awaiting a result polls ``is_ready`` every check_interval (default 0.2 s; 0.01 s here).
"""

from __future__ import annotations

from typing import Any, ClassVar

from _common import (
    AMQP_URL,
    REDIS_URL,
    RESULT_TTL,
    TRANSPORT,
    Contestant,
    delete_amqp_exchanges,
    delete_amqp_queues,
    payload,
    payload_size,
    purge_amqp_queues,
    queue_name,
    sleep_ms,
    spin_ms,
    venv_bin,
)
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

CHECK = 0.01
CONCURRENCY = 200
QOS = 200
backend: Any = RedisAsyncResultBackend(REDIS_URL, result_ex_time=RESULT_TTL)
AMQP_QUEUES = [queue_name(x) for x in ("taskiq", "taskiq-dlq", "taskiq-delay")]

if TRANSPORT == "amqp":
    from taskiq_aio_pika import AioPikaBroker
    from taskiq_aio_pika.exchange import Exchange
    from taskiq_aio_pika.queue import Queue as TQueue

    broker: Any = AioPikaBroker(
        url=AMQP_URL,
        qos=QOS,
        exchange=Exchange(name=queue_name("taskiq-x")),
        task_queues=[TQueue(name=AMQP_QUEUES[0])],
        dead_letter_queue=TQueue(name=AMQP_QUEUES[1]),
        delay_queue=TQueue(name=AMQP_QUEUES[2]),
    ).with_result_backend(backend)
else:
    broker = RedisStreamBroker(url=REDIS_URL, queue_name="taskiq").with_result_backend(backend)


@broker.task
async def noop() -> None:
    return None


@broker.task
async def payload_task(data: str) -> int:
    return payload_size(data)


@broker.task
def cpu(ms: float) -> int:
    return spin_ms(ms)


@broker.task
def block(ms: float) -> None:
    sleep_ms(ms)


class Taskiq(Contestant):
    name: ClassVar[str] = "taskiq"
    dists: ClassVar[tuple[str, ...]] = (
        "taskiq",
        "taskiq-redis",
        "taskiq-aio-pika",
        "redis",
        "aio-pika",
        "uvloop",
    )
    unsupported: ClassVar[dict[str, str]] = {
        "enqueue_batch": "no batch enqueue API",
        "queues": "AioPikaBroker routes to several queues by label, but declares them only in "
        "the worker, so a prefill before it starts is unroutable (not wired here)"
        if TRANSPORT == "amqp"
        else "RedisStreamBroker reads one stream (queue_name)",
    }

    def __init__(self, transport: str) -> None:
        super().__init__(transport)
        self.settings = {
            "broker": "RedisStreamBroker(xread_count=100 default)"
            if transport == "redis"
            else f"AioPikaBroker(qos={QOS}; default quorum queue, topic exchange)",
            "backend": f"RedisAsyncResultBackend(result_ex_time={RESULT_TTL})",
            "worker": f"taskiq worker --workers 1 --max-async-tasks {CONCURRENCY} --no-parse "
            "--log-level WARNING (ack-type when_saved, default)",
            "client": f"task.kiq(); wait_result(check_interval={CHECK}) polls (default 0.2s)",
            "loop": "uvloop (taskiq CLI picks it when installed)",
            "sync": "cpu: --use-process-pool --max-process-pool-processes 2; "
            "block: --max-threadpool-threads 50",
            "serializer": "json broker messages (default), pickle results (default)",
        }

    async def start(self) -> None:
        await broker.startup()

    async def stop(self) -> None:
        await broker.shutdown()

    async def send(self, kind: str = "noop", ms: float = 0.0) -> Any:
        if kind == "noop":
            return await noop.kiq()
        if kind == "payload":
            return await payload_task.kiq(payload())
        return await (cpu if kind == "cpu" else block).kiq(ms)

    async def wait(self, handle: Any, timeout: float) -> None:
        await handle.wait_result(check_interval=CHECK, timeout=timeout)

    def result_key(self, handle: Any) -> str | None:
        return str(handle.task_id)

    def worker_argv(self, kind: str) -> tuple[list[str], dict[str, str]]:
        argv = [
            venv_bin("taskiq"),
            "worker",
            "c_taskiq:broker",
            "--workers",
            "1",
            "--max-async-tasks",
            str(CONCURRENCY),
            "--no-parse",
            "--log-level",
            "WARNING",
        ]
        if kind == "cpu":
            argv += ["--use-process-pool", "--max-process-pool-processes", "2"]
        elif kind == "block":
            argv += ["--max-threadpool-threads", "50"]
        return argv, {"BENCH_KIND": kind}

    async def after_flush(self) -> None:
        if self.transport == "redis":
            await broker._declare_consumer_group()

    async def purge(self) -> None:
        await super().purge()
        if self.transport == "amqp":
            await purge_amqp_queues(AMQP_QUEUES)

    async def cleanup(self) -> None:
        await super().cleanup()
        if self.transport == "amqp":
            await delete_amqp_queues(AMQP_QUEUES)
            await delete_amqp_exchanges([queue_name("taskiq-x")])


def make(transport: str) -> Contestant:
    assert transport == TRANSPORT, (transport, TRANSPORT)
    return Taskiq(transport)
