"""Redis Cluster: URLs, key placement, and a master killed while tasks flow (lost = 0).

The contract suite runs on the cluster too (the ``redis-cluster`` transport in conftest.py);
these tests cover what only a cluster has. The cluster is private (``redis_cluster`` fixture:
3 masters with 2 replicas each) and its nodes are killed by their own pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
from conftest import CLUSTER_URL, delete_prefixed_cluster, running_worker
from redis.crc import key_slot
from redis_cluster import FAST_FAILOVER_MS, RedisClusterServers

from aioqueue import App
from aioqueue._redis_cluster import parse_cluster_url
from aioqueue.brokers.redis import _Keys
from aioqueue.errors import ConfigurationError

pytestmark = pytest.mark.timeout(120)


def test_cluster_url_names_seed_nodes_credentials_and_durability() -> None:
    parsed = parse_cluster_url(
        "redis+cluster://user:s%40cret@10.0.0.1:7000,10.0.0.2:7001,host3"
        "?wait_replicas=1&wait_timeout_ms=250"
    )
    assert parsed.nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("host3", 6379)]
    assert (parsed.username, parsed.password) == ("user", "s@cret")
    assert (parsed.wait_replicas, parsed.wait_timeout_ms) == (1, 250)
    assert "s@cret" not in repr(parsed)
    assert parse_cluster_url("redis+cluster://h:1/0").wait_replicas == 0


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://h:1/3",  # a cluster has db 0 only
        "redis+cluster://h:1?wait_replica=1",  # a misspelt option is refused, not ignored
        "redis+cluster://h:1?wait_replicas=x",
        "redis+cluster://h:1?wait_timeout_ms=0",
        "redis+cluster://h:port",
    ],
)
def test_bad_cluster_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_cluster_url(url)


def test_a_queues_keys_share_one_slot() -> None:
    keys = _Keys("pfx", "emails")
    names = [
        keys.queue,
        *keys.levels,
        keys.marker,
        keys.workers,
        keys.dead,
        keys.delayed,
        keys.alive("w1"),
        keys.processing("w1"),
    ]
    assert len({key_slot(name.encode()) for name in names}) == 1


async def test_queues_spread_over_the_masters(redis_cluster: RedisClusterServers) -> None:
    masters = {redis_cluster.master_of(f"p:{{q{n}}}").port for n in range(12)}
    assert len(masters) == 3


async def _wait_healthy(
    servers: RedisClusterServers, timeout: float = 30.0, *, replicated: bool = False
) -> None:
    deadline = time.monotonic() + timeout

    def ready() -> bool:
        return servers.healthy() and (not replicated or servers.replicated())

    while not await asyncio.to_thread(ready):
        assert time.monotonic() < deadline, "the cluster did not recover"
        await asyncio.sleep(0.1)


async def _where(prefix: str, missing: list[int]) -> dict[int, list[str]]:
    """For a failure message: which keys (if any) still hold each missing task's message."""
    from redis.asyncio.cluster import RedisCluster

    client = RedisCluster.from_url(
        CLUSTER_URL[0].replace("redis+cluster", "redis", 1).split(",")[0]
    )
    found: dict[int, list[str]] = {n: [] for n in missing}
    try:
        await client.initialize()
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for key in keys:
            kind = (await client.type(key)).decode()
            if kind != "list":
                continue
            for item in await client.lrange(key, 0, -1):
                for n in missing:
                    if f'"args":[{n}]'.encode() in item:
                        found[n].append(key.decode())
    finally:
        await client.aclose()
    return found


async def test_killing_a_queues_master_mid_stream_loses_no_confirmed_send(
    redis_cluster: RedisClusterServers, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Sends confirmed with ``wait_replicas=1`` survive their master's SIGKILL.

    The queue's master is killed while a sender and a worker are busy; one of its two replicas
    is promoted (the node timeout shortened to 1 s for this) and the other follows it, so
    writes are confirmed again without the dead node. Every send that returned must run.
    """
    caplog.set_level(logging.WARNING)
    url = CLUSTER_URL[0] + "?wait_replicas=1&wait_timeout_ms=1000"
    app = App("failover", broker=url, backend=url, key_prefix=key_prefix)
    done: set[int] = set()

    @app.task
    async def record(n: int) -> None:
        done.add(n)

    confirmed: set[int] = set()
    stop = asyncio.Event()

    async def sender() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await record.send(n)
            except Exception:  # not confirmed: it may or may not run
                await asyncio.sleep(0.05)
            else:
                confirmed.add(n)

    async def confirmed_at_least(count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(confirmed) < count:
            assert time.monotonic() < deadline, f"only {len(confirmed)} sends confirmed"
            await asyncio.sleep(0.02)

    await _wait_healthy(redis_cluster, replicated=True)
    master = redis_cluster.master_of(f"{key_prefix}:{{default}}")
    try:
        async with running_worker(app, concurrency=20):
            sending = asyncio.create_task(sender())
            try:
                await confirmed_at_least(200)
                with redis_cluster.node_timeout(FAST_FAILOVER_MS):
                    master.kill()  # SIGKILL, by its pid
                    await _wait_healthy(redis_cluster)
                promoted = redis_cluster.master_of(f"{key_prefix}:{{default}}")
                assert promoted.port != master.port
                await confirmed_at_least(len(confirmed) + 200)
            finally:
                stop.set()
                await sending
            deadline = time.monotonic() + 60
            while confirmed - done:
                if time.monotonic() > deadline:
                    where = await _where(key_prefix, sorted(confirmed - done)[:20])
                    raise AssertionError(f"lost: {where}")
                await asyncio.sleep(0.05)
        assert confirmed - done == set()
    finally:
        await app.close()
        await delete_prefixed_cluster(CLUSTER_URL[0], key_prefix)


def test_a_stage_is_cut_into_ordered_single_slot_runs() -> None:
    """MULTI/EXEC cannot span slots: dropped; key-less PUBLISH rides with the run before it."""
    from aioqueue._redis_cluster import _runs

    stack = [
        ("MULTI",),
        ("SET", "p:result:{t1}", b"x", "PX", 10),
        ("PUBLISH", "chan", b"x"),
        ("EXEC",),
        ("LREM", "p:{q}:processing:w", -1, b"m"),
        ("EVALSHA", "0" * 40, 1, "p:{q}", "arg"),
    ]
    assert _runs(stack) == [
        [("SET", "p:result:{t1}", b"x", "PX", 10), ("PUBLISH", "chan", b"x")],
        [("LREM", "p:{q}:processing:w", -1, b"m"), ("EVALSHA", "0" * 40, 1, "p:{q}", "arg")],
    ]


def test_a_single_redis_keeps_the_raw_batcher() -> None:
    """The choice is made once, by URL: nothing of the cluster's is on the single-node path."""
    from aioqueue._redis import CommandBatcher, connect_redis, new_batcher
    from aioqueue._redis_cluster import ClusterBatcher

    single = connect_redis("redis://127.0.0.1:1/0", connect_timeout=1, client_name="t")
    assert type(new_batcher(single, contextlib.nullcontext, "redis://127.0.0.1:1/0")) is (
        CommandBatcher
    )
    url = "redis+cluster://127.0.0.1:1"
    cluster = connect_redis(url, connect_timeout=1, client_name="t")
    assert type(new_batcher(cluster, contextlib.nullcontext, url)) is ClusterBatcher
