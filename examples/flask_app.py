"""Flask: synchronous views send with the sync client (``task.send_sync``), no event loop needed.

pip install 'aioqueue[flask]'
aioqueue worker examples.proj:app                      # in one shell
flask --app examples.flask_app:web run                 # in another
curl -X POST 'localhost:5000/add?x=2&y=3'              # -> {"task_id": "..."}
curl 'localhost:5000/result/<task_id>'                 # -> {"state": "SUCCESS", "value": 5}

The sync client keeps one connection pool per process on a background thread and shares it
between Flask's request threads; under gunicorn each pre-forked worker builds its own on first
use.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request

from aioqueue import ResultTimeout

from .proj import add, app

web = Flask(__name__)


@web.post("/add")
def send_add() -> dict[str, Any]:
    result = add.send_sync(int(request.args["x"]), int(request.args["y"]))
    return {"task_id": result.id}


@web.get("/result/<task_id>")
def get_result(task_id: str) -> tuple[dict[str, Any], int]:
    result = app.SyncResult(task_id)
    try:
        value = result.get(timeout=float(request.args.get("wait", 5)))
    except ResultTimeout:
        return {"state": result.state()}, 404
    return {"state": result.state(), "value": value}, 200
