"""Signed messages and secrets that stay secret, end to end: `python examples/security.py`.

On memory:// unless AIOQUEUE_BROKER_URL is set (for example redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import asyncio
import os

from aioqueue import App, Secret
from aioqueue.message import Message, MessageCodec

app = App(
    "security-demo",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"),
    key_prefix=os.environ.get("AIOQUEUE_KEY_PREFIX", "aioqueue-demo"),
    signing_key=os.environ.get("DEMO_SIGNING_KEY", "demo-key-use-secrets.token_hex(32)"),
)


@app.task(sensitive=("card",))
async def charge(card: str, amount: int) -> str:
    if amount < 0:
        raise ValueError(f"card {card} declined")
    return f"charged {amount}"


@app.task
async def login(user: str, token: Secret[str]) -> str:
    print(f"  login sees {token!r}, the value has {len(token.value)} characters")
    return f"welcome {user}"


async def main() -> None:
    async with app, app.worker(concurrency=5):
        print(await (await charge.send("4111-1111-1111-1111", 5)).get(timeout=10))
        try:
            await (await charge.send("4111-1111-1111-1111", -1)).get(timeout=10)
        except ValueError as exc:
            print(f"failed: {str(exc).splitlines()[0]}")
        print(await (await login.send("ann", Secret("hunter2-token"))).get(timeout=10))
        # someone who can write to the broker but has no key:
        forged = MessageCodec().encode(
            Message(id="forged-1", task=charge.name, queue="default", args=("x", 1_000_000))
        )
        await app.broker.publish("default", forged)
        while not (dead := await app.broker.dead_letters("default")):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        print(f"forged message: {dead[0].reason} (body kept: {dead[0].body!r})")


if __name__ == "__main__":
    asyncio.run(main())
