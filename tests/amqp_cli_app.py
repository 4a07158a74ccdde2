"""The app tests/test_amqp.py runs in real ``aioqueue worker`` subprocesses over RabbitMQ.

Broker, backend and key prefix come from ``AIOQUEUE_BROKER_URL``, ``AIOQUEUE_RESULT_BACKEND``,
``AIOQUEUE_KEY_PREFIX`` (and ``AIOQUEUE_AMQP_QUEUE_TYPE``, ``AIOQUEUE_AMQP_DELIVERY_LIMIT``),
which the test puts in the worker's environment; the test builds its own App with
:func:`make_app` so both sides register the same task names.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from aioqueue import App


def make_app(**config: Any) -> App:
    app = App("amqp-cli", **config)

    @app.task(name="amqp_cli_app.hang_once")
    async def hang_once(marker: str) -> str:
        """First run: leave a marker and hang (the test SIGKILLs the worker); then succeed."""
        runs = await asyncio.to_thread(_bump, Path(marker))
        if runs == 1:
            await asyncio.sleep(3600)
        return f"ran {runs} times"

    @app.task(name="amqp_cli_app.crash")
    async def crash() -> None:
        """A poison message: kills whichever worker runs it."""
        os.kill(os.getpid(), signal.SIGKILL)

    return app


def _bump(path: Path) -> int:
    """Count a run in ``path``. Written whole, then renamed into place: the test kills the
    worker as soon as the file exists, which must not leave it empty for the next run."""
    runs = int(path.read_text()) + 1 if path.exists() else 1
    partial = path.with_name(path.name + ".partial")
    partial.write_text(str(runs))
    partial.replace(path)
    return runs


app = make_app()
