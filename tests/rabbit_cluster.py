"""A private three-node RabbitMQ cluster on this machine, for the cluster tests (issue 16).

Each node has its own node name (``aqc<N>-<id>@localhost``), AMQP and distribution ports, data,
log and config files under one temporary directory, no plugins (so no management listener), and
the same Erlang cookie (a ``HOME`` of the cluster's own with its ``.erlang.cookie``, which the
nodes and ``rabbitmqctl`` both read). Nodes are started as subprocesses we own (``rabbitmq-server``
in the foreground, its own session), the second and third joined to the first with ``rabbitmqctl
stop_app; join_cluster; start_app``, and stopped by ``rabbitmqctl stop`` then SIGKILL of exactly
the pids started here. The shared node (rabbit@localhost, port 5672) is never addressed: every
``rabbitmqctl`` call names its node with ``-n``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
START_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


class Node:
    """One node of the cluster: its name, ports and the subprocess that runs it."""

    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        self.cluster = cluster
        self.name = f"aqc{index}-{cluster.id}@localhost"
        self.port = _free_port()
        self.dist_port = _free_port()
        self.dir = cluster.dir / f"node{index}"
        self.dir.mkdir()
        self.config = self.dir / "rabbitmq.conf"
        self.config.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # a node that lost its peers keeps serving what it can (the quorum queues decide
            # for themselves); pause_minority would stop the listener of a lone node
            "cluster_partition_handling = ignore\n"
            # a small machine shared with other test runs: do not block publishers on memory/disk
            "vm_memory_high_watermark.relative = 0.9\n"
            "disk_free_limit.absolute = 1MB\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        self.pid_file = self.dir / "node.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.cluster.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
        }

    def start(self) -> None:
        with (self.dir / "stdout").open("wb") as out:
            self.proc = subprocess.Popen(
                [SERVER],
                env=self.env,
                cwd=self.dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if not self.alive():
                raise AssertionError(f"{self.name} exited while starting\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not listen in {timeout}s\n{self.output()}")
            time.sleep(0.1)

    def ctl(self, *args: str, timeout: float = 120.0) -> str:
        """``rabbitmqctl -n <this node> ...`` with the cluster's cookie; its output."""
        done = subprocess.run(
            [CTL, "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl -n {self.name} {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def pids(self) -> list[int]:
        pids = [] if self.proc is None else [self.proc.pid]
        with contextlib.suppress(OSError, ValueError):
            pids.insert(0, int(self.pid_file.read_text().strip()))
        return pids

    def kill(self) -> None:
        """SIGKILL this node's processes (a crash, not a clean stop): only pids started here."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(Exception):
                self.ctl("stop", timeout=30)
        self.kill()

    def output(self) -> str:
        path = self.dir / "stdout"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


class RabbitCluster:
    """Three (``size``) private nodes joined into one cluster; see the module docstring."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.id = uuid.uuid4().hex[:6]
        self.dir = workdir
        self.home = workdir / "home"
        self.home.mkdir()
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        self.nodes = [Node(self, index) for index in range(1, size + 1)]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_listening()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        for node in self.nodes[1:]:
            node.wait_listening()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def url(self, nodes: list[Node] | None = None, vhost: str = "") -> str:
        """``amqp://guest:guest@127.0.0.1:P1,127.0.0.1:P2,.../`` over ``nodes`` (default all)."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in nodes or self.nodes)
        return f"amqp://guest:guest@{hosts}/{vhost}"

    def alive(self) -> list[Node]:
        return [node for node in self.nodes if node.alive()]

    def node_named(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def leader(self, queue: str) -> Node:
        """The node that leads the quorum of ``queue`` (``rabbitmqctl list_queues name leader``)."""
        asker = self.alive()[0]
        listing = asker.ctl("list_queues", "-q", "--no-table-headers", "name", "leader")
        for line in listing.splitlines():
            name, _, leader = line.strip().partition("\t")
            if name == queue:
                return self.node_named(leader.strip())
        raise AssertionError(f"no queue {queue!r} on the cluster")

    def running_nodes(self) -> str:
        return self.alive()[0].ctl("cluster_status")
