"""Shared fixtures: real servers, per-test key prefixes, and apps over every transport.

Redis tests use db 15 and a key prefix of their own, and delete only their own keys. In CI
(``CI=true``) a server that cannot be reached fails the run; elsewhere those tests are skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from prefixes import delete_run_leftovers, new_prefix
from rabbit_cluster import SERVER as CLUSTER_SERVER
from rabbit_cluster import RabbitCluster
from redis_cluster import RedisClusterServers
from redis_cluster import installed as cluster_installed

from aioqueue import App, Worker

REDIS_URL = os.environ.get("AIOQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
AMQP_URL = os.environ.get("AIOQUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# `make test-cluster` sets it: start a private three-node RabbitMQ cluster once per session and
# add the "amqp-cluster" transport to the contract (tests/rabbit_cluster.py, issue 16).
WITH_CLUSTER = os.environ.get("AIOQUEUE_TEST_CLUSTER", "").lower() in {"1", "true", "yes"}


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return True
    except OSError:
        return False


def require_server(url: str, what: str) -> None:
    """Skip (locally) or fail (in CI) when a server the test needs is not there."""
    if _reachable(url):
        return
    message = f"{what} is not reachable at {url}"
    if IN_CI:
        pytest.fail(f"{message}; CI must have it running", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def redis_url() -> str:
    require_server(REDIS_URL, "Redis")
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    require_server(AMQP_URL, "RabbitMQ")
    return AMQP_URL


@pytest.fixture
def key_prefix() -> str:
    return new_prefix()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """What this run left on the shared RabbitMQ goes (see tests/prefixes.py)."""
    if _reachable(AMQP_URL):
        delete_run_leftovers(AMQP_URL)


async def delete_prefixed(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_cleanup(redis_url: str, key_prefix: str) -> AsyncIterator[None]:
    yield
    await delete_prefixed(redis_url, key_prefix)


# -- transports ------------------------------------------------------------------------

AppFactory = Callable[..., App]

# name -> (needs, function(request, key_prefix) -> App kwargs). "needs" lists servers.
TRANSPORTS: dict[str, tuple[tuple[str, ...], Callable[[str], dict[str, Any]]]] = {
    "memory": ((), lambda prefix: {"broker": "memory://"}),
    "redis": (
        ("redis",),
        lambda prefix: {"broker": REDIS_URL, "backend": REDIS_URL, "key_prefix": prefix},
    ),
    # AMQP queues are named <key_prefix>.<queue>, so each test has its own; the broker deletes
    # the queues it declared when the app closes (amqp_delete_queues_on_close).
    "amqp-redis": (
        ("amqp", "redis"),
        lambda prefix: {
            "broker": AMQP_URL,
            "backend": REDIS_URL,
            "key_prefix": prefix,
            "amqp_delete_queues_on_close": True,
        },
    ),
    "amqp-rpc": (
        ("amqp",),
        lambda prefix: {
            "broker": AMQP_URL,
            "backend": "rpc://",
            "key_prefix": prefix,
            "amqp_delete_queues_on_close": True,
        },
    ),
    # A private 3-master Redis Cluster (2 replicas each), started once per session on first use.
    "redis-cluster": (
        ("redis-cluster",),
        lambda prefix: {
            "broker": CLUSTER_URL[0],
            "backend": CLUSTER_URL[0],
            "key_prefix": prefix,
        },
    ),
}
if WITH_CLUSTER:
    # Quorum queues on the private three-node cluster (its URL names every node), results in
    # Redis; the broker URL is filled in by make_app from the session's rabbit_cluster.
    TRANSPORTS["amqp-cluster"] = (
        ("amqp-cluster", "redis"),
        lambda prefix: {
            "backend": REDIS_URL,
            "key_prefix": prefix,
            "amqp_queue_type": "quorum",
            "amqp_delete_queues_on_close": True,
            "amqp_reconnect_interval": 0.2,
        },
    )
    TRANSPORTS["amqp-cluster-rpc"] = (
        ("amqp-cluster",),
        lambda prefix: {
            "backend": "rpc://",
            "key_prefix": prefix,
            "amqp_queue_type": "quorum",
            "amqp_delete_queues_on_close": True,
            "amqp_reconnect_interval": 0.2,
        },
    )

CLUSTER_URL: list[str] = [""]  # set by the redis_cluster fixture


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A private Redis Cluster: 3 masters with 2 replicas each (so a master can be killed and
    its promoted replica still has one); ended by its pids."""
    if not cluster_installed():
        if IN_CI:
            pytest.fail("redis-server and redis-cli are needed for the Redis Cluster tests")
        pytest.skip("redis-server not installed")
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        servers.start(masters=3, replicas=2)
        CLUSTER_URL[0] = servers.url
        yield servers
    finally:
        servers.stop()


async def delete_prefixed_cluster(url: str, prefix: str) -> None:
    """Delete a test's keys on every master of a cluster."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    hosts = url.partition("://")[2].split(",")
    nodes = [ClusterNode(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in hosts]
    client = RedisCluster(startup_nodes=nodes)
    try:
        await client.initialize()
        for node in client.get_primaries():
            keys = [
                key
                async for key in client.scan_iter(match=f"{prefix}*", count=1000, target_nodes=node)
            ]
            for key in keys:
                await client.delete(key)
    finally:
        await client.aclose()


# The modules whose make_app tests run on the Redis Cluster too; elsewhere the "redis-cluster"
# parameter is deselected (those tests read keys on the single test Redis, or were not yet
# checked on a cluster).
CLUSTER_MODULES = frozenset({"test_contract"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_cluster = callspec is not None and callspec.params.get("transport") == "redis-cluster"
        module = item.module.__name__ if item.module is not None else ""
        (dropped if on_cluster and module not in CLUSTER_MODULES else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_app(
    transport: str, key_prefix: str, request: pytest.FixtureRequest
) -> AsyncIterator[AppFactory]:
    """Builds apps on the parametrized transport; closes them and deletes their keys after."""
    needs, kwargs_for = TRANSPORTS[transport]
    cluster_url = None
    if "amqp-cluster" in needs:
        cluster_url = request.getfixturevalue("rabbit_cluster").url()
    if "redis-cluster" in needs:
        request.getfixturevalue("redis_cluster")
    if "redis" in needs:
        require_server(REDIS_URL, "Redis")
    if "amqp" in needs:
        require_server(AMQP_URL, "RabbitMQ")
    apps: list[App] = []

    def factory(name: str = "contract", **extra: Any) -> App:
        kwargs = {**kwargs_for(key_prefix), **extra}
        if cluster_url is not None:
            kwargs.setdefault("broker", cluster_url)
        app = App(name, **kwargs)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.close()
    if "redis-cluster" in needs:
        await delete_prefixed_cluster(CLUSTER_URL[0], key_prefix)
    elif "redis" in needs or "redis" in transport:
        await delete_prefixed(REDIS_URL, key_prefix)


@asynccontextmanager
async def running_worker(app: App, **options: Any) -> AsyncIterator[Worker]:
    """A worker started in this event loop, ready on entry, drained on exit."""
    options.setdefault("concurrency", 10)
    options.setdefault("processes", 1)
    async with app.worker(**options) as worker:
        yield worker


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll an async condition with a deadline (for state that has no event to wait on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def fetch_exactly(consumer: Any, count: int) -> list[Any]:
    """What a worker with ``count`` free slots gathers: RabbitMQ pushes deliveries one frame at a
    time, so a single fetch may return as soon as the first of them has arrived."""
    got: list[Any] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            got += await consumer.fetch(count - len(got), 5)
    return got


# -- private servers and raw clients ------------------------------------------------------------


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the shared test Redis, for looking at keys directly."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


class PrivateRedis:
    """A redis-server of the test's own on a free port (never the shared one), killed by pid."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is needed for the outage tests")
        pytest.skip("redis-server not installed")
    server = PrivateRedis(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Three private RabbitMQ nodes joined into a cluster, started once (about 12 s here) and
    stopped at the end of the session; only with AIOQUEUE_TEST_CLUSTER=1 (make test-cluster)."""
    if not WITH_CLUSTER:
        pytest.skip("the RabbitMQ cluster tests run with `make test-cluster`")
    if not Path(CLUSTER_SERVER).exists() or shutil.which("erl") is None:
        if IN_CI:
            pytest.fail("rabbitmq-server is needed for the cluster tests")
        pytest.skip("rabbitmq-server not installed")
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -- the CLI subprocess tests' brokers and client app ------------------------------------------


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """CLI tests: Redis or RabbitMQ as the broker; results in Redis either way."""
    url = REDIS_URL if request.param == "redis" else AMQP_URL
    require_server(url, request.param)
    require_server(REDIS_URL, "Redis")
    return url


@pytest.fixture
async def client(broker_url: str, key_prefix: str) -> AsyncIterator[App]:
    """The test's side of ``broker_url``: sends, reads results; its keys deleted after."""
    app = App(
        "client",
        broker=broker_url,
        backend=REDIS_URL,
        key_prefix=key_prefix,
        amqp_delete_queues_on_close=True,
    )
    async with app:
        yield app
    await delete_prefixed(REDIS_URL, key_prefix)


@pytest.fixture(params=["redis", "amqp-rpc"])
def urls(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(broker, results): Redis for both, or RabbitMQ alone with ``rpc://`` results."""
    if request.param == "redis":
        require_server(REDIS_URL, "Redis")
        return REDIS_URL, REDIS_URL
    require_server(AMQP_URL, "RabbitMQ")
    return AMQP_URL, "rpc://"
