"""A process-pool child: ``python -m aioqueue.worker.child module:app serializer``.

It imports the app itself, says ``["ready"]``, then runs one task per frame read from stdin and
answers ``["ok", value]`` or ``["err", type, message, args, traceback]`` on the real stdout. A
bound task's ``ctx.update_state_blocking`` sends ``["state", state, meta]`` frames before the
answer; the worker stores each one as it comes (the child does not wait for that).
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

from ..context import Context
from ..errors import Retry
from ..masking import wrap_secrets
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


def _type_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _json_args(exc: BaseException) -> list[Any]:
    try:
        orjson.dumps(exc.args)
        return list(exc.args)
    except TypeError:
        return [str(exc)]


def _error_reply(serializer: Serializer, exc: BaseException) -> bytes:
    args = _json_args(exc)
    if isinstance(exc, Retry):  # the parent rebuilds it: ChildTaskError.rebuild
        inner = exc.exc
        args = [
            exc.countdown,
            exc.eta,
            exc.max_retries,
            exc.reason,
            None if inner is None else _type_name(inner),
            None if inner is None else str(inner),
            None if inner is None else _json_args(inner),
        ]
    text = "".join(traceback.format_exception(exc))
    return serializer.dumps(["err", _type_name(exc), str(exc), args, text])


def _run_one(app: Any, serializer: Serializer, frame: bytes, frames_out: BinaryIO) -> bytes:
    def send_state(state: str, meta: Any) -> None:
        _write_frame(frames_out, serializer.dumps(["state", state, meta]))

    try:
        name, args, kwargs, *context = serializer.loads(frame)
        task = app.get_task(name)
        fn = task.fn
        if task.arguments is not None:  # typed hints: the frame is JSON, rebuild them here too
            args, kwargs = task.arguments.apply(tuple(args), kwargs)
        if task.secret_params:  # the frame carried plain values (JSON has no wrapper)
            args, kwargs = wrap_secrets(task, tuple(args), kwargs)
        if context:  # a bound task: its Context first, its states sent to the worker
            args = [Context(**context[0], update_blocking=send_state), *args]
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
        _write_frame(frames_out, _run_one(app, serializer, frame, frames_out))


if __name__ == "__main__":
    main()
