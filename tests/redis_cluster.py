"""A private Redis Cluster for the tests: 3 masters and their replicas on free loopback ports.

Started once per session (``redis_cluster`` fixture in conftest.py) with ``redis-server
--cluster-enabled yes`` and ``redis-cli --cluster create``, each node ended by its own pid. The
node timeout is 10 s: with 1 s, a node starved of CPU on a loaded 2-core CI machine was once
judged failed and its replica promoted in the middle of a contract test, losing the writes the
old master had not replicated yet (the test hung). The failover test shortens it for itself
(:meth:`RedisClusterServers.node_timeout`) so a killed master's replica is promoted in seconds.

With ``tls=`` (a :class:`pki.Pki`) the nodes speak TLS only (``--port 0 --tls-port``, the
cluster bus and replication too) with a certificate for 127.0.0.1 alone, and ask every client
for a certificate of the test CA. They also listen on 127.0.0.2, an address the certificate
does not name, so a test can dial a node under the wrong name.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from pki import Pki

START_TIMEOUT = 30.0
NODE_TIMEOUT_MS = 10_000
FAST_FAILOVER_MS = 1000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ClusterNode:
    port: int
    bus_port: int
    proc: subprocess.Popen[bytes]
    argv: list[str]
    log: Path
    tls: Pki | None = None

    @classmethod
    def launch(cls, port: int, bus_port: int, workdir: Path, tls: Pki | None = None) -> ClusterNode:
        argv = [
            *("redis-server", *_listen(port, tls)),
            *("--cluster-enabled", "yes", "--cluster-port", str(bus_port)),
            *("--cluster-config-file", str(workdir / f"nodes-{port}.conf")),
            *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
            *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
        ]
        log = workdir / f"redis-{port}.log"
        return cls(port, bus_port, _spawn(argv, log), argv, log, tls)

    def restart(self) -> None:
        """Start the killed node again: it rejoins (from its nodes.conf) as a replica."""
        self.kill()
        self.proc = _spawn(self.argv, self.log)
        _wait_for(lambda: _pings(self.port, self.tls), f"redis node {self.port} to restart")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class RedisClusterServers:
    """The running nodes; ``url`` is the ``redis+cluster://`` URL naming every master."""

    workdir: Path
    nodes: list[ClusterNode] = field(default_factory=list)
    replicas: int = 0
    tls: Pki | None = None

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:...``, or ``rediss+cluster://127.0.0.1:...`` with TLS."""
        return self.url_for()

    def url_for(self, host: str = "127.0.0.1", scheme: str | None = None) -> str:
        scheme = scheme or ("rediss+cluster" if self.tls else "redis+cluster")
        hosts = ",".join(f"{host}:{node.port}" for node in self.nodes if node.alive)
        return f"{scheme}://{hosts}"

    def start(self, masters: int = 3, replicas: int = 1) -> None:
        count = masters * (1 + replicas)
        for _ in range(count):
            node = ClusterNode.launch(_free_port(), _free_port(), self.workdir, self.tls)
            self.nodes.append(node)
        for node in self.nodes:
            _wait_for(lambda node=node: _pings(node.port, self.tls), f"redis node {node.port}")
        create = subprocess.run(
            [
                *("redis-cli", *_cli_tls(self.tls), "--cluster", "create"),
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout!r}")
        _wait_for(self.healthy, "the cluster to be ok on every node")
        _wait_for(lambda: self.replicated(replicas), "every master's replicas to be in sync")
        self.replicas = replicas

    def replicated(self, replicas: int | None = None) -> bool:
        """Every master has ``replicas`` replicas online (synced and streaming)."""
        want = self.replicas if replicas is None else replicas
        for node in self.masters():
            client = _client(node.port, self.tls)
            try:
                info = client.info("replication")
            except redis.RedisError:
                return False
            finally:
                client.close()
            online = [
                value
                for name, value in info.items()
                if name.startswith("slave")
                and isinstance(value, dict)
                and value.get("state") == "online"
            ]
            if len(online) < want:
                return False
        return True

    @contextmanager
    def node_timeout(self, ms: int) -> Iterator[None]:
        """Run with every live node's ``cluster-node-timeout`` at ``ms``, then put it back."""
        self._set_node_timeout(ms)
        try:
            yield
        finally:
            self._set_node_timeout(NODE_TIMEOUT_MS)

    def _set_node_timeout(self, ms: int) -> None:
        for node in self.nodes:
            if node.alive:
                client = _client(node.port, self.tls)
                try:
                    client.config_set("cluster-node-timeout", ms)
                finally:
                    client.close()

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok and sees all 16384 slots assigned."""
        for node in self.nodes:
            if not node.alive:
                continue
            client = _client(node.port, self.tls)
            try:
                info = client.cluster("info")
            except redis.RedisError:
                return False
            finally:
                client.close()
            if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                return False
        alive = {node.port for node in self.nodes if node.alive}
        return all(node.port in alive for node in self.masters())

    def master_of(self, key: str) -> ClusterNode:
        """The live node that currently serves ``key``'s slot."""
        for node in self.nodes:
            if not node.alive:
                continue
            client = _client(node.port, self.tls)
            try:
                slot = int(client.cluster("keyslot", key))
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(n for n in self.nodes if n.port == port)
            finally:
                client.close()
        raise RuntimeError("no live node")

    def role(self, node: ClusterNode) -> str:
        client = _client(node.port, self.tls)
        try:
            return str(client.execute_command("ROLE")[0].decode())
        finally:
            client.close()

    def masters(self) -> list[ClusterNode]:
        ports: set[int] = set()
        for node in self.nodes:
            if not node.alive:
                continue
            client = _client(node.port, self.tls)
            try:
                for _start, _end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    ports.add(int(master[1]))
            finally:
                client.close()
            break
        return [n for n in self.nodes if n.port in ports]

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def _listen(port: int, tls: Pki | None) -> list[str]:
    """Where a node listens: its plain port on 127.0.0.1, or (TLS) its TLS port alone on
    127.0.0.1 and 127.0.0.2, bus and replication in TLS too, clients asked for a certificate."""
    if tls is None:
        return ["--port", str(port), "--bind", "127.0.0.1"]
    return [
        *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1 127.0.0.2"),
        *("--cluster-announce-ip", "127.0.0.1"),
        *("--tls-cluster", "yes", "--tls-replication", "yes"),
        *("--tls-cert-file", str(tls.cluster_cert), "--tls-key-file", str(tls.cluster_key)),
        *("--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "yes"),
    ]


def _cli_tls(tls: Pki | None) -> list[str]:
    if tls is None:
        return []
    return [
        "--tls",
        "--cacert",
        str(tls.ca),
        "--cert",
        str(tls.client_cert),
        "--key",
        str(tls.client_key),
    ]


def _client(port: int, tls: Pki | None, timeout: float = 2) -> redis.Redis:
    """A plain client of one node (verifying TLS, with the client certificate, on a TLS one)."""
    options: dict[str, Any] = {}
    if tls is not None:
        options = {
            "ssl": True,
            "ssl_ca_certs": str(tls.ca),
            "ssl_certfile": str(tls.client_cert),
            "ssl_keyfile": str(tls.client_key),
        }
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout, **options)


def _pings(port: int, tls: Pki | None = None) -> bool:
    client = _client(port, tls, timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _wait_for(check: object, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def installed() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None
