"""An app for tests/test_worker_exit.py: how a CLI worker process ends after thread tasks.

Its module registers an atexit handler, as Sentry or OpenTelemetry do to flush what they hold;
the handler appends a line to the file named by ``EXIT_APP_MARKER``. Broker, backend and key
prefix come from the ``AIOQUEUE_*`` variables the test sets.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from pathlib import Path

from aioqueue import App

app = App("exit-app")


def _flush() -> None:
    marker = os.environ.get("EXIT_APP_MARKER")
    if marker:
        with Path(marker).open("a") as out:
            out.write("atexit ran\n")


atexit.register(_flush)


@app.task
def in_thread(x: int, nap: float = 0.0) -> list[object]:
    """A plain function: runs on the worker's thread pool by default."""
    time.sleep(nap)
    return [x, threading.current_thread() is not threading.main_thread()]


@app.task
def stuck(started: str, seconds: float) -> None:
    """Say it started (by creating the file ``started``), then block its thread."""
    Path(started).touch()
    time.sleep(seconds)
