"""Workflows end to end: `python examples/workflows.py`.

On memory:// unless AIOQUEUE_BROKER_URL is set (for example redis://127.0.0.1:6379/0; a chord
needs Redis or memory results).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aioqueue import App, ChordError, ErrorInfo, chain, chord, group

app = App(
    "workflows-demo",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"),
    key_prefix=os.environ.get("AIOQUEUE_KEY_PREFIX", "aioqueue-demo"),
)


@app.task
async def download(url: str) -> str:
    return f"raw({url})"


@app.task
async def transcode(raw: str, fmt: str) -> str:
    return f"{fmt}({raw})"


@app.task
async def notify(path: str, who: str) -> str:
    return f"told {who} about {path}"


@app.task
async def thumbnail(n: int) -> int:
    if n < 0:
        raise ValueError(f"no picture {n}")
    return n * 10


@app.task
async def zip_all(sizes: list[int]) -> str:
    return f"zip of {len(sizes)} thumbnails, {sum(sizes)} bytes"


@app.task
async def alert(task_id: str, error: ErrorInfo) -> str:
    return f"alert: {error['state']} {error['type']}: {error['message']}"


@app.task
def add(x: int, y: int) -> int:
    return x + y


async def main() -> None:
    async with app, app.worker(concurrency=20):
        # chain: each step gets the previous result first; get() is the last step's result
        flow = download.s("cat.mov") | transcode.s("mp4") | notify.s("ops")
        print(await (await flow.send()).get(timeout=10))

        # group: one round trip for every member; values in order
        thumbs = await group(thumbnail.s(n) for n in range(5)).send()
        print("thumbnails:", await thumbs.get(timeout=10))

        # chord: the callback runs once, with every member's result
        zipped = await chord(group(thumbnail.s(n) for n in range(100)), zip_all.s()).send()
        print(await zipped.get(timeout=10))

        # a failing member fails the chord (the callback does not run), naming the member
        broken = await (group(thumbnail.s(1), thumbnail.s(-1)) | zip_all.s()).send()
        try:
            await broken.get(timeout=10)
        except ChordError as exc:
            print("chord failed:", str(exc).split(": ", 2)[2].splitlines()[0])

        # link_error: gets the failed task's id and an ErrorInfo (plain data)
        failed = await thumbnail.s(-2).set(link_error=alert.s()).send()
        (errback,) = failed.children  # a workflow's handles know their parent and children
        print(await errback.get(timeout=10))

        # map / starmap / chunks: one message per map or per chunk
        print("starmap:", await (await add.starmap([(1, 2), (3, 4)]).send()).get(timeout=10))
        print(
            "chunks:",
            await (await add.chunks([(i, i) for i in range(5)], 2).send()).get(timeout=10),
        )

        # tree(): every node with its state
        last = await chain(add.s(1, 1), add.s(2)).send()
        await last.get(timeout=10)
        tree: dict[str, Any] = await last.tree()
        print("tree:", tree["type"], [(step["task"], step["state"]) for step in tree["children"]])


if __name__ == "__main__":
    asyncio.run(main())
