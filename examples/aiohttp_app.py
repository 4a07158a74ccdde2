"""aiohttp: the app connects on startup and closes on cleanup, handlers find it under an
``AppKey``, and a task's progress streams to the browser as server-sent events.

pip install 'aioqueue[aiohttp]'
aioqueue worker examples.proj:app                              # in one shell
python -m aiohttp.web -P 8080 examples.aiohttp_app:make_app    # in another; open localhost:8080
curl -X POST 'localhost:8080/add?x=2&y=3'                      # -> {"task_id": "..."}
curl 'localhost:8080/result/<task_id>'                         # -> {"state": "SUCCESS", "value": 5}
curl -X POST 'localhost:8080/count?total=5'
curl -N 'localhost:8080/progress/<task_id>'                    # data: {"state": "PROGRESS", ...}
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from aioqueue import App, ResultTimeout

from .proj import add, app, count
from .sse import HEADERS, PAGE, progress_events

QUEUE = web.AppKey("queue", App)


async def queue_context(web_app: web.Application) -> AsyncIterator[None]:
    async with app:  # one connection pool and one result listener for the whole process
        web_app[QUEUE] = app
        yield


async def page(_: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def send_add(request: web.Request) -> web.Response:
    result = await add.send(int(request.query["x"]), int(request.query["y"]))
    return web.json_response({"task_id": result.id})


async def get_result(request: web.Request) -> web.Response:
    result = request.app[QUEUE].AsyncResult(request.match_info["task_id"])
    try:
        value = await result.get(timeout=float(request.query.get("wait", 5)))
    except ResultTimeout:
        return web.json_response({"state": await result.state()}, status=404)
    return web.json_response({"state": await result.state(), "value": value})


async def send_count(request: web.Request) -> web.Response:
    result = await count.send(int(request.query["total"]))
    return web.json_response({"task_id": result.id})


async def progress(request: web.Request) -> web.StreamResponse:
    result = request.app[QUEUE].AsyncResult(request.match_info["task_id"])
    response = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream"})
    await response.prepare(request)
    async for event in progress_events(result):
        await response.write(event)
    await response.write_eof()
    return response


def make_app(argv: list[str] | None = None) -> web.Application:
    web_app = web.Application()
    web_app.cleanup_ctx.append(queue_context)
    web_app.add_routes(
        [
            web.get("/", page),
            web.post("/add", send_add),
            web.get("/result/{task_id}", get_result),
            web.post("/count", send_count),
            web.get("/progress/{task_id}", progress),
        ]
    )
    return web_app
