"""``aioqueue worker proj:app`` and friends. Logging is configured here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import AioQueueError, ConfigurationError
from .loader import load_app

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["main"]

log = logging.getLogger("aioqueue.cli")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aioqueue", description="asyncio task queue")
    parser.add_argument("--version", action="version", version=f"aioqueue {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a worker for an app")
    worker.add_argument("app", help="module:attribute of the App, e.g. proj:app")
    worker.add_argument("-c", "--concurrency", type=_positive, help="tasks run at once")
    worker.add_argument("-Q", "--queues", help="comma-separated queues (default: the app's)")
    worker.add_argument("--threads", type=_positive, help="thread-pool size for sync tasks")
    worker.add_argument("--processes", type=_positive, help="process-pool size")
    worker.add_argument(
        "--max-tasks-per-child", type=_positive, help="replace a process child after N tasks"
    )
    worker.add_argument(
        "--shutdown-timeout", type=float, help="seconds running tasks get after SIGTERM"
    )
    worker.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    worker.add_argument(
        "-l", "--loglevel", default="info", help="debug, info, warning or error (default info)"
    )
    worker.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop when installed (auto), or force one",
    )

    conf = commands.add_parser("conf", help="print an app's configuration, secrets masked")
    conf.add_argument("app", help="module:attribute of the App")
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="[%(asctime)s %(levelname)s %(name)s] %(message)s",
        stream=sys.stderr,
    )


async def _run_worker(args: argparse.Namespace, started: list[Worker]) -> int:
    app = load_app(args.app)
    worker = app.worker(
        concurrency=args.concurrency,
        queues=args.queues.split(",") if args.queues else None,
        threads=args.threads,
        processes=args.processes,
        max_tasks_per_child=args.max_tasks_per_child,
        burst=args.burst,
        shutdown_timeout=args.shutdown_timeout,
    )
    started.append(worker)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.info("%s: finishing running tasks (again to stop at once)", name)
            worker.stop()
        else:
            log.warning("%s again: cancelling running tasks and returning them", name)
            worker.stop(hurry=True)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.run()
    finally:
        await app.close()
    return 0 if signals_seen < 2 else 1


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for or, with ``auto``, when it is installed."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigurationError("--loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "conf":
        print(load_app(args.app).conf.humanize())
        return 0
    _configure_logging(args.loglevel)
    started: list[Worker] = []  # the worker, once built, for its count of running threads
    try:
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            code = runner.run(_run_worker(args, started))
    except AioQueueError as exc:
        log.error("%s", exc)
        code = 2
    if started:
        _exit_past_abandoned_threads(code, started[0].abandoned_threads)
    return code


def _exit_past_abandoned_threads(code: int, running: int) -> None:
    """Exit now if thread tasks outlived the shutdown grace period, else return normally.

    Their messages are already back in their queues; Python would otherwise wait for those
    threads at interpreter exit, for as long as the tasks care to run. ``os._exit`` skips
    atexit handlers (Sentry, OpenTelemetry flush there), so it is used only when a task's
    function is really still running: anyio's idle pool threads end by themselves.
    """
    if running > 0:
        log.warning("abandoning %d thread task(s) still running", running)
        logging.shutdown()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
