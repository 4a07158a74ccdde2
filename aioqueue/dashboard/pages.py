"""The dashboard's routes: overview, task list and page, dead letters; actions are POSTs.

Page handlers read :class:`~.live.Live`'s snapshots (no network) except the task page (one
result read, one dead-letter read of its queue, its workflow's states: see :mod:`.tree`) and
the dead letters page (one read of up to :data:`DEAD_SHOWN` letters per queue).
Actions redirect back with a message (POST/redirect/GET).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ..brokers.base import DeadLetter, dead_letter_id
from ..errors import AioQueueError
from ..message import Message
from ..operations import admin_of, drop_dead, requeue_dead
from .guard import read_form
from .html import ago, button, esc, link, num, page, table, task_path
from .index import FILTERS, STATE_OF_EVENT, TaskRecord
from .live import Live
from .masks import display_arguments, shown
from .tree import BACKEND_WAIT, workflow_section

__all__ = ["DEAD_SHOWN", "routes"]

DEAD_SHOWN = 100
"""Dead letters shown per queue (the newest)."""
_READY = ("SUCCESS", "FAILURE", "REVOKED")


def _live(request: Request) -> Live:
    live: Live = request.app.state.live
    return live


def _csrf(request: Request) -> str:
    token: str = request.scope["state"]["csrf"]
    return token


def _html(request: Request, title: str, body: str, *, live: bool = False) -> HTMLResponse:
    name = _live(request).app.name
    flash = request.query_params.get("msg", "")
    return HTMLResponse(page(title, name, body, flash=flash, live=live))


def _back(path: str, message: str, **query: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode({**query, 'msg': message})}", status_code=303)


# -- pieces ---------------------------------------------------------------------------------


def _events_banner(live: Live) -> str:
    if live.feed_error:
        return f'<div class="banner">Event stream unreachable: {esc(live.feed_error)}</div>'
    if not live.events_enabled:
        return (
            '<div class="banner">Task events are off (the <code>events</code> setting): no '
            "recent tasks or live worker heartbeats are recorded. Start the workers with "
            "<code>AIOQUEUE_EVENTS=1</code> (or <code>App(events=True)</code>) to see them; "
            "queues, dead letters and inspect replies still work.</div>"
        )
    return ""


def _workers(live: Live) -> str:
    rows = []
    for row in live.workers.rows():
        used = row.concurrency - row.slots_free
        width = 0 if not row.concurrency else int(8 * used / row.concurrency)
        slots = (
            f'<span class="slots"><span class="bar" style="width:{width}em"></span></span> '
            f"{esc(used)}/{esc(row.concurrency)} busy"
        )
        rows.append(
            (
                esc(row.worker),
                "online" if row.online else '<span class="off">lost/offline</span>',
                esc(row.queues),
                slots,
                num(row.slots_free),
                num(row.processed),
                esc(ago(row.last_seen)),
            )
        )
    headers = ("Worker", "Status", "Queues", "Slots", "Free", "Processed", "Last seen")
    return table(headers, rows, "no worker seen yet (heartbeats or inspect replies)")


def _rate(value: float | None) -> str:
    return num("-" if value is None else f"{value:.1f}")


def _queues(live: Live) -> str:
    rows = []
    notes: list[str] = []
    for name in live.queue_names():
        row = live.queues.get(name)
        if row is None:
            rows.append((esc(name), *([num("…")] * 8)))
            continue
        s = row.stats
        unknown = s.unknown
        oldest = s.oldest
        if unknown:
            notes += [f"{name}: {field}: {why}" for field, why in sorted(unknown.items())]
        rows.append(
            (
                link("/tasks", name, queue=name),
                num(s.depth),
                num(s.delayed),
                num("?" if "in_flight" in unknown else s.in_flight),
                num(s.consumers),
                num(
                    "?"
                    if "oldest_age" in unknown or "oldest_held_age" in unknown
                    else "-"
                    if oldest is None
                    else f"{oldest:.1f}s"
                ),
                link("/dead-letters", s.dead, queue=name) if s.dead else num(0),
                _rate(row.sent_rate),
                _rate(row.done_rate),
            )
        )
    headers = ("Queue", "Depth", "Delayed", "In flight", "Consumers", "Oldest", "Dead")
    shown = table((*headers, "In/s", "Done/s"), rows, "no queue")
    if notes:  # why a "?" (a worker that did not answer, RabbitMQ's waiting messages)
        shown += "<p class=note>? " + "<br>? ".join(esc(note) for note in notes) + "</p>"
    return shown


def _task_rows(records: list[TaskRecord]) -> str:
    now = time.time()
    rows = [
        (
            link(task_path(r.task_id), r.task_id),
            esc(r.name),
            f'<span class="{esc(r.state)}">{esc(r.state)}</span>',
            esc(r.queue),
            esc(r.worker),
            num(r.attempt or "-"),
            num("-" if r.runtime is None else f"{r.runtime * 1000:.1f} ms"),
            esc(ago(r.updated, now)),
            esc(r.exception[:120]),
        )
        for r in records
    ]
    headers = ("Task id", "Name", "State", "Queue", "Worker", "Try", "Runtime", "Updated", "Error")
    return table(headers, rows, "no task matches")


# -- pages ----------------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    live = _live(request)
    problems = f'<div class="banner">{esc(live.poll_error)}</div>' if live.poll_error else ""
    body = (
        f'<div id="live">{_events_banner(live)}{problems}'
        f"<h2>Workers</h2>{_workers(live)}<h2>Queues</h2>{_queues(live)}"
        f"<h2>Recent tasks ({esc(len(live.index))} kept) · {link('/tasks', 'all')}</h2>"
        f"{_task_rows(live.index.page({}, limit=15))}</div>"
    )
    return _html(request, "Overview", body, live=True)


def _filter_form(live: Live, filters: dict[str, str], limit: int) -> str:
    choices = {
        "state": list(dict.fromkeys(STATE_OF_EVENT.values())),
        **{name: live.index.values_of(name) for name in FILTERS if name != "state"},
    }
    parts = []
    for name in FILTERS:
        options = "".join(
            f'<option value="{esc(v)}"{" selected" if v == filters.get(name) else ""}>'
            f"{esc(v)}</option>"
            for v in choices[name][:500]
        )
        parts.append(
            f'<label>{esc(name)} <select name="{esc(name)}"><option value="">any</option>'
            f"{options}</select></label> "
        )
    return (
        f'<form method="get" action="/tasks">{"".join(parts)}'
        f'<input type="hidden" name="limit" value="{esc(limit)}">'
        '<button type="submit">Filter</button> <a href="/tasks">clear</a></form>'
    )


async def tasks(request: Request) -> Response:
    live = _live(request)
    filters = {name: request.query_params.get(name, "") for name in FILTERS}
    try:
        limit = min(max(int(request.query_params.get("limit", "100")), 1), 1000)
    except ValueError:
        limit = 100
    records = live.index.page(filters, limit=limit)
    body = (
        f"{_filter_form(live, filters, limit)}"
        f'<div id="live">{_events_banner(live)}'
        f"<h2>Tasks: newest {esc(len(records))} of {esc(len(live.index))} kept</h2>"
        f"{_task_rows(records)}</div>"
    )
    return _html(request, "Tasks", body, live=True)


async def _result(live: Live, task_id: str) -> tuple[Any, str]:
    """(the stored outcome or None, a note on why there is none)."""
    app = live.app
    try:
        async with asyncio.timeout(BACKEND_WAIT):  # a hung backend delays the page, no more
            backend = await app.ready_backend()
            raw = await backend.get(task_id)
    except TimeoutError:
        return None, f"result backend did not answer within {BACKEND_WAIT:g} s"
    except AioQueueError as exc:
        return None, f"result backend unreachable: {exc}"
    if raw is None:
        return None, "no result stored (pending, expired, or a backend that keeps none)"
    try:
        return app.codec.decode_outcome(raw), ""
    except AioQueueError as exc:
        return None, f"stored result unreadable: {exc}"


async def _dead_letter_of(live: Live, queue: str, task_id: str) -> DeadLetter | None:
    if not queue:
        return None
    try:
        broker = await live.app.ready_broker()
        letters = await broker.dead_letters(queue, limit=DEAD_SHOWN)
    except AioQueueError:
        return None
    return next((d for d in letters if dead_letter_id(d.body) == task_id), None)


def _message_of(live: Live, letter: DeadLetter | None) -> Message | None:
    if letter is None or letter.size is not None:
        return None
    try:
        return live.app.codec.decode(letter.body)
    except AioQueueError:
        return None


def _history(record: TaskRecord | None) -> str:
    if record is None:
        return '<p class="off">not in the recent events</p>'
    rows = [
        (
            esc(time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"),
            f'<span class="{esc(STATE_OF_EVENT[kind])}">{esc(kind)}</span>',
            esc(" ".join(f"{k}={v}" for k, v in sorted(details.items()) if v is not None)[:300]),
        )
        for kind, at, details in record.history
    ]
    return table(("Time", "Event", "Details"), rows, "no event")


def _actions(request: Request, task_id: str, state: str, letter: DeadLetter | None) -> str:
    csrf = _csrf(request)
    out = []
    if state not in _READY:
        out.append(button(task_path(task_id, "revoke"), "Revoke", csrf))
        out.append(button(task_path(task_id, "revoke"), "Terminate", csrf, terminate="1"))
    if letter is not None:
        out.append(button(task_path(task_id, "retry"), "Retry", csrf, queue=letter.queue))
    elif state == "FAILURE":
        out.append(
            '<span class="off">Retry needs the message: this failure was not dead-lettered '
            "(only tasks whose retries ran out are kept), so its arguments are gone.</span>"
        )
    return " ".join(out)


async def task_page(request: Request) -> Response:
    live = _live(request)
    task_id = request.path_params["task_id"]
    record = live.index.get(task_id)
    (outcome, why), workflow = await asyncio.gather(
        _result(live, task_id), workflow_section(live, task_id, record)
    )
    queue = request.query_params.get("queue") or (record.queue if record else "")
    letter = await _dead_letter_of(live, queue, task_id)
    message = _message_of(live, letter)
    name = record.name if record else (message.task if message else "")
    state = outcome.state if outcome is not None else (record.state if record else "PENDING")
    if message is not None:
        arguments: Any = display_arguments(live.app, message.task, message.args, message.kwargs)
    else:
        arguments = record.args if record is not None else None
    facts = [
        ("Name", esc(name or "?")),
        ("State", f'<span class="{esc(state)}">{esc(state)}</span>'),
        ("Queue", esc(queue or "?")),
        ("Worker", esc(record.worker if record else "")),
        ("Attempt", esc(record.attempt if record else "")),
    ]
    if letter is not None:
        facts.append(("Dead letter", esc(f"{letter.reason} ({ago(letter.at)})")))
    body = [
        f"<h2>Task {esc(task_id)}</h2>",
        table(("", ""), [(f"<b>{k}</b>", v) for k, v in facts], ""),
        _actions(request, task_id, state, letter),
        "<h2>Arguments</h2>",
        f"<pre>{esc(shown(arguments))}</pre>"
        if arguments is not None
        else '<p class="off">not known: arguments are shown while the task runs (inspect) '
        "or while it is a dead letter; events do not carry them</p>",
        "<h2>State history</h2>",
        _history(record),
        "<h2>Result</h2>",
    ]
    if outcome is None:
        body.append(f'<p class="off">{esc(why)}</p>')
    else:
        body.append(f"<p>State in the backend: <b>{esc(outcome.state)}</b></p>")
        if outcome.exc_type:
            body.append(f"<p>{esc(outcome.exc_type)}: {esc(outcome.exc_message)}</p>")
        elif outcome.ready:
            body.append(f"<pre>{esc(shown(outcome.result))}</pre>")
        if outcome.traceback:
            body.append(f"<h2>Traceback</h2><pre>{esc(outcome.traceback)}</pre>")
    body.append(workflow)
    return _html(request, f"Task {task_id}", "".join(body))


async def dead_letters(request: Request) -> Response:
    live = _live(request)
    wanted = request.query_params.get("queue", "")
    queues = [wanted] if wanted else live.queue_names()
    csrf = _csrf(request)
    broker = await live.app.ready_broker()
    sections = []
    for queue in queues:
        letters = sorted(
            await broker.dead_letters(queue, limit=DEAD_SHOWN), key=lambda d: d.at, reverse=True
        )
        if not letters and not wanted:
            continue
        rows = []
        for letter in letters:
            task_id = dead_letter_id(letter.body) or ""
            message = _message_of(live, letter)
            rows.append(
                (
                    link(task_path(task_id), task_id, queue=queue) if task_id else "(unreadable)",
                    esc(message.task if message else ""),
                    esc(letter.reason),
                    esc(ago(letter.at)),
                    (
                        button("/dead-letters/requeue", "Requeue", csrf, queue=queue, id=task_id)
                        + " "
                        + button(
                            "/dead-letters/drop",
                            "Drop",
                            csrf,
                            f"Drop dead letter {task_id}?",
                            queue=queue,
                            id=task_id,
                        )
                    )
                    if task_id
                    else "",
                )
            )
        every = (
            button("/dead-letters/requeue", "Requeue all", csrf, queue=queue, all="1")
            + " "
            + button(
                "/dead-letters/drop",
                "Drop all",
                csrf,
                f"Drop every dead letter of {queue}?",
                queue=queue,
                all="1",
            )
            if letters
            else ""
        )
        sections.append(
            f"<h2>{esc(queue)}: {esc(len(letters))} shown (newest {DEAD_SHOWN} at most)</h2>"
            f"<p>{every}</p>"
            + table(("Task id", "Task", "Reason", "When", ""), rows, "no dead letters")
        )
    body = "".join(sections) or '<p class="off">no dead letters in any known queue</p>'
    return _html(request, "Dead letters", body)


# -- actions --------------------------------------------------------------------------------


async def _pick(request: Request) -> tuple[str, frozenset[str] | None]:
    form = await read_form(request)
    queue = form.get("queue", "")
    if form.get("all") == "1":
        return queue, None
    task_id = form.get("id", "")
    return queue, frozenset({task_id}) if task_id else frozenset()


async def requeue_action(request: Request) -> Response:
    live = _live(request)
    queue, ids = await _pick(request)
    if not queue or ids == frozenset():
        return _back("/dead-letters", "nothing picked: give a queue and an id (or all)")
    count = await requeue_dead(live.app, queue, ids)
    return _back("/dead-letters", f"requeued {count} dead letter(s) of {queue}")


async def drop_action(request: Request) -> Response:
    live = _live(request)
    queue, ids = await _pick(request)
    if not queue or ids == frozenset():
        return _back("/dead-letters", "nothing picked: give a queue and an id (or all)")
    admin_of(live.app)
    count = await drop_dead(live.app, queue, ids)
    return _back("/dead-letters", f"dropped {count} dead letter(s) of {queue}")


async def revoke_action(request: Request) -> Response:
    live = _live(request)
    task_id = request.path_params["task_id"]
    form = await read_form(request)
    report = await live.app.control.revoke(task_id, terminate=form.get("terminate") == "1")
    return _back(task_path(task_id), report.detail)


async def retry_action(request: Request) -> Response:
    """Retry a failed task whose message is kept as a dead letter: requeue it (same id)."""
    live = _live(request)
    task_id = request.path_params["task_id"]
    form = await read_form(request)
    queue = form.get("queue", "")
    if not queue:
        return _back(task_path(task_id), "retry needs the task's queue")
    count = await requeue_dead(live.app, queue, frozenset({task_id}))
    text = "sent again (its dead letter requeued)" if count else "no dead letter of it to retry"
    return _back(task_path(task_id), f"task {task_id}: {text}", queue=queue)


routes = [
    Route("/", overview),
    Route("/tasks", tasks),
    # actions first: a task id may hold a "/" (the page's route takes the whole rest)
    Route("/tasks/{task_id:path}/revoke", revoke_action, methods=["POST"]),
    Route("/tasks/{task_id:path}/retry", retry_action, methods=["POST"]),
    Route("/tasks/{task_id:path}", task_page),
    Route("/dead-letters", dead_letters),
    Route("/dead-letters/requeue", requeue_action, methods=["POST"]),
    Route("/dead-letters/drop", drop_action, methods=["POST"]),
]
