"""What the FastAPI and aiohttp examples share: a task's progress as server-sent events, and the
page that shows it in a browser.

Server-sent events are a plain HTTP response that stays open, one ``data:`` block per state
change; the browser's ``EventSource`` reads them with no library. ``result.watch()`` yields each
state change as the worker stores it (pushed by the result backend, not polled) and ends with
the final one, so the stream ends when the task does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aioqueue import AsyncResult

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


async def progress_events(result: AsyncResult[Any]) -> AsyncIterator[bytes]:
    """``data: {"state": ..., "meta": ...}`` for each state change, the final one last."""
    async for update in result.watch():
        meta = update.meta if not isinstance(update.meta, BaseException) else repr(update.meta)
        payload = json.dumps({"state": update.state, "meta": meta}, default=str)
        yield f"data: {payload}\n\n".encode()


PAGE = """<!doctype html>
<title>aioqueue progress</title>
<button id="go">count to 5</button>
<pre id="log"></pre>
<script>
const log = (line) => { document.getElementById("log").textContent += line + "\\n"; };
document.getElementById("go").onclick = async () => {
  const sent = await fetch("count?total=5", {method: "POST"});
  const {task_id} = await sent.json();
  const events = new EventSource(`progress/${task_id}`);
  events.onmessage = (event) => {
    const update = JSON.parse(event.data);
    log(`${update.state} ${JSON.stringify(update.meta)}`);
    if (["SUCCESS", "FAILURE", "REVOKED"].includes(update.state)) events.close();
  };
};
</script>
"""
