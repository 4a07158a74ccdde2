"""Where sync tasks run: a thread pool bounded by an anyio limiter, or a pool of child processes.

Process children are fresh interpreters (``python -m aioqueue.worker.child module:app``) that
import the app themselves and run tasks by registered name: no function is pickled, and a child
is as clean as a worker started by hand. They talk to the worker over their stdin/stdout with
length-prefixed frames in the app's serializer (JSON by default). A child that dies mid-task
fails that task with :class:`WorkerLostError` and is replaced; one that has run
``max_tasks_per_child`` tasks is retired and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from ..context import Context, StateWriter
from ..errors import AioQueueError, ConfigurationError, Retry, WorkerLostError
from ..message import Outcome, States
from ..serializers import get_serializer

if TYPE_CHECKING:
    import anyio

    from ..app import App
    from ..task import Task

__all__ = ["ChildTaskError", "ProcessPool", "Runner"]

log = logging.getLogger("aioqueue.worker")

FRAME_HEADER = struct.Struct(">I")
CHILD_START_TIMEOUT = 60.0
SYS_PATH_ENV = "AIOQUEUE_CHILD_SYS_PATH"

RETRY_TYPE = f"{Retry.__module__}.{Retry.__qualname__}"

OnStart = Callable[[], Awaitable[None]]
"""Called once a thread or child is free to run the task (records STARTED)."""


class ChildTaskError(Exception):
    """A task raised in a child process; carries what the child reported about it."""

    def __init__(self, exc_type: str, message: str, args: list[Any], traceback: str) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.message = message
        self.exc_args = tuple(args)
        self.traceback = traceback

    def rebuild(self) -> BaseException:
        """The child's exception as an instance of its own type where possible (a Retry with
        its countdown and error), else RemoteError: for retry decisions and hooks."""
        from ..result import rebuild_exception

        if self.exc_type == RETRY_TYPE and len(self.exc_args) == 7:
            countdown, eta, max_retries, reason, inner_type, inner_message, inner_args = (
                self.exc_args
            )
            inner = None
            if inner_type is not None:
                inner = rebuild_exception(
                    Outcome(
                        "",
                        States.FAILURE,
                        exc_type=inner_type,
                        exc_message=inner_message,
                        exc_args=tuple(inner_args or ()),
                    )
                )
            return Retry(countdown, exc=inner, eta=eta, max_retries=max_retries, reason=reason)
        return rebuild_exception(self.outcome(""))

    def outcome(self, task_id: str) -> Outcome:
        return Outcome(
            task_id=task_id,
            state=States.FAILURE,
            exc_type=self.exc_type,
            exc_message=self.message,
            exc_args=self.exc_args,
            traceback=self.traceback,
            date_done=time.time(),
        )


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class _Child:
    """One child interpreter and the pipe pair we talk to it through."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.tasks_done = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, payload: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(FRAME_HEADER.pack(len(payload)) + payload)
        await self.proc.stdin.drain()

    async def receive(self) -> bytes:
        assert self.proc.stdout is not None
        header = await self.proc.stdout.readexactly(FRAME_HEADER.size)
        (size,) = FRAME_HEADER.unpack(header)
        return await self.proc.stdout.readexactly(size)

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class ProcessPool:
    """A fixed number of child interpreters, each running one task at a time."""

    def __init__(
        self,
        import_path: str,
        size: int,
        *,
        max_tasks_per_child: int | None,
        serializer: str,
    ) -> None:
        if size < 1:
            raise ConfigurationError("a process pool needs at least one process")
        self.import_path = import_path
        self.size = size
        self.max_tasks_per_child = max_tasks_per_child
        self._serializer = get_serializer(serializer)
        self._idle: asyncio.Queue[_Child] = asyncio.Queue()
        self._children: set[_Child] = set()
        self._spawners: set[asyncio.Task[None]] = set()
        self._started: asyncio.Task[None] | None = None
        self._closing = False

    async def _ensure_started(self) -> None:
        """Start every child on the first process task, so a worker that never runs one
        never pays their memory; concurrent first callers share the one start-up."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start_all())
        try:
            await asyncio.shield(self._started)
        except ConfigurationError:
            self._started = None  # the next process task tries again
            raise

    async def _start_all(self) -> None:
        children = await asyncio.gather(
            *(self._spawn() for _ in range(self.size)), return_exceptions=True
        )
        failures = [c for c in children if isinstance(c, BaseException)]
        for child in children:
            if isinstance(child, _Child):
                self._idle.put_nowait(child)
        if failures and len(failures) == len(children):
            raise failures[0]
        for failure in failures:
            log.error("a process-pool child failed to start: %s", failure)

    async def _spawn(self) -> _Child:
        env = dict(os.environ)
        env[SYS_PATH_ENV] = orjson.dumps([p for p in sys.path if p]).decode()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aioqueue.worker.child",
            self.import_path,
            self._serializer.name,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        child = _Child(proc)
        self._children.add(child)
        try:
            async with asyncio.timeout(CHILD_START_TIMEOUT):
                hello = self._serializer.loads(await child.receive())
        except (asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
            child.kill()
            await proc.wait()
            self._children.discard(child)
            raise ConfigurationError(
                f"process-pool child could not import {self.import_path!r} "
                f"({_describe_exit(proc.returncode)}); see its stderr above"
            ) from exc
        if hello != ["ready"]:
            child.kill()
            self._children.discard(child)
            raise ConfigurationError(f"process-pool child sent {hello!r} instead of ready")
        return child

    def _replace(self, child: _Child) -> None:
        self._children.discard(child)
        if self._closing:
            return
        spawner = asyncio.get_running_loop().create_task(self._respawn())
        self._spawners.add(spawner)
        spawner.add_done_callback(self._spawners.discard)

    async def _respawn(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                self._idle.put_nowait(await self._spawn())
                return
            except ConfigurationError as exc:
                log.error("replacing a process-pool child failed: %s; retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run(
        self,
        task_name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_start: OnStart | None = None,
        context: dict[str, Any] | None = None,
        on_state: StateWriter | None = None,
    ) -> Any:
        """Run a registered task in a child; raises ChildTaskError or WorkerLostError.

        ``on_state`` stores the states a bound task reports while it runs (in order, each
        before the next frame is read), so they all land before its outcome.
        """
        frame: list[Any] = [task_name, list(args), kwargs]
        if context is not None:
            frame.append(context)
        payload = self._serializer.dumps(frame)
        await self._ensure_started()
        child = await self._idle.get()
        try:
            if on_start is not None:
                await on_start()
            await child.send(payload)
            kind, *rest = self._serializer.loads(await child.receive())
            while kind == "state":
                await self._forward_state(task_name, on_state, rest)
                kind, *rest = self._serializer.loads(await child.receive())
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError) as exc:
            returncode = await child.proc.wait()
            self._replace(child)
            raise WorkerLostError(
                f"process-pool child pid {child.pid} died ({_describe_exit(returncode)}) "
                f"while running {task_name}"
            ) from exc
        except asyncio.CancelledError:
            child.kill()  # it may be mid-task: the only way to stop it is to end it
            self._replace(child)
            raise
        self._finished(child)
        if kind == "ok":
            return rest[0]
        raise ChildTaskError(*rest)

    @staticmethod
    async def _forward_state(
        task_name: str, on_state: StateWriter | None, frame: list[Any]
    ) -> None:
        """A state is advice: one that cannot be stored is logged, the task goes on."""
        if on_state is None:
            return
        state, meta = frame
        try:
            await on_state(state, meta)
        except AioQueueError as exc:
            log.warning("could not record state %r of %s: %s", state, task_name, exc)

    def _finished(self, child: _Child) -> None:
        child.tasks_done += 1
        if self.max_tasks_per_child and child.tasks_done >= self.max_tasks_per_child:
            self._retire(child)
            self._replace(child)
        else:
            self._idle.put_nowait(child)

    def _retire(self, child: _Child) -> None:
        if child.proc.stdin is not None and not child.proc.stdin.is_closing():
            child.proc.stdin.close()  # EOF: the child finishes and exits 0

    @property
    def children(self) -> int:
        return len(self._children)

    def begin_close(self) -> None:
        """From now on a child that ends is not replaced (shutdown is cancelling tasks)."""
        self._closing = True

    async def aclose(self) -> None:
        self._closing = True
        if self._started is not None and not self._started.done():
            self._started.cancel()
            await asyncio.wait({self._started})
        for spawner in list(self._spawners):
            spawner.cancel()
        for child in list(self._children):
            self._retire(child)
        for child in list(self._children):
            try:
                async with asyncio.timeout(5.0):
                    await child.proc.wait()
            except TimeoutError:
                child.kill()
                await child.proc.wait()
        self._children.clear()


class Runner:
    """Runs sync task functions on the thread limiter or in the process pool."""

    def __init__(
        self,
        app: App,
        *,
        threads: int | None,
        processes: int,
        max_tasks_per_child: int | None = None,
    ) -> None:
        self._app = app
        self._thread_count = threads or 40
        self._limiters: tuple[anyio.CapacityLimiter, anyio.CapacityLimiter] | None = None
        self._processes = processes
        self._max_tasks_per_child = max_tasks_per_child
        self._pool: ProcessPool | None = None
        self._threads_running = 0
        self._count_lock = threading.Lock()

    @property
    def threads_running(self) -> int:
        """Thread tasks whose function is running right now, awaited or abandoned.

        Counted by the threads themselves, so a task whose awaiting coroutine was cancelled
        (shutdown past its grace period) counts until its function returns, and anyio's idle
        pool threads never count. The CLI leaves through ``os._exit`` only when this is > 0.
        """
        return self._threads_running

    def _counted(self, call: Callable[[], Any]) -> Any:
        """Runs in the worker thread: the count covers exactly the function's run."""
        with self._count_lock:
            self._threads_running += 1
        try:
            return call()
        finally:
            with self._count_lock:
                self._threads_running -= 1

    async def start(self) -> None:
        """Check the process pool can be built; its children start with the first task."""
        needs_pool = any(t.executor == "process" for t in self._app.tasks.values())
        if needs_pool and self._processes < 1:
            raise ConfigurationError("the app has process tasks: processes must be at least 1")
        if needs_pool:
            self._pool = ProcessPool(
                self._app.resolve_import_path(),
                self._processes,
                max_tasks_per_child=self._max_tasks_per_child,
                serializer=self._app.conf.serializer,
            )

    async def run_in_thread(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_start: OnStart | None = None,
    ) -> Any:
        # anyio copies contextvars into the thread; abandon_on_cancel lets a shutdown whose
        # grace period ran out stop waiting for a thread that cannot be interrupted.
        import anyio.to_thread  # with the first thread task: a worker without one never loads anyio

        if self._limiters is None:
            # The gate bounds how many tasks run in threads; anyio's limiter under it is sized
            # to match so it never queues on its own, and the gate lets us record STARTED.
            self._limiters = (
                anyio.CapacityLimiter(self._thread_count),
                anyio.CapacityLimiter(self._thread_count),
            )
        gate, threads = self._limiters
        call = partial(self._counted, partial(fn, *args, **kwargs))
        async with gate:
            if on_start is not None:
                await on_start()
            return await anyio.to_thread.run_sync(call, limiter=threads, abandon_on_cancel=True)

    async def run_in_process(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_start: OnStart | None = None,
        context: dict[str, Any] | None = None,
        on_state: StateWriter | None = None,
    ) -> Any:
        """``context``: a bound task's Context as plain values (the child rebuilds it);
        ``on_state`` stores the states it reports."""
        if self._pool is None:  # Task.apply: eager runs use a thread, see execute_eagerly
            if context is not None:
                args = (Context(**context, update=on_state), *args)
            return await self.run_in_thread(task.fn, args, kwargs, on_start)
        return await self._pool.run(task.name, args, kwargs, on_start, context, on_state)

    @property
    def process_children(self) -> int:
        """Live process-pool children (0 before the first process task starts them)."""
        return 0 if self._pool is None else self._pool.children

    def begin_close(self) -> None:
        if self._pool is not None:
            self._pool.begin_close()

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
