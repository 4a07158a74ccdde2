"""``aioqueue dashboard proj:app``: serve the web dashboard (extra ``dashboard``) with uvicorn.

Listens on 127.0.0.1 unless told otherwise; another address needs ``--auth`` or ``--token``
(or their environment variables), else the command refuses to start.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .errors import AioQueueError, ConfigurationError
from .loader import load_app

__all__ = ["COMMANDS", "add_parsers", "main"]

COMMANDS = frozenset({"dashboard"})


def add_parsers(commands: Any) -> None:
    dash = commands.add_parser("dashboard", help="serve the web dashboard (extra: dashboard)")
    dash.add_argument("app", help="module:attribute of the App")
    dash.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    dash.add_argument("--port", type=int, default=5555, help="port (default: %(default)s)")
    dash.add_argument(
        "--auth",
        help="user:password for HTTP Basic (default: env AIOQUEUE_DASHBOARD_AUTH); this or "
        "--token is required to bind beyond 127.0.0.1",
    )
    dash.add_argument(
        "--token", help="a bearer token instead of a password (env AIOQUEUE_DASHBOARD_TOKEN)"
    )
    dash.add_argument(
        "--max-tasks",
        type=int,
        default=10_000,
        help="recent tasks kept in memory (default: %(default)s)",
    )
    dash.add_argument(
        "--poll-interval",
        type=float,
        default=2.0,
        help="seconds between queue and worker polls (default: %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 0
    except AioQueueError as exc:
        print(f"aioqueue dashboard: {exc}", file=sys.stderr)
        return 2


async def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .dashboard import access_from, check_bind, create_dashboard
    except ImportError as exc:
        raise ConfigurationError(
            f"the dashboard needs its extra: pip install 'aioqueue[dashboard]' ({exc})"
        ) from None
    if args.max_tasks < 1 or args.poll_interval <= 0:
        raise ConfigurationError("--max-tasks must be at least 1 and --poll-interval positive")
    access = access_from(args.auth, args.token)
    check_bind(args.host, access)
    app = load_app(args.app)
    dashboard = create_dashboard(
        app,
        auth=args.auth,
        token=args.token,
        max_tasks=args.max_tasks,
        poll_interval=args.poll_interval,
        close_app=True,
    )
    config = uvicorn.Config(
        dashboard, host=args.host, port=args.port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    print(f"aioqueue dashboard on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        await server.serve()
    finally:
        await app.close()
    return 0
