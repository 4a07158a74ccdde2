"""The app tests/test_secrets.py runs in a real ``aioqueue worker``: tasks handling secrets.

Settings (URLs with passwords, the signing key) come from ``AIOQUEUE_*`` variables; the test
builds a client with the same tasks through :func:`build`.
"""

from __future__ import annotations

import logging

from aioqueue import App, Secret

log = logging.getLogger("secret_app")


def build(app: App) -> App:
    @app.task(sensitive=("card",), name="secret_app.charge")
    async def charge(card: str, amount: int) -> str:
        if amount < 0:
            raise ValueError(f"card {card} declined for {amount}")
        return "charged"

    @app.task(name="secret_app.login")
    async def login(user: str, token: Secret[str]) -> str:
        log.info("login of %s with %r (%s)", user, token, token)
        if token.value.endswith("bad"):
            raise PermissionError(f"token {token.value} rejected", token.value)
        return f"welcome {user}"

    @app.task(
        sensitive=("card",),
        name="secret_app.flaky",
        retry_for=ValueError,
        max_retries=1,
        default_retry_delay=0.05,
    )
    def flaky(card: str) -> str:
        raise ValueError(f"{card} is flaky")

    @app.task(name="secret_app.vault", executor="process")
    def vault(token: Secret[str]) -> str:
        return f"{type(token).__name__} {token!r} {len(token.value)}"

    return app


app = build(App("secret-app"))
