"""Fault injection on the AMQP transport: connections closed by RabbitMQ mid-stream.

Each test has a RabbitMQ vhost of its own (``rabbitmqctl add_vhost``, deleted after) and a
private ``redis-server`` for results, so closing connections touches nobody else: only the
connections of that vhost are listed and closed. Workers are ``aioqueue worker fault_app:app``
subprocesses; the checker is the one of the Redis fault tests (:mod:`faultlib`).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import AMQP_URL, require_server
from fault_app import register
from faultlib import (
    APP,
    ONE_PROCESS,
    SENDER_NAME,
    WORKER_NAME,
    PrivateRedis,
    PrivateVhost,
    RunLog,
    Sender,
    fault_env,
    report,
    tally,
    wait_results,
)
from workers import WorkerSet

from aioqueue import App

pytestmark = [pytest.mark.slow]


@pytest.fixture
async def vhost() -> AsyncIterator[PrivateVhost]:
    require_server(AMQP_URL, "RabbitMQ")
    host = PrivateVhost(f"aqtest-{uuid.uuid4().hex[:10]}")
    await host.create()
    try:
        yield host
    finally:
        await host.delete()  # its queues and any connection left in it go with it


@pytest.fixture
async def results_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "results-redis", aof=False)
    server.start()
    try:
        await server.wait_up()
        yield server
    finally:
        server.kill()


@pytest.mark.timeout(60)
async def test_amqp_connections_closed_mid_stream_lose_nothing(
    vhost: PrivateVhost, results_redis: PrivateRedis, key_prefix: str, tmp_path: Path
) -> None:
    """RabbitMQ closes the workers' connections and the sender's, twice, while tasks flow:
    every task whose send() returned completes."""
    run_log = RunLog(tmp_path / "runs.log")
    env = fault_env(
        vhost.url, results_redis.url, key_prefix, run_log.path, amqp_reconnect_interval="0.2"
    )
    group = WorkerSet(env, tmp_path)
    app = App(
        "fault-sender",
        broker=vhost.url,
        backend=results_redis.url,
        key_prefix=key_prefix,
        broker_connect_timeout=2.0,
        amqp_reconnect_interval=0.2,
    )
    stream = Sender(register(app))
    closed: Counter[str] = Counter()
    worker, sender = f'"{WORKER_NAME}/', f'"{SENDER_NAME}/'  # as in client_properties
    try:
        for name in ("a", "b"):
            await group.start("-c", "20", *ONE_PROCESS, app_path=APP, name=name)
        stream.start()
        await stream.sent_more(100)
        for _ in range(2):
            closed.update(await vhost.close_connections(worker, sender))
            await stream.sent_more(50)
        sent = await stream.stop()
        results = await wait_results(results_redis.url, key_prefix, sent, timeout=20)
        died = [w.output() for w in group.workers if w.returncode is not None]
    finally:
        await stream.stop()
        await app.close()
        await group.close()
    counts = tally(sent, results, run_log.starts())
    report(
        "07-amqp",
        "connections-closed (workers' and sender's, 2 rounds, amqp)",
        counts,
        f"connections closed: worker={closed[worker]} sender={closed[sender]}; "
        f"sends refused={stream.failed}",
    )
    assert closed[worker] >= 4 and closed[sender] >= 2
    assert counts.lost == 0, counts.lost_ids
    # unacked deliveries of a closed connection come again: at most each worker's slots a round
    assert counts.duplicated <= 2 * 20 * 2, counts.duplicated_ids
    assert not died, "a worker died:\n" + "\n".join(died)
