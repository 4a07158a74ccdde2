"""TLS that fails closed (issue 14, item 2), against a private TLS redis-server and a CA made
here with the openssl CLI: the wrong CA or host name fails clearly, the right CA works, mutual
TLS works, and turning verification off takes an explicit, logged setting."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI, free_port, port_open, running_worker
from pki import Pki, make_pki

from aioqueue import App, BrokerConnectionError, ConfigurationError
from aioqueue.tls import split_amqp_tls, with_tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is needed for the TLS tests")
        pytest.skip("redis-server not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsRedis:
    """A private redis-server speaking TLS only, on a free loopback port; ended by its pid."""

    def __init__(self, pki: Pki, workdir: Path, *, mutual: bool) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", "0", "--tls-port", str(self.port)),
                *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                *("--dir", str(workdir)),
                *("--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key)),
                *("--tls-ca-cert-file", str(pki.ca)),
                *("--tls-auth-clients", "yes" if mutual else "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def url(self, host: str = "localhost", query: str = "") -> str:
        return f"rediss://{host}:{self.port}/0{query}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def _started(server: TlsRedis) -> TlsRedis:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not await port_open(server.port):
        if loop.time() > deadline or server.proc.poll() is not None:
            raise AssertionError("the TLS redis-server did not start")
        await asyncio.sleep(0.02)
    return server


@pytest.fixture
def tls_servers(pki: Pki, tmp_path: Path) -> Iterator[list[TlsRedis]]:
    servers: list[TlsRedis] = []
    yield servers
    for server in servers:
        server.stop()


async def _server(servers: list[TlsRedis], pki: Pki, tmp: Path, *, mutual: bool) -> TlsRedis:
    server = TlsRedis(pki, tmp, mutual=mutual)
    servers.append(server)
    return await _started(server)


async def _round_trip(url: str, **settings: Any) -> None:
    app = App("tls", broker=url, backend=url, key_prefix="tlstest", **settings)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    try:
        async with app, running_worker(app):
            result = await add.send(2, 3)
            assert await result.get(timeout=10) == 5
    finally:
        await app.close()


async def test_the_right_ca_works_and_everything_is_verified(
    pki: Pki, tls_servers: list[TlsRedis], tmp_path: Path
) -> None:
    server = await _server(tls_servers, pki, tmp_path, mutual=False)
    await _round_trip(server.url(), ssl_ca_certs=str(pki.ca))  # the setting
    await _round_trip(server.url(query=f"?ssl_ca_certs={pki.ca}"))  # the URL form


async def test_a_wrong_ca_fails_with_a_clear_error(
    pki: Pki, tls_servers: list[TlsRedis], tmp_path: Path
) -> None:
    server = await _server(tls_servers, pki, tmp_path, mutual=False)
    app = App("tls", broker=server.url(), ssl_ca_certs=str(pki.other_ca), key_prefix="tlstest")
    try:
        with pytest.raises(BrokerConnectionError, match="certificate verify failed") as caught:
            async with app:
                await app.broker.queue_length("default")
        assert "localhost" in str(caught.value)
    finally:
        await app.close()


async def test_a_wrong_host_name_fails_even_with_the_right_ca(
    pki: Pki, tls_servers: list[TlsRedis], tmp_path: Path
) -> None:
    server = await _server(tls_servers, pki, tmp_path, mutual=False)
    app = App(
        "tls", broker=server.url(host="127.0.0.1"), ssl_ca_certs=str(pki.ca), key_prefix="tlstest"
    )
    try:
        with pytest.raises(BrokerConnectionError, match=r"certificate verify failed.*(IP|match)"):
            async with app:
                await app.broker.queue_length("default")
    finally:
        await app.close()


async def test_a_plain_url_at_a_tls_only_server_is_told_to_use_tls(
    pki: Pki, tls_servers: list[TlsRedis], tmp_path: Path
) -> None:
    server = await _server(tls_servers, pki, tmp_path, mutual=False)
    app = App("tls", broker=f"redis://127.0.0.1:{server.port}/0", key_prefix="tlstest")
    try:
        with pytest.raises(BrokerConnectionError, match="use rediss://"):
            async with app:
                await app.broker.queue_length("default")
    finally:
        await app.close()


async def test_mutual_tls_works_with_a_client_certificate_and_fails_without(
    pki: Pki, tls_servers: list[TlsRedis], tmp_path: Path
) -> None:
    server = await _server(tls_servers, pki, tmp_path, mutual=True)
    await _round_trip(
        server.url(),
        ssl_ca_certs=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
    )
    await _round_trip(
        server.url(
            query=f"?ssl_ca_certs={pki.ca}&ssl_certfile={pki.client_cert}"
            f"&ssl_keyfile={pki.client_key}"
        )
    )
    app = App("tls", broker=server.url(), ssl_ca_certs=str(pki.ca), key_prefix="tlstest")
    try:
        with pytest.raises(BrokerConnectionError):
            async with app:
                await app.broker.queue_length("default")
    finally:
        await app.close()


async def test_verification_off_needs_the_setting_and_is_logged(
    pki: Pki, tls_servers: list[TlsRedis], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await _server(tls_servers, pki, tmp_path, mutual=False)
    for query in ("?ssl_cert_reqs=none", "?ssl_check_hostname=false"):
        with pytest.raises(ConfigurationError, match="needs the explicit setting ssl_verify"):
            App("tls", broker=server.url(query=query)).broker  # noqa: B018 - builds it
    with caplog.at_level(logging.WARNING, logger="aioqueue.tls"):
        await _round_trip(server.url(host="127.0.0.1"), ssl_verify=False)
    assert "TLS verification is OFF" in caplog.text


def test_amqps_gets_a_verifying_context_with_the_private_ca(pki: Pki) -> None:
    app = App("amqp", broker="amqps://u:pw@rabbit.example:5671/vh", ssl_ca_certs=str(pki.ca))
    url = with_tls(app.conf.broker_url, app.conf)
    plain, context = split_amqp_tls(url)
    assert plain == "amqps://u:pw@rabbit.example:5671/vh"
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any("aioqueue test ca" in str(c.get("subject")) for c in context.get_ca_certs())
    # aio-pika's own spellings in the URL, client certificate included
    query = f"?cafile={pki.ca}&certfile={pki.client_cert}&keyfile={pki.client_key}&name=x"
    plain, context = split_amqp_tls(with_tls(f"amqps://rabbit/{query}", app.conf))
    assert plain == "amqps://rabbit/?name=x" and context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigurationError, match="no_verify_ssl"):
        with_tls("amqps://rabbit/?no_verify_ssl=1", app.conf)
    off = App("amqp", broker="amqps://rabbit/", ssl_verify=False)
    _, context = split_amqp_tls(with_tls(off.conf.broker_url, off.conf))
    assert context is not None and context.verify_mode == ssl.CERT_NONE
    assert split_amqp_tls("amqp://rabbit/") == ("amqp://rabbit/", None)


def test_a_missing_tls_file_is_a_configuration_error(tmp_path: Path) -> None:
    app = App("amqp", broker="amqps://rabbit/", ssl_ca_certs=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigurationError, match="cannot load the TLS files"):
        split_amqp_tls(with_tls(app.conf.broker_url, app.conf))
