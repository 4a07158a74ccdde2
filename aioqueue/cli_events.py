"""``aioqueue events proj:app``: a live, human-readable tail of task events and heartbeats.

Workers emit events only with the ``events`` setting on (``AIOQUEUE_EVENTS=1``); see
:mod:`aioqueue.events`. Runs until interrupted (Ctrl-C: exit 0) or, with ``--count N``, until N
events were printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from .errors import AioQueueError
from .loader import load_app

__all__ = ["COMMANDS", "add_parsers", "main"]

COMMANDS = frozenset({"events"})


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_parsers(commands: Any) -> None:
    events = commands.add_parser("events", help="follow task events and worker heartbeats live")
    events.add_argument("app", help="module:attribute of the App")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument(
        "--from-start", action="store_true", help="the retained events first (Redis, memory)"
    )
    events.add_argument("--count", type=_count, help="exit after this many events")
    events.add_argument(
        "--no-heartbeats", action="store_true", help="leave out worker-heartbeat events"
    )


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_tail(args))
    except KeyboardInterrupt:
        return 0
    except AioQueueError as exc:
        print(f"aioqueue events: {exc}", file=sys.stderr)
        return 2


async def _tail(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    printed = 0
    try:
        async with app.events(from_start=args.from_start) as feed:
            print("following events (Ctrl-C to stop)", file=sys.stderr, flush=True)
            async for event in feed:
                if args.no_heartbeats and event.type == "worker-heartbeat":
                    continue
                line = orjson.dumps(event.to_dict()).decode() if args.json else str(event)
                print(line, flush=True)
                printed += 1
                if args.count is not None and printed >= args.count:
                    return 0
    finally:
        await app.close()
    return 0
