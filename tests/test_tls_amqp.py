"""amqps:// that fails closed (issue 14, item 2), against a PRIVATE RabbitMQ node of this module's
own (its own node name, ports, data and cookie; TLS only, client certificates required), with a
CA made here: the right CA and client certificate work, the wrong CA, host name or a missing
client certificate fail."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI, free_port
from pki import Pki, make_pki

from aioqueue import App, BrokerConnectionError

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
pytestmark = pytest.mark.timeout(120)


class PrivateRabbit:
    """One RabbitMQ node started by this test and ended by its own pids."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        self.port = free_port()
        self.workdir = workdir
        config = workdir / "rabbitmq.conf"
        config.write_text(
            "listeners.tcp = none\n"
            f"listeners.ssl.default = 127.0.0.1:{self.port}\n"
            f"ssl_options.cacertfile = {pki.ca}\n"
            f"ssl_options.certfile = {pki.server_cert}\n"
            f"ssl_options.keyfile = {pki.server_key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
        )
        (workdir / "enabled_plugins").write_text("[].\n")
        self.pid_file = workdir / "node.pid"
        env = {
            **os.environ,
            "HOME": str(workdir),  # its own Erlang cookie
            "RABBITMQ_NODENAME": f"aqtest-{uuid.uuid4().hex[:8]}@localhost",
            "RABBITMQ_NODE_PORT": str(free_port()),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }
        self.proc = subprocess.Popen(
            [SERVER],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_started(self) -> None:
        """Poll the TLS port (with a deadline): a node has no other readiness signal to us."""
        deadline = time.monotonic() + 60
        while not _listening(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("the private RabbitMQ node did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        pids = [self.proc.pid]
        with contextlib.suppress(OSError, ValueError):
            pids.insert(0, int(self.pid_file.read_text().strip()))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def url(self, host: str = "localhost", query: str = "") -> str:
        return f"amqps://guest:guest@{host}:{self.port}/{query}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def rabbit(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbit]:
    if not Path(SERVER).exists() or shutil.which("erl") is None:
        if IN_CI:
            pytest.fail("rabbitmq-server is needed for the amqps:// tests")
        pytest.skip("rabbitmq-server not installed")
    node = PrivateRabbit(tmp_path_factory.mktemp("rabbit"), pki)
    try:
        node.wait_started()
        yield node
    finally:
        node.stop()


async def _round_trip(url: str, **settings: Any) -> None:
    app = App("tls", broker=url, backend="rpc://", key_prefix="tlstest", **settings)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    try:
        async with app, app.worker(concurrency=2, processes=1):
            assert await (await add.send(2, 3)).get(timeout=10) == 5
    finally:
        await app.close()


async def _refused(url: str, match: str, **settings: Any) -> None:
    app = App("tls", broker=url, backend="rpc://", key_prefix="tlstest", **settings)
    try:
        with pytest.raises(BrokerConnectionError, match=match):
            async with app:
                pass
    finally:
        await app.close()


def _client(pki: Pki) -> dict[str, str]:
    return {"ssl_certfile": str(pki.client_cert), "ssl_keyfile": str(pki.client_key)}


async def test_amqps_with_the_right_ca_and_a_client_certificate_works(
    rabbit: PrivateRabbit, pki: Pki
) -> None:
    await _round_trip(rabbit.url(), ssl_ca_certs=str(pki.ca), **_client(pki))
    query = f"?cafile={pki.ca}&certfile={pki.client_cert}&keyfile={pki.client_key}"
    await _round_trip(rabbit.url(query=query))


async def test_amqps_fails_closed(rabbit: PrivateRabbit, pki: Pki) -> None:
    verify_failed = "certificate verify failed"
    await _refused(rabbit.url(), verify_failed, ssl_ca_certs=str(pki.other_ca), **_client(pki))
    await _refused(rabbit.url(), verify_failed, **_client(pki))  # system CAs only
    await _refused(
        rabbit.url(host="127.0.0.1"), verify_failed, ssl_ca_certs=str(pki.ca), **_client(pki)
    )
    await _refused(rabbit.url(), "cannot connect", ssl_ca_certs=str(pki.ca))  # no client cert
