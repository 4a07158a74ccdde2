"""Who may see the dashboard and what may change things through it.

* Binding: loopback by default; any other address needs a password (``--auth user:pass`` or
  ``AIOQUEUE_DASHBOARD_AUTH``) or a token (``--token`` or ``AIOQUEUE_DASHBOARD_TOKEN``), else
  the dashboard refuses to start (:func:`check_bind`).
* Authentication: HTTP Basic for a password; for a token, ``Authorization: Bearer <token>``, or
  ``?token=<token>`` once in a browser, which sets an HttpOnly cookie for the visits after.
* CSRF: every action is a POST carrying the token of the ``aioqueue_csrf`` cookie in a form
  field; they are compared in constant time and a POST whose ``Origin`` names another host is
  refused too. GET requests change nothing.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ConfigurationError

__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "Access",
    "Guard",
    "check_bind",
    "is_loopback",
    "parse_auth",
    "read_form",
]

CSRF_COOKIE = "aioqueue_csrf"
CSRF_FIELD = "csrf"
TOKEN_COOKIE = "aioqueue_token"
_MAX_FORM = 64 * 1024


@dataclass(frozen=True, slots=True)
class Access:
    """The credentials the dashboard asks for; both None: no authentication (loopback only)."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    @property
    def required(self) -> bool:
        return self.password is not None or self.token is not None

    def __repr__(self) -> str:  # never the secrets themselves
        shown = [f"user={self.user!r}"] if self.user else []
        shown += ["password=***"] if self.password else []
        shown += ["token=***"] if self.token else []
        return f"Access({', '.join(shown)})"


def parse_auth(text: str | None) -> tuple[str | None, str | None]:
    """``user:pass`` into its two parts; a clear error for anything else."""
    if text is None or text == "":
        return None, None
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise ConfigurationError("dashboard auth must be user:password, both non-empty")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, access: Access) -> None:
    """Refuse to listen beyond this machine without a password or token."""
    if not is_loopback(host) and not access.required:
        raise ConfigurationError(
            f"the dashboard listens on {host}, beyond this machine: give it a password "
            "(--auth user:pass or AIOQUEUE_DASHBOARD_AUTH) or a token (--token or "
            "AIOQUEUE_DASHBOARD_TOKEN), or bind 127.0.0.1"
        )


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the only kind our forms send)."""
    body = await request.body()
    if len(body) > _MAX_FORM:
        return {}
    pairs = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[-1] for key, values in pairs.items()}


class Guard:
    """ASGI middleware: authentication for every request, CSRF checks for every POST."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        refused, set_token = self._authenticate(request)
        if refused is not None:
            await refused(scope, receive, send)
            return
        if set_token:  # ?token= in a browser: a cookie, and the URL without it
            response: Response = RedirectResponse(request.url.remove_query_params("token"), 303)
            response.set_cookie(TOKEN_COOKIE, set_token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        if request.method == "POST":
            problem = await self._csrf_problem(request)
            if problem:
                await PlainTextResponse(problem, 403)(scope, receive, send)
                return
            receive = _replay(await request.body())
        csrf = request.cookies.get(CSRF_COOKIE)
        scope.setdefault("state", {})["csrf"] = csrf or secrets.token_urlsafe(32)
        if csrf:
            await self.app(scope, receive, send)
            return
        token = scope["state"]["csrf"]

        async def send_with_cookie(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                cookie = f"{CSRF_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
                headers.append((b"set-cookie", cookie.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _authenticate(self, request: Request) -> tuple[Response | None, str | None]:
        access = self.access
        if not access.required:
            return None, None
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if access.token is not None:
            if scheme.lower() == "bearer" and _same(value, access.token):
                return None, None
            if _same(request.cookies.get(TOKEN_COOKIE, ""), access.token):
                return None, None
            query = request.query_params.get("token")
            if query is not None and _same(query, access.token) and request.method == "GET":
                return None, query
        if access.password is not None and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                user = password = ""
            if _same(user, access.user or "") & _same(password, access.password):
                return None, None
        challenge = {"WWW-Authenticate": 'Basic realm="aioqueue"'} if access.password else {}
        return PlainTextResponse("authentication required", 401, headers=challenge), None

    async def _csrf_problem(self, request: Request) -> str | None:
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = origin.split("://", 1)[-1]
            if host != request.headers.get("host"):
                return "refused: the request came from another site (Origin)"
        cookie = request.cookies.get(CSRF_COOKIE)
        if not cookie:
            return "refused: no CSRF cookie (load the page again)"
        form = await read_form(request)
        if not _same(form.get(CSRF_FIELD, ""), cookie):
            return "refused: the form's CSRF token does not match (load the page again)"
        return None


def _replay(body: bytes) -> Receive:
    """A ``receive`` that hands the already-read body to the route again."""
    sent = False

    async def receive() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive
