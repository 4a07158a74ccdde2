"""Noticing a blocked event loop, from a thread, and naming the task that blocks it.

An ``async def`` task that calls ``time.sleep`` or crunches numbers stops every other task, the
fetches and the settles of the whole worker. Nothing on the loop can report that while it
happens, so a small daemon thread watches a timestamp the loop refreshes; when it goes stale, the
thread looks at the loop thread's current stack (``sys._current_frames``, CPython's documented
introspection hook) for the code of a registered task and logs its name.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import Any

__all__ = ["LoopWatchdog"]

log = logging.getLogger("aioqueue.worker")


def _code_of(fn: Any) -> CodeType | None:
    while True:
        inner = getattr(fn, "func", None) or getattr(fn, "__wrapped__", None)
        if inner is None:
            break
        fn = inner
    code = getattr(fn, "__code__", None)
    if code is None:
        code = getattr(getattr(fn, "__call__", None), "__code__", None)  # noqa: B004
    return code if isinstance(code, CodeType) else None


class LoopWatchdog:
    """Warns (at most once per ``threshold`` seconds of a stall) while the loop does not turn."""

    def __init__(self, tasks: Iterable[tuple[str, Any]], *, threshold: float) -> None:
        self.threshold = threshold
        self._codes: dict[CodeType, str] = {}
        for name, fn in tasks:
            code = _code_of(fn)
            if code is not None:
                self._codes[code] = name
        self._last_tick = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread = threading.get_ident()
        self._handle: asyncio.TimerHandle | None = None
        self.stalls = 0
        """Warnings logged so far (tests read it)."""

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tick(loop)
        self._thread = threading.Thread(
            target=self._watch, name="aioqueue-loop-watchdog", daemon=True
        )
        self._thread.start()

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._last_tick = time.monotonic()
        self._handle = loop.call_later(self.threshold / 4, self._tick, loop)

    def _watch(self) -> None:
        warned_at = 0.0
        while not self._stop.wait(self.threshold / 4):
            now = time.monotonic()
            stalled = now - self._last_tick
            if stalled < self.threshold:
                warned_at = 0.0
                continue
            if warned_at and now - warned_at < self.threshold:
                continue
            warned_at = now
            self.stalls += 1
            log.warning(
                "the event loop has been blocked for %.1fs by %s: an async task must not block "
                "(await instead, or register it with executor='thread' or 'process'); fetches, "
                "settles and other tasks wait meanwhile",
                stalled,
                self._culprit(),
            )

    def _culprit(self) -> str:
        frame: FrameType | None = sys._current_frames().get(self._loop_thread)
        innermost = frame
        while frame is not None:
            name = self._codes.get(frame.f_code)
            if name is not None:
                return f"task {name} (line {frame.f_lineno})"
            frame = frame.f_back
        if innermost is None:
            return "unknown code"
        code = innermost.f_code
        return f"code outside any task ({code.co_filename}:{innermost.f_lineno} in {code.co_name})"

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
