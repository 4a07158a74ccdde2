"""Plain functions for process-executor tests: children import this app to find them by name."""

from __future__ import annotations

import os
import time

from aioqueue import App

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


PROCESS_FUNCTIONS = (square, whoami, fail, die_if_first, nap, print_and_return)
for _fn in PROCESS_FUNCTIONS:
    app.task(executor="process")(_fn)
