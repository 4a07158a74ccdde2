"""The operator subcommands: ``queues``, ``purge`` and ``dead-letters`` (see ``operations.py``).

Kept apart from ``cli.py`` (which runs workers) so each stays one job; ``cli.main`` hands these
commands over whole. Exit codes: 0 done, 1 nothing done (purge declined), 2 a usage or
configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import orjson

from . import operations
from .cli_control import _timeout
from .errors import AioQueueError
from .inspection import DEFAULT_TIMEOUT
from .loader import load_app

if TYPE_CHECKING:
    from .app import App
    from .brokers.base import QueueStats

__all__ = ["COMMANDS", "add_parsers", "main"]

COMMANDS = frozenset({"queues", "purge", "dead-letters"})
_DEAD_ACTIONS = ("list", "show", "requeue", "drop")


def add_parsers(commands: Any) -> None:
    """Add the operator subcommands to ``aioqueue``'s subparsers."""
    queues = commands.add_parser(
        "queues", help="per queue: depth, delayed, in flight, consumers, oldest message, dead"
    )
    queues.add_argument("app", help="module:attribute of the App")
    queues.add_argument("-Q", "--queues", help="comma-separated queues (default: the app's)")
    queues.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the workers' answers (default: %(default)s)",
    )
    queues.add_argument("--json", action="store_true", help="print the rows as JSON")

    purge = commands.add_parser("purge", help="delete the messages waiting in a queue")
    purge.add_argument("app", help="module:attribute of the App")
    purge.add_argument("-Q", "--queue", required=True, help="the queue to empty")
    purge.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    dead = commands.add_parser(
        "dead-letters", help="list, show, requeue or drop a queue's dead letters"
    )
    dead.add_argument("action", choices=_DEAD_ACTIONS)
    dead.add_argument("app", help="module:attribute of the App")
    dead.add_argument("-Q", "--queue", help="the queue (default: the app's default queue)")
    dead.add_argument(
        "--id", dest="ids", action="append", default=[], help="a task id (repeat for more)"
    )
    dead.add_argument("--all", action="store_true", help="every dead letter of the queue")


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except AioQueueError as exc:
        print(f"aioqueue {args.command}: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    try:
        if args.command == "queues":
            names = args.queues.split(",") if args.queues else operations.app_queues(app)
            rows = await operations.queue_stats(app, names, timeout=args.timeout)
            if args.json:
                print(orjson.dumps([stats_json(row) for row in rows]).decode())
            else:
                print(operations.format_stats(rows))
            return 0
        if args.command == "purge":
            return await _purge(app, args.queue, args.yes)
        return await _dead_letters(app, args)
    finally:
        await app.close()


def stats_json(row: QueueStats) -> dict[str, Any]:
    """One row of ``queues --json``: every field (None: none, or unknown when named in
    ``unknown`` with its reason) and ``oldest``, the OLDEST column."""
    return {**dataclasses.asdict(row), "oldest": row.oldest}


async def _purge(app: App, queue: str, yes: bool) -> int:
    if not yes:
        (stats,) = await operations.queue_stats(app, [queue], ask_workers=False)
        waiting = stats.depth + stats.delayed
        prompt = f"Delete the {waiting} message(s) waiting in queue {queue!r}? [y/N] "
        print(prompt, end="", flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer not in {"y", "yes"}:
            print("nothing purged")
            return 1
    print(f"purged {await operations.purge(app, queue)} message(s) from {queue!r}")
    return 0


async def _dead_letters(app: App, args: argparse.Namespace) -> int:
    queue = args.queue or app.conf.default_queue
    if args.ids and args.all:
        print("aioqueue dead-letters: give --id or --all, not both", file=sys.stderr)
        return 2
    ids = frozenset(args.ids) if args.ids else None
    if args.action in {"list", "show"}:
        letters = await operations.list_dead(app, queue, ids)
        print(operations.format_dead_letters(letters, full=args.action == "show"))
        return 0
    if ids is None and not args.all:
        print(f"aioqueue dead-letters {args.action}: say which: --id ID or --all", file=sys.stderr)
        return 2
    if args.action == "requeue":
        done = await operations.requeue_dead(app, queue, ids)
        print(f"requeued {done} dead letter(s) to {queue!r}")
    else:
        done = await operations.drop_dead(app, queue, ids)
        print(f"dropped {done} dead letter(s) of {queue!r}")
    if ids is not None and done < len(ids):
        print(f"{len(ids) - done} of the given id(s) not found or kept", file=sys.stderr)
        return 1
    return 0
