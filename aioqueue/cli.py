"""``aioqueue worker proj:app`` and friends. Logging is configured here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__, cli_control, cli_dashboard, cli_events, cli_ops
from .config import Config
from .errors import AioQueueError, ConfigurationError
from .loader import load_app
from .logs import configure_logging
from .operations import settings_in_use

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
    worker.add_argument(
        "-c", "--concurrency", type=_positive, help="tasks run at once " + _conf("concurrency")
    )
    worker.add_argument(
        "-Q",
        "--queues",
        help="comma-separated queues (default: the app's default_queue, then its tasks' queues)",
    )
    worker.add_argument(
        "--threads", type=_positive, help="thread-pool size for sync tasks " + _conf("threads")
    )
    worker.add_argument(
        "--processes", type=_positive, help="process-pool size " + _conf("processes")
    )
    worker.add_argument(
        "--max-tasks-per-child",
        type=_positive,
        help="replace a process child after N tasks " + _conf("max_tasks_per_child"),
    )
    worker.add_argument(
        "--shutdown-timeout",
        type=float,
        help="seconds running tasks get after SIGTERM " + _conf("shutdown_timeout"),
    )
    worker.add_argument(
        "--burst", action="store_true", help="exit once the queues are empty (default: run on)"
    )
    _logging_options(worker)
    worker.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop when installed (auto), or force one",
    )

    worker.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (default: the worker_metrics_port "
        "setting; off when unset); needs the metrics extra",
    )
    worker.add_argument(
        "--metrics-addr",
        help="address the metrics are served on (default: worker_metrics_addr, 0.0.0.0)",
    )
    worker.add_argument(
        "--no-schedule",
        dest="schedule",
        action="store_false",
        help="do not send periodic tasks from this worker (others or `aioqueue beat` do)",
    )

    beat = commands.add_parser("beat", help="send an app's periodic tasks, consuming nothing")
    beat.add_argument("app", help="module:attribute of the App")
    _logging_options(beat)
    beat.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")

    listing = commands.add_parser(
        "schedule", help="list an app's periodic entries: next due, last run and outcome"
    )
    listing.add_argument("app", help="module:attribute of the App")

    conf = commands.add_parser(
        "conf", help="print the settings an app runs with (defaults resolved), secrets masked"
    )
    conf.add_argument("app", help="module:attribute of the App")
    cli_ops.add_parsers(commands)
    cli_control.add_parsers(commands)
    cli_events.add_parsers(commands)
    cli_dashboard.add_parsers(commands)
    return parser


def _conf(option: str) -> str:
    """``(default: the app's worker_<option>, N out of the box)`` for an option's help."""
    name = f"worker_{option}"
    found = next(f for f in dataclasses.fields(Config) if f.name == name)
    if found.default is not dataclasses.MISSING:
        plain = "none" if found.default is None else f"{found.default:g}"
    else:
        plain = "the number of CPUs" if option == "processes" else "see aioqueue conf"
    return f"(default: the app's {name}, {plain} out of the box)"


_LEVELS = ("debug", "info", "warning", "error")


def _logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-l",
        "--loglevel",
        default="info",
        type=str.lower,
        choices=_LEVELS,
        help="(default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one object per line with task_id, task, queue, attempt, runtime, outcome "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--tracebacks",
        action="store_true",
        help="log a failed task's traceback at any level (default: at debug only)",
    )
    parser.add_argument(
        "--dependency-loglevel",
        default="warning",
        choices=_LEVELS,
        help="level for redis-py, aio-pika, aiormq and asyncio (default: %(default)s)",
    )


def _configure_logging(args: argparse.Namespace) -> None:
    configure_logging(
        args.loglevel,
        log_format=args.log_format,
        tracebacks=args.tracebacks,
        dependency_level=args.dependency_loglevel,
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
        schedule=args.schedule,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
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


async def _run_beat(args: argparse.Namespace) -> int:
    from .periodic.scheduler import Scheduler

    app = load_app(args.app)
    scheduler = Scheduler(app, owner=f"beat {os.getpid()}")
    if not scheduler.entries:
        raise ConfigurationError(f"app {args.app} has no periodic entries to send")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, scheduler.stop)
    try:
        await scheduler.run()
    finally:
        await app.close()
    return 0


async def _list_schedule(args: argparse.Namespace) -> int:
    from .periodic.listing import describe, format_rows

    app = load_app(args.app)
    try:
        print(format_rows(await describe(app)))
    finally:
        await app.close()
    return 0


def _humanize(settings: dict[str, object]) -> str:
    return "\n".join(f"{name}: {value!r}" for name, value in settings.items())


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
        print(_humanize(settings_in_use(load_app(args.app))))
        return 0
    for commands in (cli_ops, cli_control, cli_events, cli_dashboard):
        if args.command in commands.COMMANDS:
            code: int = commands.main(args)
            return code
    if args.command == "schedule":
        try:
            return asyncio.run(_list_schedule(args))
        except AioQueueError as exc:
            print(f"aioqueue schedule: {exc}", file=sys.stderr)
            return 2
    _configure_logging(args)
    if args.command == "beat":
        try:
            with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
                return runner.run(_run_beat(args))
        except AioQueueError as exc:
            log.error("%s", exc)
            return 2
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
