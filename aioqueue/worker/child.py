"""A process-pool child: ``python -m aioqueue.worker.child module:app serializer``.

It imports the app itself, says ``["ready"]``, then runs one task per frame read from stdin and
answers ``["ok", value]`` or ``["err", type, message, args, traceback]`` on the real stdout.
File descriptor 1 is pointed at stderr first, so a task that prints cannot corrupt the frames.
EOF on stdin means "retire": the child exits 0.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
import traceback
from typing import Any, BinaryIO

import orjson

from ..serializers import Serializer, get_serializer
from .executors import FRAME_HEADER, SYS_PATH_ENV

__all__ = ["main"]


def _read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None
    (size,) = FRAME_HEADER.unpack(header)
    data = stream.read(size)
    return data if len(data) == size else None


def _write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(FRAME_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _error_reply(serializer: Serializer, exc: BaseException) -> bytes:
    exc_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        orjson.dumps(exc.args)
        args: list[Any] = list(exc.args)
    except TypeError:
        args = [str(exc)]
    text = "".join(traceback.format_exception(exc))
    return serializer.dumps(["err", exc_type, str(exc), args, text])


def _run_one(app: Any, serializer: Serializer, frame: bytes) -> bytes:
    try:
        name, args, kwargs = serializer.loads(frame)
        fn = app.get_task(name).fn
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            raise TypeError(f"process task {name} returned an awaitable; make it a plain function")
        return serializer.dumps(["ok", value])
    except Exception as exc:
        return _error_reply(serializer, exc)


def _die_with_parent() -> None:
    """On Linux, ask the kernel to SIGKILL us when the worker dies (even by SIGKILL).

    Otherwise a child mid-task would keep running it while the broker redelivers the message
    to another worker, and the task would run twice at the same time.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before we asked
        os._exit(1)


def main() -> None:
    import_path, serializer_name = sys.argv[1], sys.argv[2]
    # Ctrl-C and a service manager's SIGTERM reach the whole process group; the parent decides
    # how its children stop (EOF on stdin, or a kill), so a draining task is not cut short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    extra_path = orjson.loads(os.environ.get(SYS_PATH_ENV, "[]"))
    sys.path[:0] = [p for p in extra_path if p not in sys.path]
    frames_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    frames_in = sys.stdin.buffer

    from ..loader import load_app

    app = load_app(import_path)
    serializer = get_serializer(serializer_name)
    _write_frame(frames_out, serializer.dumps(["ready"]))
    while (frame := _read_frame(frames_in)) is not None:
        _write_frame(frames_out, _run_one(app, serializer, frame))


if __name__ == "__main__":
    main()
