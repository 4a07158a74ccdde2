"""AMQP URLs with several hosts (issue 16, item 2): the first host that answers is used, and a
lost connection carries on with the next host. Against the shared node through two loopback
proxies of the test's own (a proxy closed = a node gone); the real three-node cluster is in
tests/test_amqp_cluster.py."""

from __future__ import annotations

import socket

import pytest
from conftest import AMQP_URL, require_server, running_worker
from faultproxy import FaultProxy
from yarl import URL

from aioqueue import App, BrokerConnectionError, ConfigurationError
from aioqueue._amqp import open_connection, split_hosts
from aioqueue.config import mask_url

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _hosts_url(*ports: int) -> str:
    base = URL(AMQP_URL)
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return f"amqp://{base.user}:{base.password}@{hosts}{base.path}"


def test_a_url_with_several_hosts_is_one_url_per_host() -> None:
    url = "amqp://u:s3cret@h1:5672,h2:5673,[::1]:5674/vh?heartbeat=5"
    assert split_hosts(url) == [
        "amqp://u:s3cret@h1:5672/vh?heartbeat=5",
        "amqp://u:s3cret@h2:5673/vh?heartbeat=5",
        "amqp://u:s3cret@[::1]:5674/vh?heartbeat=5",
    ]
    assert split_hosts("amqp://u:p@h1/") == ["amqp://u:p@h1/"]
    assert split_hosts("amqp://h1,h2") == ["amqp://h1", "amqp://h2"]
    with pytest.raises(ConfigurationError, match="empty host"):
        split_hosts("amqp://u:s3cret@h1,,h2/")


def test_the_password_of_a_url_with_several_hosts_is_masked() -> None:
    masked = mask_url("amqp://u:s3cret@h1:5672,h2:5673/vh")
    assert masked == "amqp://u:********@h1:5672,h2:5673/vh"
    assert mask_url("amqp://u:s3cret@h1,h2/") == "amqp://u:********@h1,h2/"
    assert mask_url("amqp://u:s3cret@[::1:5672/") == "********"  # unparseable: all masked
    assert "s3cret" not in repr(App("x", broker="amqp://u:s3cret@h1:5672,h2:5673/vh").broker)


async def test_connect_skips_a_host_that_is_down() -> None:
    require_server(AMQP_URL, "RabbitMQ")
    port = URL(AMQP_URL).port or 5672
    connection = await open_connection(
        _hosts_url(_free_port(), port), name="aqtest", timeout=5, heartbeat=60, reconnect_interval=1
    )
    try:
        assert connection.connected.is_set()
    finally:
        await connection.close()


async def test_no_host_answering_names_every_host_and_masks_the_password() -> None:
    dead = _free_port(), _free_port()
    url = f"amqp://guest:s3cret@127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}/"
    with pytest.raises(BrokerConnectionError) as caught:
        await open_connection(url, name="aqtest", timeout=2, heartbeat=60, reconnect_interval=1)
    text = str(caught.value)
    assert "s3cret" not in text
    assert f"127.0.0.1:{dead[0]}: connection refused" in text
    assert f"127.0.0.1:{dead[1]}: connection refused" in text


async def test_workers_and_senders_move_to_the_next_host_when_theirs_goes(key_prefix: str) -> None:
    require_server(AMQP_URL, "RabbitMQ")
    port = URL(AMQP_URL).port or 5672
    second = await FaultProxy(port).__aenter__()
    try:
        async with FaultProxy(port) as first:
            app = App(
                "hosts",
                # the middle host never answers: reconnects must go past it too
                broker=_hosts_url(first.port, _free_port(), second.port),
                backend="rpc://",
                key_prefix=key_prefix,
                amqp_delete_queues_on_close=True,
                amqp_reconnect_interval=0.2,
            )

            @app.task
            async def add(a: int, b: int) -> int:
                return a + b

            await app.connect()
            async with running_worker(app):
                assert await (await add.send(1, 2)).get(timeout=10) == 3
                assert app.broker.connection.url.port == first.port  # type: ignore[union-attr]
        # the first "node" is gone: no listener, every connection through it cut
        async with running_worker(app):
            assert await (await add.send(2, 3)).get(timeout=20) == 5
        assert app.broker.connection.url.port == second.port  # type: ignore[union-attr]
        await app.close()
    finally:
        await second.__aexit__(None, None, None)
