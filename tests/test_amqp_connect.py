"""AMQP connection failures say why, in our words: BrokerConnectionError with the reason named
and the URL's password masked, never aiormq's frame reprs (``<Connection.Close object at ...>``).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
from conftest import AMQP_URL, require_server
from yarl import URL

from aioqueue import App, BrokerConnectionError, ResultBackendError
from aioqueue._amqp import open_connection

pytestmark = pytest.mark.timeout(30)


def _with(url: str, **parts: str) -> str:
    return str(
        URL(url)
        .with_user(parts.get("user", URL(url).user))
        .with_password(parts.get("password", URL(url).password))
        .with_path(parts.get("path", URL(url).path))
    )


async def _connect(url: str, timeout: float = 5.0) -> None:
    connection = await open_connection(
        url, name="aqtest", timeout=timeout, heartbeat=60, reconnect_interval=1
    )
    await connection.close()  # not reached in these tests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _plain(text: str) -> None:
    assert "object at 0x" not in text and "Connection.Close" not in text, text


async def test_a_vhost_that_does_not_exist_is_named() -> None:
    require_server(AMQP_URL, "RabbitMQ")
    vhost = f"aqtest-missing-{uuid.uuid4().hex[:8]}"
    url = _with(AMQP_URL, path=f"/{vhost}")
    with pytest.raises(BrokerConnectionError) as caught:
        await _connect(url)
    text = str(caught.value)
    _plain(text)
    assert f"virtual host {vhost!r}" in text and "does not exist" in text
    assert "guest:guest" not in text


async def test_a_wrong_password_is_access_refused_and_never_shown() -> None:
    require_server(AMQP_URL, "RabbitMQ")
    url = _with(AMQP_URL, password="n0t-the-passw0rd")
    with pytest.raises(BrokerConnectionError) as caught:
        await _connect(url)
    text = str(caught.value)
    _plain(text)
    assert "access refused" in text and "'guest'" in text
    assert "n0t-the-passw0rd" not in text


async def test_a_closed_port_is_connection_refused() -> None:
    url = f"amqp://guest:s3cret@127.0.0.1:{_free_port()}/"
    with pytest.raises(BrokerConnectionError) as caught:
        await _connect(url)
    text = str(caught.value)
    assert "connection refused" in text and "s3cret" not in text


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """Accepts connections and never says a word (not an AMQP server, or a hung one)."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in writers:
        writer.transport.abort()
    server.close()
    await server.wait_closed()


async def test_a_server_that_never_answers_times_out(silent_server: int) -> None:
    url = f"amqp://guest:s3cret@127.0.0.1:{silent_server}/"
    with pytest.raises(BrokerConnectionError) as caught:
        await _connect(url, timeout=0.5)
    text = str(caught.value)
    assert "timed out after 0.5s" in text and "s3cret" not in text


async def test_an_app_sending_to_a_missing_vhost_gets_the_reason() -> None:
    require_server(AMQP_URL, "RabbitMQ")
    vhost = f"aqtest-missing-{uuid.uuid4().hex[:8]}"
    app = App("novhost", broker=_with(AMQP_URL, path=f"/{vhost}"), backend="rpc://")

    @app.task
    async def noop() -> None:
        return None

    try:
        with pytest.raises((BrokerConnectionError, ResultBackendError)) as caught:
            await noop.send()
        _plain(str(caught.value))
        assert "does not exist" in str(caught.value)
    finally:
        await app.close()
