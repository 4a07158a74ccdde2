"""Revoking tasks and watching progress, end to end: `python examples/control.py`.

On memory:// unless AIOQUEUE_BROKER_URL is set (for example redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import asyncio
import os

from aioqueue import App, Context, TaskRevoked

app = App(
    "control-demo",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"),
    key_prefix=os.environ.get("AIOQUEUE_KEY_PREFIX", "aioqueue-demo"),
)


@app.task(bind=True)
async def crunch(ctx: Context, total: int) -> int:
    for done in range(1, total + 1):
        await asyncio.sleep(0.01)  # the real work
        await ctx.update_state("PROGRESS", {"done": done, "total": total})
    return total


@app.task
async def report(name: str) -> str:
    return f"report {name} sent"


@app.task
async def forever() -> None:
    await asyncio.sleep(3600)


async def main() -> None:
    async with app:
        # A delayed task revoked before any worker runs: it never starts, on any worker.
        doomed = await report.options(countdown=0.2).send("doomed")
        revoked = await doomed.revoke()
        print(f"revoked: {bool(revoked)}, it was {revoked.state}")
        async with app.worker(concurrency=5):
            result = await crunch.send(3)
            async for update in result.watch():
                print(f"watch: {update.state} {update.meta}")
            try:
                await doomed.get(timeout=5)
            except TaskRevoked as exc:
                print(f"doomed: {exc.reason}")
            running = await forever.send()
            await app.control.revoke(running.id, terminate=True)  # waiting or running alike
            try:
                await running.get(timeout=10)
            except TaskRevoked as exc:
                print(f"forever: {type(exc).__name__}")
            again = await doomed.revoke()  # finished: a no-op, and the report says so
            print(f"revoked again: {bool(again)}")


if __name__ == "__main__":
    asyncio.run(main())
