"""A RabbitMQ cluster with quorum queues (issue 16, item 2), on the private three-node cluster of
tests/rabbit_cluster.py (``make test-cluster``): the node that leads the work queue's quorum is
killed (SIGKILL) while tasks flow; nothing ``send()`` confirmed is lost, every task runs (at least
once: duplicates are counted and reported), and the worker and the senders carry on with the
surviving nodes through their several-host URL."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from conftest import REDIS_URL, delete_prefixed, require_server, running_worker, wait_until
from rabbit_cluster import Node, RabbitCluster

from aioqueue import App, BrokerError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def restores_the_nodes(rabbit_cluster: RabbitCluster) -> AsyncIterator[None]:
    """Whatever a test killed is started again (it rejoins from its data) for the next one."""
    yield
    for node in rabbit_cluster.nodes:
        if not node.alive():
            node.start()
            await asyncio.to_thread(node.wait_listening)
            await asyncio.to_thread(node.ctl, "await_startup")


def _app(url: str, prefix: str) -> App:
    return App(
        "cluster",
        broker=url,
        backend=REDIS_URL,
        key_prefix=prefix,
        amqp_queue_type="quorum",
        amqp_delete_queues_on_close=True,
        amqp_reconnect_interval=0.2,
    )


def _leader_first(cluster: RabbitCluster, leader: Node) -> str:
    return cluster.url([leader, *(node for node in cluster.nodes if node is not leader)])


@pytest.mark.usefixtures("restores_the_nodes")
async def test_killing_the_quorum_leader_loses_no_confirmed_task(
    rabbit_cluster: RabbitCluster, key_prefix: str
) -> None:
    require_server(REDIS_URL, "Redis")
    queue = f"{key_prefix}.default"
    setup = _app(rabbit_cluster.url(), key_prefix)
    await setup.broker.declare("default")  # type: ignore[attr-defined]
    leader = await asyncio.to_thread(rabbit_cluster.leader, queue)
    await setup.broker.aclose()  # type: ignore[attr-defined]  # keep the queue: no app.close()

    # Worker and senders reach the leader first: its death moves both to the survivors.
    app = _app(_leader_first(rabbit_cluster, leader), key_prefix)
    runs: collections.Counter[int] = collections.Counter()

    @app.task
    async def job(n: int) -> None:
        await asyncio.sleep(0.002)
        runs[n] += 1

    confirmed: set[int] = set()
    errors: collections.Counter[str] = collections.Counter()
    failed_sends = 0
    numbers = iter(range(1_000_000))
    stop = asyncio.Event()

    async def sender() -> None:
        nonlocal failed_sends
        while not stop.is_set():
            n = next(numbers)
            try:
                await job.send(n)
            except BrokerError as exc:
                failed_sends += 1  # not confirmed: may or may not be queued
                errors[f"{exc} <- {exc.__cause__!r}"[:300]] += 1
                await asyncio.sleep(0.05)
            else:
                confirmed.add(n)

    progress: list[str] = []

    async def monitor() -> None:
        start = time.monotonic()
        while True:
            connection = app.broker.connection  # type: ignore[attr-defined]
            port = connection.url.port if connection is not None else None
            progress.append(
                f"{time.monotonic() - start:.1f}s confirmed={len(confirmed)} "
                f"failed={failed_sends} ran={len(runs)} client@{port}"
            )
            await asyncio.sleep(1)

    watcher = asyncio.create_task(monitor())
    try:
        await app.connect()
        async with running_worker(app, concurrency=20):
            senders = [asyncio.create_task(sender()) for _ in range(4)]
            await wait_until(_holds(lambda: len(runs) >= 100), timeout=60)
            before = len(confirmed)
            killed_at = time.monotonic()
            await asyncio.to_thread(leader.kill)
            # tasks keep flowing through the survivors: sends confirmed and run after the kill
            await wait_until(_holds(lambda: len(confirmed) >= before + 300), timeout=120)
            resumed = time.monotonic() - killed_at
            stop.set()
            await asyncio.gather(*senders)
            with contextlib.suppress(AssertionError):  # judged below, with the numbers
                await wait_until(_holds(lambda: confirmed <= set(runs)), timeout=120)
            new_leader = await asyncio.to_thread(rabbit_cluster.leader, queue)
        lost = confirmed - set(runs)
        duplicates = sum(count - 1 for count in runs.values())
        print(
            f"\nquorum leader {leader.name} killed; new leader {new_leader.name}; "
            f"{len(confirmed)} sends confirmed ({before} before the kill), {failed_sends} sends "
            f"failed during the failover, {len(runs)} distinct tasks ran, lost {len(lost)}, "
            f"duplicates {duplicates}; 300 more confirmed {resumed:.1f}s after the kill"
        )
        assert not lost, f"lost {len(lost)} confirmed tasks, e.g. {sorted(lost)[:10]}"
        assert new_leader is not leader
        connection = app.broker.connection  # type: ignore[attr-defined]
        assert connection is not None and connection.url.port != leader.port
    except BaseException:
        print("\n".join(progress[-30:]), dict(errors), sep="\n")  # shown with the failure
        raise
    finally:
        watcher.cancel()
        stop.set()
        with contextlib.suppress(Exception):
            await app.close()
        await delete_prefixed(REDIS_URL, key_prefix)


def _holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain condition as the async predicate wait_until polls."""

    async def predicate() -> bool:
        return check()

    return predicate
