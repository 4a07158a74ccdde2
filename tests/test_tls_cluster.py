"""TLS for Redis Cluster (``rediss+cluster://``, issue 16), failing closed like ``rediss://``.

One private TLS-only cluster for the module (3 masters, no replicas; tests/redis_cluster.py
with ``tls=``): every node listens on a TLS port alone, with a certificate for 127.0.0.1 from
a CA made here (tests/pki.py), and asks each client for a certificate of that CA. So anything
aioqueue builds for the URL that does not present the client certificate and verify the
node's certificate cannot get through at all. The nodes also listen on 127.0.0.2, which the
certificate does not name (the wrong host name). Ended by their pids.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import IN_CI, running_worker
from pki import Pki, make_pki
from redis_cluster import RedisClusterServers
from redis_cluster import installed as cluster_installed

from aioqueue import App, BrokerConnectionError, ConfigurationError, ResultBackendError
from aioqueue._redis import connect_redis, is_cluster_url
from aioqueue._redis_cluster import (
    _direct_client,
    node_settings,
    parse_cluster_url,
    subscriber_connection,
    sync_cluster,
)
from aioqueue._redis_link import RedisLink
from aioqueue.tls import with_tls

pytestmark = pytest.mark.timeout(60)

PREFIX = "tlscluster"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def cluster(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    if not cluster_installed() or shutil.which("openssl") is None:
        if IN_CI:
            pytest.fail("redis-server, redis-cli and openssl are needed for the TLS cluster tests")
        pytest.skip("redis-server, redis-cli or openssl not installed")
    servers = RedisClusterServers(tmp_path_factory.mktemp("tls-cluster"), tls=pki)
    try:
        servers.start(masters=3, replicas=0)
        yield servers
    finally:
        servers.stop()


def _client_cert(pki: Pki) -> dict[str, str]:
    return {"ssl_certfile": str(pki.client_cert), "ssl_keyfile": str(pki.client_key)}


def _tls_url(cluster: RedisClusterServers, pki: Pki, host: str = "127.0.0.1") -> str:
    """The cluster's URL with the TLS files in its query, as :func:`with_tls` leaves it."""
    app = App("tlsc", broker=cluster.url_for(host), ssl_ca_certs=str(pki.ca), **_client_cert(pki))
    return with_tls(app.conf.broker_url, app.conf)


# -- URLs, without a server ------------------------------------------------------------------


def test_a_tls_cluster_url_verifies_by_default_and_takes_the_tls_settings() -> None:
    assert is_cluster_url("rediss+cluster://h:1") and is_cluster_url("REDIS+CLUSTER://h:1")
    parsed = parse_cluster_url("rediss+cluster://u:pw@h1:7000,h2:7001")
    assert parsed.tls == {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    assert parse_cluster_url("redis+cluster://h1:7000").tls is None
    app = App(
        "tlsc",
        broker="rediss+cluster://h1:7000,h2:7001?ssl_certfile=/url/c.pem",
        ssl_ca_certs="/conf/ca.pem",
        ssl_certfile="/conf/c.pem",  # the URL wins
        ssl_keyfile="/conf/c.key",
    )
    parsed = parse_cluster_url(with_tls(app.conf.broker_url, app.conf))
    assert parsed.nodes == [("h1", 7000), ("h2", 7001)]
    assert parsed.tls == {
        "ssl_ca_certs": "/conf/ca.pem",
        "ssl_certfile": "/url/c.pem",
        "ssl_keyfile": "/conf/c.key",
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }
    assert "tls" in repr(parsed)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://h:1?ssl_ca_certs=/ca.pem",  # TLS files on a plain URL: never used
        "rediss+cluster://h:1?ssl_cafile=/ca.pem",  # misspelt: refused, not ignored
        "rediss+cluster://h:1?ssl_check_hostname=maybe",
    ],
)
def test_tls_options_that_would_be_ignored_or_guessed_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_cluster_url(url)


def test_turning_verification_off_needs_the_setting_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    for query in ("?ssl_cert_reqs=none", "?ssl_check_hostname=false"):
        with pytest.raises(ConfigurationError, match="needs the explicit setting ssl_verify"):
            App("tlsc", broker=f"rediss+cluster://h:1{query}").broker  # noqa: B018 - builds it
    off = App("tlsc", broker="rediss+cluster://h:1", ssl_verify=False)
    with caplog.at_level(logging.WARNING, logger="aioqueue.tls"):
        parsed = parse_cluster_url(with_tls(off.conf.broker_url, off.conf))
    assert parsed.tls == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    assert "TLS verification is OFF" in caplog.text


# -- against the TLS-only cluster ------------------------------------------------------------


async def _round_trip(url: str, **settings: Any) -> None:
    app = App("tlsc", broker=url, key_prefix=PREFIX, **settings)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    try:
        async with app, running_worker(app):
            result = await add.send(2, 3)
            assert await result.get(timeout=10) == 5
            delayed = await add.options(countdown=0.2).send(1, 1)  # the delay mover's link
            assert await delayed.get(timeout=10) == 2
    finally:
        await app.close()


async def test_a_round_trip_over_mutual_tls_with_the_settings_or_the_url(
    cluster: RedisClusterServers, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aioqueue"):
        await _round_trip(cluster.url, ssl_ca_certs=str(pki.ca), **_client_cert(pki))
        query = f"?ssl_ca_certs={pki.ca}&ssl_certfile={pki.client_cert}"
        await _round_trip(f"{cluster.url}{query}&ssl_keyfile={pki.client_key}")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_every_client_made_for_the_url_speaks_verified_tls(
    cluster: RedisClusterServers, pki: Pki
) -> None:
    """The cluster client (broker, backend, control bus, events, limits, schedule claims), the
    lease thread's blocking client, the per-master clients of ``wait_replicas``, the result
    listener's connection and the delay mover's link: each reaches a node that only lets in
    a verified TLS client with the client certificate."""
    url = _tls_url(cluster, pki)
    client = connect_redis(url, connect_timeout=5, client_name="tlsc")
    try:
        assert await client.ping()
        settings = await node_settings(client)
        assert settings.tls is not None and settings.tls.check_hostname
        link = await RedisLink.open(settings)
        link.abort()
        node = client.get_random_primary_node()
        direct = _direct_client(client, node.host, int(node.port), parse_cluster_url(url).tls)
        try:
            assert await direct.ping()
        finally:
            await direct.aclose()
        connection = subscriber_connection(client, url, 5)
        await connection.connect()
        await connection.disconnect()
    finally:
        await client.aclose()
    blocking = sync_cluster(url, timeout=5)
    try:
        assert await asyncio.to_thread(blocking.ping)
    finally:
        blocking.close()


async def _refused(url: str, **settings: Any) -> BrokerConnectionError:
    app = App("tlsc", broker=url, key_prefix=PREFIX, **settings)
    try:
        with pytest.raises(BrokerConnectionError) as caught:
            async with app:
                await app.broker.queue_length("default")
        return caught.value
    finally:
        await app.close()


async def test_a_wrong_ca_is_refused_with_a_clear_error(
    cluster: RedisClusterServers, pki: Pki
) -> None:
    error = await _refused(cluster.url, ssl_ca_certs=str(pki.other_ca), **_client_cert(pki))
    assert "certificate verify failed" in str(error)
    backend = App(
        "tlsc", broker="memory://", backend=cluster.url, ssl_ca_certs=str(pki.other_ca)
    ).backend
    try:
        with pytest.raises(ResultBackendError, match="certificate verify failed"):
            await backend.connect()
    finally:
        await backend.aclose()


async def test_a_wrong_host_name_is_refused_even_with_the_right_ca(
    cluster: RedisClusterServers, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = cluster.url_for(host="127.0.0.2")
    error = await _refused(wrong, ssl_ca_certs=str(pki.ca), **_client_cert(pki))
    assert "certificate is not valid for '127.0.0.2'" in str(error)
    with caplog.at_level(logging.WARNING, logger="aioqueue.tls"):  # only with the setting
        app = App("tlsc", broker=wrong, key_prefix=PREFIX, ssl_verify=False, **_client_cert(pki))
        try:
            async with app:
                assert await app.broker.queue_length("default") == 0
        finally:
            await app.close()
    assert "TLS verification is OFF" in caplog.text


async def test_no_client_certificate_is_refused(cluster: RedisClusterServers, pki: Pki) -> None:
    error = await _refused(cluster.url, ssl_ca_certs=str(pki.ca))
    # TLS 1.3 refuses the client after the handshake: its alert, or a reset overtaking it
    assert "certificate required" in str(error) or "reset by peer" in str(error)


async def test_a_plain_cluster_url_is_refused_and_told_to_use_tls(
    cluster: RedisClusterServers,
) -> None:
    error = await _refused(cluster.url_for(scheme="redis+cluster"))
    assert "use rediss+cluster://" in str(error)
