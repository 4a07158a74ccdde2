"""FastAPI: the lifespan connects the app, a dependency hands it to the handlers, and a task's
progress streams to the browser as server-sent events.

pip install 'aioqueue[fastapi]'                 # FastAPI and uvicorn
aioqueue worker examples.proj:app               # in one shell
uvicorn examples.fastapi_app:api                # in another; open http://localhost:8000/
curl -X POST 'localhost:8000/add?x=2&y=3'       # -> {"task_id": "..."}
curl 'localhost:8000/result/<task_id>'          # -> {"state": "SUCCESS", "value": 5}
curl -X POST 'localhost:8000/count?total=5'     # a task that reports its progress
curl -N 'localhost:8000/progress/<task_id>'     # data: {"state": "PROGRESS", ...} as it goes
curl 'localhost:8000/healthz'                   # readiness: 503 while the broker is away
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from aioqueue import AioQueueError, App, ResultTimeout

from .proj import add, app, count
from .sse import HEADERS, PAGE, progress_events


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, App]]:
    # One connection pool and one result listener for the whole process, closed on shutdown.
    async with app:
        yield {"queue": app}  # lifespan state: every request sees it as request.state.queue


api = FastAPI(lifespan=lifespan)


def get_queue(request: Request) -> App:
    """The connected app, for handlers that look results up (tests can override it)."""
    queue: App = request.state.queue
    return queue


Queue = Annotated[App, Depends(get_queue)]


@api.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE


@api.post("/add")
async def send_add(x: int, y: int) -> dict[str, str]:
    result = await add.send(x, y)
    return {"task_id": result.id}


@api.get("/result/{task_id}")
async def get_result(task_id: str, queue: Queue, wait: float = 5.0) -> dict[str, Any]:
    result = queue.AsyncResult(task_id)
    try:
        value = await result.get(timeout=wait)
    except ResultTimeout:
        raise HTTPException(status_code=404, detail="not finished yet") from None
    return {"state": await result.state(), "value": value}


@api.post("/count")
async def send_count(total: int) -> dict[str, str]:
    result = await count.send(total)
    return {"task_id": result.id}


@api.get("/progress/{task_id}")
async def progress(task_id: str, queue: Queue) -> StreamingResponse:
    events = progress_events(queue.AsyncResult(task_id))
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)


@api.get("/healthz")
async def healthz(queue: Queue) -> dict[str, int]:
    """Readiness (a Kubernetes readinessProbe): the broker answers within 2 s. A liveness probe
    should not call this: a broker outage would restart every web pod for nothing."""
    try:
        async with asyncio.timeout(2):
            waiting = await queue.broker.queue_length(queue.conf.default_queue)
    except (TimeoutError, AioQueueError) as exc:
        raise HTTPException(status_code=503, detail=f"broker: {type(exc).__name__}") from None
    return {"waiting": waiting}
