"""Example servers and workers started for real (subprocesses) by the example tests, once per
module: each waits until it answers (a port, or the worker's "consuming" line), keeps its
output in files shown when a wait fails, and is ended by its own pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import redis
from conftest import REDIS_URL, free_port
from prefixes import new_prefix

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


class Process:
    """One subprocess with stdout and stderr in files under ``log_dir``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        log_dir: Path,
    ) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                list(argv), cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=err
            )

    def output(self) -> str:
        out = self.stdout_path.read_text(errors="replace")
        err = self.stderr_path.read_text(errors="replace")
        return f"--- {self.name} (pid {self.proc.pid}) stdout ---\n{out}\n--- stderr ---\n{err}"

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited before {what}\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} in {START_TIMEOUT}s\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (a worker drains, a server shuts down), SIGKILL if it hangs; by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_worker(
    app_path: str,
    *,
    cwd: Path,
    env: Mapping[str, str],
    log_dir: Path,
    concurrency: int = 10,
) -> Process:
    """``aioqueue worker app_path``, ready once it logs that it consumes."""
    argv = [sys.executable, "-m", "aioqueue.cli", "worker", app_path, "-c", str(concurrency)]
    worker = Process("worker", [*argv, "--processes", "1"], cwd=cwd, env=env, log_dir=log_dir)
    worker.wait_for(lambda: " consuming " in worker.stderr_path.read_text(), "consuming line")
    return worker


def start_server(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    cwd: Path,
    env: Mapping[str, str],
    log_dir: Path,
) -> Process:
    """A web server, ready once its port accepts connections."""
    server = Process(name, argv, cwd=cwd, env=env, log_dir=log_dir)
    server.wait_for(lambda: port_open(port), f"listening on port {port}")
    return server


def delete_prefixed_sync(prefix: str) -> None:
    """The test Redis keys under ``prefix``, deleted (no event loop needed)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


__all__ = [
    "ROOT",
    "Process",
    "delete_prefixed_sync",
    "free_port",
    "new_prefix",
    "port_open",
    "start_server",
    "start_worker",
]
