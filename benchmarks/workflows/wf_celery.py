"""Celery's side: the same three workflows (see run.py). Redis or RabbitMQ broker, Redis results.

Worker: ``celery -A wf_celery worker -P solo --without-gossip --without-mingle
--without-heartbeat`` with prefetch 64, the pool the main benchmark found fastest for no-op
tasks (see benchmarks/SETTINGS.md). The client is synchronous; the chord uses the Redis result
backend's native join (a counter per chord), Celery's fastest.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

from celery import Celery, chain, chord, group
from wf_common import (
    AMQP_URL,
    CHAIN_RUNS,
    CHAIN_STEPS,
    CHORD_SIZE,
    GROUP_SIZE,
    REDIS_URL,
    REPS,
    WorkerProcess,
    emit,
    summary,
)

QUEUE = os.environ.get("WF_CELERY_QUEUE", "wfbench")
BROKER = os.environ.get("WF_CELERY_BROKER", REDIS_URL)
PREFIX = f"{QUEUE}:"  # every Redis key of this run (results, chord counters, the Redis queue)

app = Celery("wf_celery", broker=BROKER, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=600,
    worker_prefetch_multiplier=64,
    worker_disable_rate_limits=True,
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_backend_transport_options={"global_keyprefix": PREFIX},
    broker_transport_options={"global_keyprefix": PREFIX},
)


@app.task(name="step")
def step(previous: Any = None) -> int:
    return 1


@app.task(name="noop")
def noop() -> None:
    return None


@app.task(name="count")
def count(values: list[Any]) -> int:
    return len(values)


def _wait_stored(ids: list[str]) -> None:
    """Until every result key exists, read 1,000 per MGET every 20 ms. Celery's own
    ``GroupResult.get()`` did not return for a group of 10,000 within 600 s here (its Redis
    backend's native join), so the time to all results is taken from the keys instead."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = [f"{PREFIX}celery-task-meta-{task_id}" for task_id in ids]
    deadline = time.monotonic() + 600
    try:
        while keys:
            chunk = keys[:1000]
            found = client.mget(chunk)
            missing = [key for key, value in zip(chunk, found, strict=True) if value is None]
            keys = missing + keys[1000:]
            if missing:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(keys)} results missing after 600 s")
                time.sleep(0.02)
    finally:
        client.close()


def measure() -> dict[str, Any]:
    chain_ms: list[float] = []
    groups: list[dict[str, float]] = []
    chords: list[float] = []
    for _ in range(3):
        chain(step.s(), step.s()).apply_async().get(timeout=30)
    for _ in range(CHAIN_RUNS):
        started = time.perf_counter()
        chain(step.s(), *[step.s() for _ in range(CHAIN_STEPS - 1)]).apply_async().get(timeout=60)
        chain_ms.append((time.perf_counter() - started) * 1000)
    for _ in range(REPS):
        members = [noop.si() for _ in range(GROUP_SIZE)]
        started = time.perf_counter()
        handle = group(members).apply_async()
        sent = time.perf_counter()
        _wait_stored([child.id for child in handle.results])
        done = time.perf_counter()
        groups.append({"enqueue": (sent - started) * 1000, "done": (done - started) * 1000})
    for _ in range(REPS):
        started = time.perf_counter()
        handle = chord(group(noop.si() for _ in range(CHORD_SIZE)), count.s()).apply_async()
        assert handle.get(timeout=600) == CHORD_SIZE
        chords.append((time.perf_counter() - started) * 1000)
    return summary(chain_ms, groups, chords)


def main() -> None:
    broker = sys.argv[1] if len(sys.argv) > 1 else "redis"
    queue = os.environ.get("WF_CELERY_QUEUE") or f"wfbench-{uuid.uuid4().hex[:8]}"
    if "WF_CELERY_QUEUE" not in os.environ:  # the settings above are read at import: again
        env = {
            "WF_CELERY_QUEUE": queue,
            "WF_CELERY_BROKER": AMQP_URL if broker == "amqp" else REDIS_URL,
        }
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    env = {"WF_CELERY_QUEUE": queue, "WF_CELERY_BROKER": BROKER}
    celery_bin = os.path.join(os.path.dirname(sys.executable), "celery")
    argv = [
        celery_bin,
        "-A",
        "wf_celery",
        "worker",
        "-P",
        "solo",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "INFO",
        "-Q",
        queue,
    ]
    worker = WorkerProcess(argv, env, "ready.")
    try:
        worker.wait_ready(60)
        result = measure()
        result["library"] = f"celery-{broker}"
        emit(result)
    finally:
        worker.stop()
        _cleanup(queue)


def _cleanup(queue: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{PREFIX}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()
    if BROKER.startswith("amqp"):
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


if __name__ == "__main__":
    main()
