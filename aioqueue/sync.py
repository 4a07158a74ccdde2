"""Sending from synchronous code (Django views, Flask, scripts): ``add.send_sync(2, 3)``.

Each App gets one event loop on a daemon thread in this process, started on the first sync call
and shared by every thread: the app's connections live on that loop, so threads share one
connection pool and a send costs a hop to that thread, not a new connection. The loop closes the
app at interpreter exit. After ``os.fork()`` (gunicorn and uwsgi pre-fork workers) the child
forgets the parent's loop and connections without touching them (their sockets belong to the
parent) and builds its own on first use.

A sync call from inside a running event loop would block that loop until the send is done, and
deadlock it if the loop is the one the send needs: it raises :class:`SyncCallInEventLoop`
instead, pointing to ``await ...send(...)``.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import AioQueueError

if TYPE_CHECKING:
    from .app import App
    from .control import RevokeReport
    from .result import AsyncResult

__all__ = ["SyncCallInEventLoop", "SyncResult", "run_sync", "sync_client"]

R = TypeVar("R")
T = TypeVar("T")

_CLOSE_TIMEOUT = 5.0


class SyncCallInEventLoop(AioQueueError, RuntimeError):
    """Raised by a ``*_sync`` call made where an event loop is running: use ``await`` there."""


class SyncClient:
    """One App's event loop thread; ``run`` executes a coroutine on it and waits."""

    def __init__(self, app: App) -> None:
        self.pid = os.getpid()
        """The process that made it: in another (a fork), it is the parent's and unusable."""
        self.origin = app
        self.app = _twin(app)
        """What runs on this loop: ``app``'s settings, tasks and memory transports with
        connections of its own (the app's may belong to another loop, a web app's, say)."""
        self.connected = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name=f"aioqueue-sync-{app.name}", daemon=True
        )
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once closed (a send would wait forever on a stopped loop)."""
        return self._thread.is_alive() and not self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: do not leave it running
            raise

    def close(self) -> None:
        """Close the app's connections on the loop, then stop the loop and its thread."""
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.app.close(), self.loop)
        try:
            future.result(_CLOSE_TIMEOUT)
        except Exception:  # at exit, a broker that is gone must neither hang nor raise
            future.cancel()
        self.stop()

    def stop(self) -> None:
        """Stop the loop and its thread, leaving the app's connections as they are."""
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()


def _twin(app: App) -> App:
    """A shallow copy of ``app`` that shares everything but its network connections.

    Connections are bound to the event loop that opened them: the app's own may be serving an
    ASGI app's loop while a sync view (run on a thread) sends. Memory transports are built
    first so that the copy shares them (they *are* the queue); broker or backend instances
    passed to ``App(...)`` are shared as given.
    """
    _ = app.broker, app.backend
    twin = copy.copy(app)
    twin.forget_connections()
    return twin


_clients: weakref.WeakKeyDictionary[App, SyncClient] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def sync_client(app: App) -> SyncClient:
    """The app's client in this process, started and connected on first use (one per app,
    thread-safe). Connecting up front also starts listening for results, which ``rpc://``
    needs before a send for its reply to be waited for."""
    client = _clients.get(app)
    if client is None or not client.connected or not client.alive or client.pid != os.getpid():
        if client is not None and client.pid != os.getpid():
            _forget_after_fork()  # forked where the at-fork hook did not run (a C-level fork)
        with _lock:
            client = _clients.get(app)
            if client is None or not client.alive:  # none yet, or closed: a new one
                client = _clients[app] = SyncClient(app)
            if not client.connected:
                client.run(client.app.connect())  # raises (and is tried again next call) if down
                client.connected = True
    return client


def discard(app: App) -> None:
    """Forget the app's sync client and stop its loop thread without closing the app: the
    test harness does this when a test ends, as the connections were its memory ones."""
    with _lock:
        client = _clients.pop(app, None)
    if client is not None:
        client.stop()


def _refuse_in_event_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise SyncCallInEventLoop(
        f"{what} was called inside a running event loop, which it would block: use the async "
        f"form there (await task.send(...), await result.get(...))"
    )


def run_sync(
    app: App, what: str, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any
) -> T:
    """``await fn(*args, **kwargs)`` on the app's loop thread, from sync code; ``what`` names
    the call in the error raised inside an event loop."""
    _refuse_in_event_loop(what)
    return sync_client(app).run(fn(*args, **kwargs))


def _call_sync(app: App, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """``await twin.method(...)`` with the loop thread's twin of ``app`` (its connections)."""
    _refuse_in_event_loop(what)
    client = sync_client(app)
    return client.run(getattr(client.app, method)(*args, **kwargs))


def send_sync(app: App, what: str, method: str, *args: Any, **kwargs: Any) -> SyncResult[Any]:
    """Send with ``App.<method>`` (``send_message``, ``send_task``) from sync code."""
    return SyncResult(app, _call_sync(app, what, method, *args, **kwargs))


def send_many_sync(app: App, what: str, method: str, *args: Any) -> list[SyncResult[Any]]:
    return [SyncResult(app, result) for result in _call_sync(app, what, method, *args)]


def result_by_id(app: App, task_id: str) -> SyncResult[Any]:
    """A handle on ``task_id`` whose reads use the loop thread's twin of ``app``."""
    _refuse_in_event_loop("app.SyncResult()")
    return SyncResult(app, sync_client(app).app.AsyncResult(task_id))


class SyncResult(Generic[R]):
    """A blocking handle on a sent task: :class:`~aioqueue.AsyncResult`'s reads, run on the
    app's loop thread, with the same values and the same errors."""

    __slots__ = ("_origin", "async_result")

    def __init__(self, app: App, async_result: AsyncResult[R]) -> None:
        self._origin = app
        self.async_result = async_result

    @property
    def id(self) -> str:
        return self.async_result.id

    @property
    def task_name(self) -> str | None:
        return self.async_result.task_name

    def _run(self, what: str, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        return run_sync(self._origin, f"SyncResult.{what}()", fn, *args)

    def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Block until the outcome; raises as ``AsyncResult.get`` does (ResultTimeout, the
        task's own exception, TaskRevoked, ResultIgnored)."""
        return self._run("get", self.async_result.get, timeout, propagate)

    def state(self) -> str:
        return self._run("state", self.async_result.state)

    def ready(self) -> bool:
        return self._run("ready", self.async_result.ready)

    def successful(self) -> bool:
        return self._run("successful", self.async_result.successful)

    def failed(self) -> bool:
        return self._run("failed", self.async_result.failed)

    def info(self) -> Any:
        return self._run("info", self.async_result.info)

    def retries(self) -> int:
        return self._run("retries", self.async_result.retries)

    def traceback(self) -> str | None:
        return self._run("traceback", self.async_result.traceback)

    def revoke(self, terminate: bool = False) -> RevokeReport:
        return self._run("revoke", self.async_result.revoke, terminate)

    def forget(self) -> None:
        self._run("forget", self.async_result.forget)

    def __repr__(self) -> str:
        return f"<SyncResult {self.id} task={self.task_name!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


def _close_all() -> None:
    pid = os.getpid()
    for client in list(_clients.values()):
        if client.pid == pid:  # never a parent's, in a child that exits
            client.close()


def _forget_after_fork() -> None:
    """In a forked child: the parent's loop thread does not exist here and its connections
    are the parent's; drop both without closing anything, so first use builds new ones."""
    global _lock
    _lock = threading.Lock()  # it may have been held by a thread that is not in the child
    from . import app as app_module

    app_module._BUILDING = threading.RLock()  # the same, for the lazy broker/backend build
    here = os.getpid()
    stale = [(app, client) for app, client in _clients.items() if client.pid != here]
    for app, client in stale:  # after a real fork: all of them (each was made in the parent)
        del _clients[app]
        client.app.forget_connections()


atexit.register(_close_all)
os.register_at_fork(after_in_child=_forget_after_fork)
