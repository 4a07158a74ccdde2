"""Real ``aioqueue worker`` subprocesses for integration tests: start, wait ready, signal, end.

Every worker runs ``python -m aioqueue.cli worker cli_app:app ...`` with its stdout and stderr
in files (shown when a wait fails). Readiness is the worker's own "consuming" log line, which
it writes once its heartbeat key exists and its process pool is up. :class:`WorkerSet` ends
every process it started, by pid, together with that worker's process-pool children.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
APP_PATH = "cli_app:app"
READY_LINE = re.compile(r"worker (\S+) consuming ")


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a /proc scan: no psutil, no pgrep)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited while we looked
        # "pid (comm) state ppid ...": comm may hold spaces or parentheses, so split after ")".
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def is_pool_child(pid: int) -> bool:
    """True while ``pid`` is a live aioqueue process-pool child (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return b"aioqueue.worker.child" in cmdline and stat.rpartition(")")[2].split()[0] != "Z"


class WorkerProcess:
    """One worker subprocess and the files its output goes to."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, log_dir: Path) -> None:
        self.proc = proc
        self.name = name
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        self.worker_id: str | None = None
        self.pool_children: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def output(self) -> str:
        """Both streams, for assertion messages."""
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        return (
            f"--- {self.name} (pid {self.pid}) stdout ---\n{out}\n--- stderr ---\n{self.stderr()}"
        )

    def children(self) -> list[int]:
        """Current children (the process pool); remembered so teardown can end orphans too."""
        pids = children_of(self.pid)
        self.pool_children.update(pids)
        return pids

    def send_signal(self, signum: int) -> None:
        self.children()  # note the pool before the worker can die and orphan it
        os.kill(self.pid, signum)

    async def wait_for_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Poll the stderr file (with a deadline) until ``pattern`` matches; fail on early exit."""
        regex = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            match = regex.search(self.stderr())
            if match is not None:
                return match
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"worker exited ({self.proc.returncode}) before logging {pattern!r}\n"
                    + self.output()
                )
            if loop.time() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout}s\n" + self.output())
            await asyncio.sleep(0.02)

    async def wait_ready(self, timeout: float = 20.0) -> str:
        """Wait for the "consuming" line; returns the worker id it names."""
        match = await self.wait_for_log(READY_LINE.pattern, timeout)
        self.worker_id = match.group(1)
        self.children()
        return self.worker_id

    async def wait_exit(self, timeout: float) -> int:
        """The exit code, or AssertionError (with the output) if still running at the deadline."""
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(
                f"worker still running {timeout}s later\n" + self.output()
            ) from None

    async def end(self) -> None:
        """SIGKILL the worker if it still runs, reap it, then end any pool child it orphaned."""
        self.children()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        await self.proc.wait()
        # Orphaned idle children see EOF on stdin and exit by themselves: give them a second,
        # then end whichever is still busy in a task.
        for _ in range(20):
            if not any(is_pool_child(pid) for pid in self.pool_children):
                return
            await asyncio.sleep(0.05)
        for pid in self.pool_children:
            if is_pool_child(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class WorkerSet:
    """Starts workers for one test and ends all of them (see :meth:`close`)."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []

    async def start(
        self,
        *args: str,
        name: str | None = None,
        app_path: str = APP_PATH,
        ready: bool = True,
        subcommand: str = "worker",
    ) -> WorkerProcess:
        """Start ``aioqueue worker <app_path> <args>`` (or another ``subcommand``, such as
        ``beat``); by default wait until it consumes."""
        name = name or f"worker{len(self.workers)}"
        command: Sequence[str] = [
            sys.executable,
            "-m",
            "aioqueue.cli",
            subcommand,
            app_path,
            *args,
        ]
        stdout_path = self.log_dir / f"{name}.stdout"
        stderr_path = self.log_dir / f"{name}.stderr"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *command,
                cwd=TESTS_DIR,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        worker = WorkerProcess(proc, name, self.log_dir)
        self.workers.append(worker)
        if ready:
            await worker.wait_ready()
        return worker

    async def close(self) -> None:
        for worker in self.workers:
            await worker.end()


def worker_env(redis_url: str, key_prefix: str, **settings: str) -> dict[str, str]:
    """The environment of a worker: this interpreter's, plus the app's settings as AIOQUEUE_*."""
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("AIOQUEUE_"):
            del env[name]  # only what the test chooses
    pythonpath = [str(TESTS_DIR), str(REPO_DIR)]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    env.update(
        PYTHONPATH=os.pathsep.join(pythonpath),
        AIOQUEUE_BROKER_URL=redis_url,
        AIOQUEUE_RESULT_BACKEND=redis_url,
        AIOQUEUE_KEY_PREFIX=key_prefix,
        AIOQUEUE_WORKER_HEARTBEAT_INTERVAL="0.2",
        AIOQUEUE_WORKER_HEARTBEAT_TTL="1.0",
    )
    env.update({f"AIOQUEUE_{name.upper()}": value for name, value in settings.items()})
    return env
