"""``aioqueue inspect`` and ``aioqueue control``: remote control of running workers.

Parsing and printing only; the requests are :mod:`aioqueue.inspection` and
:class:`aioqueue.control.Control`. Exit codes: 0 some worker answered (or the command was
done), 1 no worker answered within ``--timeout``, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson

from .errors import AioQueueError
from .inspection import DEFAULT_TIMEOUT, request
from .loader import load_app

__all__ = ["COMMANDS", "add_parsers", "format_answers", "main"]

COMMANDS = frozenset({"inspect", "control"})
INSPECT_VERBS = (
    "ping",
    "active",
    "scheduled",
    "reserved",
    "registered",
    "stats",
    "holding",
    "conf",
)
CONTROL_VERBS = (
    "shutdown",
    "revoke",
    "add-consumer",
    "cancel-consumer",
    "rate-limit",
    "concurrency-limit",
    "reset-limits",
)
LIMIT_VERBS = frozenset({"rate-limit", "concurrency-limit", "reset-limits"})


def _timeout(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app", help="module:attribute of the App")
    parser.add_argument(
        "--worker",
        dest="workers",
        action="append",
        default=[],
        metavar="ID",
        help="ask only this worker (repeat for more; default: every worker)",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for replies (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the replies as JSON")


def add_parsers(commands: Any) -> None:
    """Add ``inspect`` and ``control`` to ``aioqueue``'s subparsers."""
    inspect = commands.add_parser("inspect", help="ask running workers what they are doing")
    inspect.add_argument("verb", choices=INSPECT_VERBS)
    _common(inspect)

    control = commands.add_parser("control", help="tell running workers to do something")
    verbs = control.add_subparsers(dest="verb", required=True)
    shutdown = verbs.add_parser("shutdown", help="stop workers as SIGTERM does (drain first)")
    _common(shutdown)
    for verb, what in (
        ("add-consumer", "also consume QUEUE"),
        ("cancel-consumer", "stop consuming QUEUE (its running tasks finish)"),
    ):
        change = verbs.add_parser(verb, help=what)
        _common(change)
        change.add_argument("queue", metavar="QUEUE")
    revoke = verbs.add_parser("revoke", help="never start these tasks (stop them: --terminate)")
    revoke.add_argument("app", help="module:attribute of the App")
    revoke.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    revoke.add_argument("--terminate", action="store_true", help="also stop a running one")
    revoke.add_argument("--json", action="store_true", help="print the reports as JSON")
    rate = verbs.add_parser(
        "rate-limit", help="set TASK's rate limit on every worker, kept for later ones"
    )
    rate.add_argument("app", help="module:attribute of the App")
    rate.add_argument("task", metavar="TASK", help="the task's name")
    rate.add_argument("rate", metavar="RATE", help='"10/s", "5/m", "100/h burst 20", or "none"')
    cap = verbs.add_parser(
        "concurrency-limit", help="set how many TASK runs may run at once across all workers"
    )
    cap.add_argument("app", help="module:attribute of the App")
    cap.add_argument("task", metavar="TASK", help="the task's name")
    cap.add_argument("limit", metavar="N", help='a positive number, or "none"')
    reset = verbs.add_parser("reset-limits", help="TASK goes back to the limits it declares")
    reset.add_argument("app", help="module:attribute of the App")
    reset.add_argument("task", metavar="TASK", help="the task's name")


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except AioQueueError as exc:
        print(f"aioqueue {args.command}: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    try:
        if args.command == "control" and args.verb == "revoke":
            return await _revoke(app.control, args)
        if args.command == "control" and args.verb in LIMIT_VERBS:
            return await _limit(app.control, args)
        method = args.verb.replace("-", "_")
        arguments = {"queue": args.queue} if method.endswith("_consumer") else None
        answers = await request(
            app.control,
            method,
            arguments,
            destination=args.workers or None,
            timeout=args.timeout,
        )
    finally:
        await app.close()
    if args.json:
        print(orjson.dumps(answers, option=orjson.OPT_INDENT_2).decode())
    elif answers:
        print(format_answers(method, answers))
    if not answers:
        print(f"no worker replied within {args.timeout:g}s", file=sys.stderr)
        return 1
    failed = [a for a in answers.values() if isinstance(a, dict) and set(a) == {"error"}]
    return 1 if failed and len(failed) == len(answers) else 0


async def _revoke(control: Any, args: argparse.Namespace) -> int:
    reports = [await control.revoke(task_id, terminate=args.terminate) for task_id in args.task_ids]
    if args.json:
        rows = [{"task_id": r.task_id, "revoked": r.revoked, "state": r.state} for r in reports]
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        for report in reports:
            print(report.detail)
    return 0


async def _limit(control: Any, args: argparse.Namespace) -> int:
    """Limits are kept and pushed through the control bus, not asked of workers: nothing to
    wait for; a bad value is a usage error (exit 2) before anything is sent."""
    if args.verb == "reset-limits":
        await control.reset_limits(args.task)
        print(f"{args.task}: back to its declared limits on every worker")
        return 0
    if args.verb == "rate-limit":
        rate = None if args.rate.lower() == "none" else args.rate
        await control.rate_limit(args.task, rate)
        print(f"{args.task}: rate limit {rate or 'none'} on every worker")
        return 0
    text = args.limit.lower()
    if text == "none":
        limit = None
    elif text.isdigit():
        limit = int(text)
    else:
        print(
            f"aioqueue control: N must be a positive number or none, not {args.limit!r}",
            file=sys.stderr,
        )
        return 2
    await control.concurrency_limit(args.task, limit)
    print(
        f"{args.task}: concurrency limit {limit if limit is not None else 'none'} on every worker"
    )
    return 0


def format_answers(method: str, answers: dict[str, Any]) -> str:
    """Human-readable replies, one block per worker."""
    lines: list[str] = []
    for worker, answer in answers.items():
        if isinstance(answer, dict) and set(answer) == {"error"}:
            lines.append(f"{worker}: error: {answer['error']}")
        elif isinstance(answer, str):
            lines.append(f"{worker}: {answer}")
        elif isinstance(answer, list) and answer and all(isinstance(q, str) for q in answer):
            lines.append(f"{worker}: consuming {','.join(answer)}")  # add/cancel_consumer
        elif isinstance(answer, list):
            lines.append(f"{worker}: {len(answer)} {method}")
            lines.extend("    " + _task_line(row) for row in answer)
        elif isinstance(answer, dict):
            lines.append(f"{worker}:")
            lines.extend(f"    {key}: {value!r}" for key, value in answer.items())
        else:
            lines.append(f"{worker}: {answer!r}")
    return "\n".join(lines)


def _task_line(row: Any) -> str:
    if not isinstance(row, dict) or "id" not in row:  # registered: name, queue, executor
        return "  ".join(str(v) for v in row.values()) if isinstance(row, dict) else repr(row)
    parts = [str(row["id"]), str(row.get("name")), f"queue={row.get('queue')}"]
    if row.get("runtime") is not None:
        parts.append(f"running {row['runtime']:.1f}s")
    if row.get("eta"):
        parts.append(f"due in {row['eta'] - time.time():.1f}s")
    parts.append(f"attempt {row.get('attempt')}")
    args = ", ".join(
        [repr(a) for a in row.get("args") or []]
        + [f"{k}={v!r}" for k, v in (row.get("kwargs") or {}).items()]
    )
    parts.append(f"({args})")
    return "  ".join(parts)
