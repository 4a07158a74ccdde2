"""dramatiq: RedisBroker or RabbitmqBroker, Results middleware with the Redis backend.

Worker: ``dramatiq c_dramatiq --processes 1 --threads 8`` (defaults: threads 8, prefetch
threads*2). Actors are plain functions (dramatiq's model: worker threads); the client is sync,
so the driver calls it directly for sequential sends and from threads (up to 64) for fan-in.
Results: RedisBackend.get_result(block=True) blocks on BRPOPLPUSH (no polling). No batch
enqueue (group() sends one message at a time).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import dramatiq
from _common import (
    AMQP_URL,
    REDIS_URL,
    RESULT_TTL,
    TRANSPORT,
    Contestant,
    RoundRobin,
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
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

backend = RedisBackend(url=REDIS_URL)
if TRANSPORT == "amqp":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker: Any = RabbitmqBroker(url=AMQP_URL)
    QUEUE = queue_name("dramatiq")
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=REDIS_URL)
    QUEUE = "bench"
broker.add_middleware(Results(backend=backend, result_ttl=RESULT_TTL * 1000))
dramatiq.set_broker(broker)
THREADS = int(os.environ.get("BENCH_DRAMATIQ_THREADS", "8"))
QUEUES = multi_queues(QUEUE)  # the many-queues row: noop messages re-addressed round robin
if os.environ.get("BENCH_KIND") == "queues":
    # the worker consumes every queue the broker has declared (--queues picks among them);
    # declared here only for that worker, so the plain rows' worker has no extra consumers
    for _q in QUEUES:
        broker.declare_queue(_q)


@dramatiq.actor(store_results=True, queue_name=QUEUE, max_retries=0)
def noop() -> None:
    return None


@dramatiq.actor(store_results=True, queue_name=QUEUE, max_retries=0)
def payload_task(data: str) -> int:
    return payload_size(data)


@dramatiq.actor(store_results=True, queue_name=QUEUE, max_retries=0)
def cpu(ms: float) -> int:
    return spin_ms(ms)


@dramatiq.actor(store_results=True, queue_name=QUEUE, max_retries=0)
def block(ms: float) -> None:
    sleep_ms(ms)


SUFFIXES = ("", ".DQ", ".XQ")  # a RabbitMQ queue, its delay and its dead-letter queue


class Dramatiq(Contestant):
    name: ClassVar[str] = "dramatiq"
    dists: ClassVar[tuple[str, ...]] = ("dramatiq", "redis", "pika")
    async_client: ClassVar[bool] = False
    unsupported: ClassVar[dict[str, str]] = {
        "enqueue_batch": "no batch enqueue API (group() sends messages one at a time)",
    }

    def __init__(self, transport: str) -> None:
        super().__init__(transport)
        self.multi = RoundRobin(QUEUES)
        self.settings = {
            "broker": "RedisBroker"
            if transport == "redis"
            else "RabbitmqBroker (confirm_delivery=False, default)",
            "backend": f"Results(RedisBackend, result_ttl={RESULT_TTL}s)",
            "worker": f"dramatiq c_dramatiq --processes 1 --threads {THREADS} (prefetch "
            "threads*2, default)",
            "client": "actor.send() (sync, called on the loop); "
            "message.get_result(block=True) in a thread (BRPOPLPUSH)",
            "sync": "cpu: --processes 2 --threads 1; block: --processes 1 --threads 50",
            "actors": "plain functions, max_retries=0, store_results=True",
            "serializer": "json (default)",
        }

    async def send(self, kind: str = "noop", ms: float = 0.0) -> Any:
        if kind == "noop":
            return noop.send()
        if kind == "payload":
            return payload_task.send(payload())
        if kind == "queues":
            # Actor.send is message() + broker.enqueue(); this sends the same message to q
            return broker.enqueue(noop.message().copy(queue_name=self.multi.next()))
        return (cpu if kind == "cpu" else block).send(ms)

    async def wait(self, handle: Any, timeout: float) -> None:
        # RedisBackend rounds the timeout down to whole seconds (0 = do not block at all)
        ms = max(1000, int(timeout * 1000))
        await run_sync(lambda: handle.get_result(block=True, timeout=ms))

    def result_key(self, handle: Any) -> str | None:
        return str(backend.build_message_key(handle))

    def worker_argv(self, kind: str) -> tuple[list[str], dict[str, str]]:
        procs, threads = {"cpu": (2, 1), "block": (1, 50)}.get(kind, (1, THREADS))
        argv = [
            venv_bin("dramatiq"),
            "c_dramatiq",
            "--processes",
            str(procs),
            "--threads",
            str(threads),
        ]
        if kind == "queues":
            argv += ["--queues", *QUEUES]
        return argv, {"BENCH_KIND": kind}

    async def purge(self) -> None:
        await super().purge()
        if self.transport == "amqp":
            await purge_amqp_queues([f"{q}{x}" for q in (QUEUE, *QUEUES) for x in SUFFIXES])

    async def cleanup(self) -> None:
        await super().cleanup()
        if self.transport == "amqp":
            await delete_amqp_queues([f"{q}{x}" for q in (QUEUE, *QUEUES) for x in SUFFIXES])

    async def stop(self) -> None:
        broker.close()


def make(transport: str) -> Contestant:
    return Dramatiq(transport)
