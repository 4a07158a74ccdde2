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
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from aioqueue import App, Worker

REDIS_URL = os.environ.get("AIOQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
AMQP_URL = os.environ.get("AIOQUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


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
    return f"aqtest-{uuid.uuid4().hex[:10]}"


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
}


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_app(transport: str, key_prefix: str) -> AsyncIterator[AppFactory]:
    """Builds apps on the parametrized transport; closes them and deletes their keys after."""
    needs, kwargs_for = TRANSPORTS[transport]
    if "redis" in needs:
        require_server(REDIS_URL, "Redis")
    if "amqp" in needs:
        require_server(AMQP_URL, "RabbitMQ")
    apps: list[App] = []

    def factory(name: str = "contract", **extra: Any) -> App:
        kwargs = {**kwargs_for(key_prefix), **extra}
        app = App(name, **kwargs)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.close()
    if "redis" in needs or "redis" in transport:
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
