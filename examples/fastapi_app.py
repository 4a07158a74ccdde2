"""FastAPI: the lifespan connects the app; one endpoint sends, one awaits the result.

aioqueue worker examples.proj:app            # in one shell
uvicorn examples.fastapi_app:api             # in another
curl -X POST 'localhost:8000/add?x=2&y=3'    # -> {"task_id": "..."}
curl 'localhost:8000/result/<task_id>'       # -> {"state": "SUCCESS", "value": 5}
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException

from aioqueue import ResultTimeout

from .proj import add, app


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    async with app:  # one connection pool and one result listener for the whole process
        yield


api = FastAPI(lifespan=lifespan)


@api.post("/add")
async def send_add(x: int, y: int) -> dict[str, str]:
    result = await add.send(x, y)
    return {"task_id": result.id}


@api.get("/result/{task_id}")
async def get_result(task_id: str, wait: float = 5.0) -> dict[str, Any]:
    result = app.AsyncResult(task_id)
    try:
        value = await result.get(timeout=wait)
    except ResultTimeout:
        raise HTTPException(status_code=404, detail="not finished yet") from None
    return {"state": await result.state(), "value": value}
