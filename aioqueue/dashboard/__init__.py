"""A web dashboard for an app: ``aioqueue dashboard proj:app --port 5555`` (extra ``dashboard``).

Workers and their slots, queues with depth and rates, recent tasks (from the event stream),
a page per task, dead letters; revoke, retry, requeue and drop buttons. Server-rendered
Starlette pages with a little JavaScript, no build step. See :mod:`.guard` for who may use it.

    from aioqueue.dashboard import create_dashboard
    asgi_app = create_dashboard(app, auth="admin:secret")   # any ASGI server can run it
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ..errors import AioQueueError
from .guard import Access, Guard, check_bind, parse_auth
from .html import esc, page
from .live import Live
from .pages import routes

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Access", "Live", "access_from", "check_bind", "create_dashboard"]

AUTH_ENV = "AIOQUEUE_DASHBOARD_AUTH"
TOKEN_ENV = "AIOQUEUE_DASHBOARD_TOKEN"


def access_from(auth: str | None = None, token: str | None = None) -> Access:
    """The credentials from arguments, else from ``AIOQUEUE_DASHBOARD_AUTH`` / ``_TOKEN``."""
    user, password = parse_auth(auth if auth is not None else os.environ.get(AUTH_ENV))
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    return Access(user, password, token)


async def _failed(request: Request, exc: Exception) -> Response:
    live: Live = request.app.state.live
    body = f'<div class="banner">{esc(exc)}</div>'
    return HTMLResponse(page("Error", live.app.name, body), status_code=502)


def create_dashboard(
    app: App,
    *,
    auth: str | None = None,
    token: str | None = None,
    max_tasks: int = 10_000,
    poll_interval: float = 2.0,
    live: Live | None = None,
    close_app: bool = False,
) -> Starlette:
    """The dashboard as an ASGI app. Its lifespan starts reading events and polling, and
    with ``close_app`` closes ``app`` at the end (its connections belong to the server's loop).
    ``live`` lets a test hand in its own state."""
    access = access_from(auth, token)
    state = live if live is not None else Live(app, max_tasks, poll_interval)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()
            if close_app:
                await app.close()

    dashboard = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, access=access)],
        lifespan=lifespan,
        exception_handlers={AioQueueError: _failed},
    )
    dashboard.state.live = state
    dashboard.state.access = access
    return dashboard
