"""Celery: Redis or RabbitMQ (py-amqp) broker, Redis result backend.

Worker: ``celery -A c_celery worker -P <pool> -c <n> --without-gossip --without-mingle
--without-heartbeat`` with remote control off. Pools: see POOLS (noop: the fastest measured
here, see SETTINGS.md; cpu: prefork -c 2; block: threads -c 50). The client is sync: called on
the loop for sequential sends, from threads (up to 64) for fan-in; AsyncResult.get() waits on
the Redis backend's pub/sub. No batch enqueue (group() publishes one message per task).
Many queues: ``apply_async(queue=q)`` round robin (queues created on first use, Celery's
default), worker ``-Q q00,...,q19``.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from _common import (
    AMQP_URL,
    REDIS_URL,
    RESULT_TTL,
    TRANSPORT,
    Contestant,
    RoundRobin,
    delete_amqp_exchanges,
    delete_amqp_queues,
    multi_queues,
    payload,
    payload_size,
    purge_amqp_queues,
    queue_name,
    run_sync,
    sleep_ms,
    spin_ms,
    venv_bin,
)
from celery import Celery

QUEUE = queue_name("celery") if TRANSPORT == "amqp" else "bench"
QUEUES = multi_queues(QUEUE)  # the many-queues row: apply_async(queue=...) round robin
NOOP_POOL = os.environ.get("BENCH_CELERY_POOL", "solo:1")
POOLS = {
    "noop": NOOP_POOL,
    "payload": NOOP_POOL,
    "queues": NOOP_POOL,
    "cpu": "prefork:2",
    "block": "threads:50",
}
PREFETCH = 64

app = Celery("c_celery", broker=AMQP_URL if TRANSPORT == "amqp" else REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=RESULT_TTL,
    worker_prefetch_multiplier=PREFETCH,
    worker_disable_rate_limits=True,
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop() -> None:
    return None


@app.task(name="payload")
def payload_task(data: str) -> int:
    return payload_size(data)


@app.task(name="cpu")
def cpu(ms: float) -> int:
    return spin_ms(ms)


@app.task(name="block")
def block(ms: float) -> None:
    sleep_ms(ms)


class CeleryContestant(Contestant):
    name: ClassVar[str] = "celery"
    dists: ClassVar[tuple[str, ...]] = ("celery", "kombu", "redis", "amqp")
    async_client: ClassVar[bool] = False
    keep_prefixes: ClassVar[tuple[str, ...]] = ("_kombu.binding.",)
    unsupported: ClassVar[dict[str, str]] = {
        "enqueue_batch": "no batch enqueue API (group() publishes one message per task)",
    }

    def __init__(self, transport: str) -> None:
        super().__init__(transport)
        self.multi = RoundRobin(QUEUES)
        self.settings = {
            "broker": "redis (kombu)" if transport == "redis" else "amqp (py-amqp)",
            "backend": f"redis, result_expires={RESULT_TTL}s",
            "worker": "celery worker --without-gossip --without-mingle --without-heartbeat, "
            f"worker_prefetch_multiplier={PREFETCH}, worker_disable_rate_limits, "
            "remote control off, acks early (default)",
            "pools": POOLS,
            "client": "task.delay() (sync, called on the loop); AsyncResult.get() in a thread",
            "serializer": "json",
        }

    async def send(self, kind: str = "noop", ms: float = 0.0) -> Any:
        if kind == "noop":
            return noop.delay()
        if kind == "payload":
            return payload_task.delay(payload())
        if kind == "queues":
            return noop.apply_async(queue=self.multi.next())
        return (cpu if kind == "cpu" else block).delay(ms)

    async def wait(self, handle: Any, timeout: float) -> None:
        await run_sync(lambda: handle.get(timeout=timeout))

    def result_key(self, handle: Any) -> str | None:
        return f"celery-task-meta-{handle.id}"

    def worker_argv(self, kind: str) -> tuple[list[str], dict[str, str]]:
        pool, conc = POOLS[kind].split(":")
        argv = [
            venv_bin("celery"),
            "-A",
            "c_celery",
            "worker",
            "-P",
            pool,
            "-c",
            conc,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
            "-Q",
            ",".join(QUEUES) if kind == "queues" else QUEUE,
        ]
        return argv, {"BENCH_KIND": kind}

    async def purge(self) -> None:
        await super().purge()
        if self.transport == "amqp":
            await purge_amqp_queues([QUEUE, *QUEUES])

    async def cleanup(self) -> None:
        await super().cleanup()
        if self.transport == "amqp":
            await delete_amqp_queues([QUEUE, *QUEUES])
            await delete_amqp_exchanges([QUEUE, *QUEUES])


def make(transport: str) -> Contestant:
    return CeleryContestant(transport)
