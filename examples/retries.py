"""Retries, a bound context, hooks and middleware, end to end: `python examples/retries.py`.

On memory:// unless AIOQUEUE_BROKER_URL is set (for example redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import aioqueue
from aioqueue import App, Context, Message, Middleware, Outcome

attempts: dict[str, int] = {}


class GatewayBusy(OSError):
    """What a flaky payment gateway raises."""


class Audited(aioqueue.Task[Any, Any]):
    """Celery-style hooks: here they just print."""

    def on_retry(self, exc: BaseException, task_id: str, *rest: Any) -> None:
        print(f"  on_retry   {task_id[:8]}: {exc}")

    async def on_success(self, retval: Any, task_id: str, *rest: Any) -> None:
        print(f"  on_success {task_id[:8]}: {retval}")


class Tracing(Middleware):
    """App-wide: stamps a trace header on every send and reports every run."""

    def before_send(self, message: Message) -> Message:
        return dataclasses.replace(message, headers={**message.headers, "trace": "t-42"})

    def after_execute(self, ctx: Context, outcome: Outcome) -> None:
        print(f"  traced     {ctx.name} try {ctx.retries + 1}: {outcome.state}")


app = App(
    "retries-demo",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"),
    key_prefix=os.environ.get("AIOQUEUE_KEY_PREFIX", "aioqueue-demo"),
    middleware=[Tracing()],
)


@app.task(bind=True, base=Audited, retry_for=(GatewayBusy,), max_retries=5, retry_backoff=0.1)
async def charge(ctx: Context, customer: str, cents: int) -> str:
    attempts[ctx.id] = attempts.get(ctx.id, 0) + 1
    if ctx.retries < 2:  # busy twice, then it goes through
        raise GatewayBusy(f"gateway busy (try {ctx.retries + 1})")
    return f"charged {customer} {cents} on try {ctx.retries + 1} (trace {ctx.headers['trace']})"


@app.task(bind=True, max_retries=1)
async def hopeless(ctx: Context) -> None:
    ctx.retry(countdown=0.05, exc=GatewayBusy("still busy"))


async def main() -> None:
    async with app, app.worker(concurrency=5):
        result = await charge.send("c-1", 500)
        print(await result.get(timeout=30))
        print(f"retries: {await result.retries()}, state: {await result.state()}")
        failed = await hopeless.send()
        try:
            await failed.get(timeout=30)
        except GatewayBusy as exc:
            print(f"hopeless failed for good: {exc!r} after {await failed.retries()} retry")


if __name__ == "__main__":
    asyncio.run(main())
