"""aiohttp: the app connects on startup and closes on cleanup.

aioqueue worker examples.proj:app                              # in one shell
python -m aiohttp.web -P 8080 examples.aiohttp_app:make_app    # in another
curl -X POST 'localhost:8080/add?x=2&y=3'
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from aioqueue import ResultTimeout

from .proj import add, app


async def queue_context(_: web.Application) -> AsyncIterator[None]:
    async with app:
        yield


async def send_add(request: web.Request) -> web.Response:
    result = await add.send(int(request.query["x"]), int(request.query["y"]))
    return web.json_response({"task_id": result.id})


async def get_result(request: web.Request) -> web.Response:
    result = app.AsyncResult(request.match_info["task_id"])
    try:
        value = await result.get(timeout=float(request.query.get("wait", 5)))
    except ResultTimeout:
        return web.json_response({"state": await result.state()}, status=404)
    return web.json_response({"state": await result.state(), "value": value})


def make_app(argv: list[str] | None = None) -> web.Application:
    web_app = web.Application()
    web_app.cleanup_ctx.append(queue_context)
    web_app.add_routes([web.post("/add", send_add), web.get("/result/{task_id}", get_result)])
    return web_app
