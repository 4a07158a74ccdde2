"""Plain functions for process-executor tests: children import this app to find them by name."""

from __future__ import annotations

import datetime
import decimal
import os
import time

from aioqueue import App, Context

app = App("process-tasks")


def square(x: int) -> int:
    return x * x


def whoami() -> int:
    return os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)


def die_if_first(marker: str) -> str:
    """Kill the child the first time (marker file absent), succeed the next time."""
    if not os.path.exists(marker):
        with open(marker, "w") as handle:
            handle.write(str(os.getpid()))
        os._exit(17)
    return "survived"


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def print_and_return(value: str) -> str:
    print("noise on stdout must not break the pipe protocol")
    return value


def days_between(start: datetime.date, amounts: list[decimal.Decimal]) -> decimal.Decimal:
    """Typed arguments rebuilt in the child: a date and Decimals, not their JSON strings."""
    assert isinstance(start, datetime.date) and all(isinstance(a, decimal.Decimal) for a in amounts)
    return sum(amounts, decimal.Decimal(0)) + (datetime.date(2026, 12, 1) - start).days


PROCESS_FUNCTIONS = (square, whoami, fail, die_if_first, nap, print_and_return, days_between)
for _fn in PROCESS_FUNCTIONS:
    app.task(executor="process")(_fn)


def bound_retry(ctx: Context, n: int) -> tuple[int, str, int, bool]:
    """A bound process task: retries twice through ctx.retry, then reports its context."""
    if ctx.retries < 2:
        ctx.retry(countdown=0.01)
    return n, ctx.id, ctx.retries, ctx.is_eager


app.task(executor="process", bind=True)(bound_retry)


def report_progress(ctx: Context, steps: int, go_file: str) -> int:
    """Reports PROGRESS 0, waits for ``go_file`` to exist, then reports 1..steps."""
    ctx.update_state_blocking("PROGRESS", {"done": 0})
    deadline = time.monotonic() + 20
    while not os.path.exists(go_file) and time.monotonic() < deadline:
        time.sleep(0.01)
    for done in range(1, steps + 1):
        ctx.update_state_blocking("PROGRESS", {"done": done})
    return steps


app.task(executor="process", bind=True)(report_progress)
