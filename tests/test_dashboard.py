"""The dashboard's pages, authentication and CSRF checks through Starlette's TestClient, on a
memory app whose events the test feeds in (the browser test runs it against a real worker)."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from aioqueue import App
from aioqueue.dashboard import Access, Live, check_bind, create_dashboard
from aioqueue.dashboard.guard import CSRF_COOKIE
from aioqueue.dashboard.index import TaskIndex
from aioqueue.errors import ConfigurationError
from aioqueue.events import Event


def _app() -> App:
    app = App("dash-unit", broker="memory://")

    @app.task(name="dash.add")
    async def add(a: int, b: int) -> int:
        return a + b

    return app


def _event(kind: str, task_id: str, **fields: object) -> Event:
    known = {
        k: fields.pop(k) for k in ("name", "queue", "worker", "attempt", "runtime") if k in fields
    }
    return Event(type=kind, timestamp=time.time(), task_id=task_id, fields=dict(fields), **known)  # type: ignore[arg-type]


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = _app()
    live = Live(app, poll_interval=0.2)
    with TestClient(create_dashboard(app, live=live, close_app=True)) as client:
        yield client


def _csrf(client: TestClient) -> str:
    client.get("/")
    token = client.cookies.get(CSRF_COOKIE)
    assert token
    return token


def test_overview_shows_workers_queues_and_recent_tasks(client: TestClient) -> None:
    live: Live = client.app.state.live  # type: ignore[attr-defined]
    live.apply(
        Event(
            "worker-heartbeat",
            time.time(),
            worker="w-1",
            fields={"queues": "default", "concurrency": 4, "busy": 3, "processed": 7},
        )
    )
    live.apply(_event("task-sent", "t-1", name="dash.add", queue="default"))
    live.apply(_event("task-started", "t-1", name="dash.add", queue="default", worker="w-1"))
    live.apply(
        _event(
            "task-failed",
            "t-1",
            name="dash.add",
            queue="default",
            worker="w-1",
            runtime=0.01,
            exception="ValueError: <b>bad</b>",
        )
    )
    page = client.get("/")
    assert page.status_code == 200
    text = page.text
    assert "w-1" in text and "3/4 busy" in text
    assert "default" in text
    assert "t-1" in text and "FAILURE" in text
    assert "<b>bad</b>" not in text and "&lt;b&gt;bad&lt;/b&gt;" in text  # escaped
    assert "Task events are off" not in text  # events arrived


def test_events_off_is_said_on_the_page(client: TestClient) -> None:
    assert "Task events are off" in client.get("/").text
    assert "Task events are off" in client.get("/tasks").text


def test_task_list_filters_and_task_page(client: TestClient) -> None:
    live: Live = client.app.state.live  # type: ignore[attr-defined]
    for i in range(30):
        live.apply(_event("task-sent", f"a-{i}", name="dash.add", queue="default"))
        kind = "task-succeeded" if i % 2 else "task-failed"
        live.apply(_event(kind, f"a-{i}", name="dash.add", queue="default", worker="w"))
    page = client.get("/tasks", params={"state": "FAILURE"})
    ids = set(re.findall(r">(a-\d+)</a>", page.text))
    assert ids == {f"a-{i}" for i in range(0, 30, 2)}
    task = client.get("/tasks/a-3")
    assert task.status_code == 200
    assert "task-sent" in task.text and "task-succeeded" in task.text
    assert "no result stored" in task.text  # the test fed events only


def test_index_is_bounded_and_pages_newest_first() -> None:
    index = TaskIndex(max_tasks=100)
    for i in range(250):
        index.add(_event("task-sent", f"t{i}", name=f"n{i % 3}", queue="q"))
    assert len(index) == 100
    assert index.get("t149") is None and index.get("t150") is not None
    newest = index.page({"name": "n0"}, limit=3)
    assert [r.task_id for r in newest] == ["t249", "t246", "t243"]
    assert index.count("queue", "q") == 100
    index.add(_event("task-succeeded", "t150", name="n0", queue="q"))
    assert index.page({"state": "SUCCESS"}, limit=10)[0].task_id == "t150"
    assert index.count("state", "PENDING") == 99


def test_post_without_csrf_token_is_refused(client: TestClient) -> None:
    _csrf(client)
    refused = client.post("/tasks/x/revoke", data={"csrf": "wrong"})
    assert refused.status_code == 403 and "CSRF" in refused.text
    missing = client.post("/tasks/x/revoke", data={})
    assert missing.status_code == 403
    client.cookies.clear()
    no_cookie = client.post("/tasks/x/revoke", data={"csrf": "anything"})
    assert no_cookie.status_code == 403 and "cookie" in no_cookie.text


def test_post_from_another_origin_is_refused(client: TestClient) -> None:
    token = _csrf(client)
    other = client.post(
        "/tasks/x/revoke", data={"csrf": token}, headers={"Origin": "http://evil.example"}
    )
    assert other.status_code == 403 and "Origin" in other.text


def test_post_with_the_token_acts(client: TestClient) -> None:
    token = _csrf(client)
    done = client.post("/tasks/nobody/revoke", data={"csrf": token}, follow_redirects=False)
    assert done.status_code == 303
    page = client.get(done.headers["location"])
    assert "will never start" in page.text
    nothing = client.post(
        "/dead-letters/requeue", data={"csrf": token, "queue": "default"}, follow_redirects=False
    )
    assert "nothing picked" in client.get(nothing.headers["location"]).text


def test_basic_auth_is_required_when_configured() -> None:
    app = _app()
    with TestClient(
        create_dashboard(app, auth="admin:s3cret", poll_interval=0.2, close_app=True)
    ) as client:
        assert client.get("/").status_code == 401
        assert client.get("/", auth=("admin", "wrong")).status_code == 401
        assert client.get("/", auth=("admin", "s3cret")).status_code == 200


def test_token_by_header_or_once_in_the_url() -> None:
    app = _app()
    with TestClient(
        create_dashboard(app, token="tok-123", poll_interval=0.2, close_app=True)
    ) as client:
        assert client.get("/").status_code == 401
        assert client.get("/", headers={"Authorization": "Bearer tok-123"}).status_code == 200
        first = client.get("/tasks?token=tok-123", follow_redirects=False)
        assert first.status_code == 303 and "token" not in first.headers["location"]
        assert client.get("/tasks").status_code == 200  # the cookie now
        basic = base64.b64encode(b"x:tok-123").decode()
        client.cookies.clear()
        assert client.get("/", headers={"Authorization": f"Basic {basic}"}).status_code == 401


def test_binding_beyond_loopback_needs_credentials() -> None:
    check_bind("127.0.0.1", Access())
    check_bind("::1", Access())
    check_bind("localhost", Access())
    with pytest.raises(ConfigurationError, match="beyond this machine"):
        check_bind("0.0.0.0", Access())
    check_bind("0.0.0.0", Access("u", "p"))
    check_bind("0.0.0.0", Access(token="t"))
    assert "p" not in repr(Access("u", "p")).replace("password", "")


def test_cli_refuses_a_public_bind_without_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    from aioqueue.cli import main

    monkeypatch.delenv("AIOQUEUE_DASHBOARD_AUTH", raising=False)
    monkeypatch.delenv("AIOQUEUE_DASHBOARD_TOKEN", raising=False)
    assert main(["dashboard", "nowhere:app", "--host", "0.0.0.0"]) == 2
    assert main(["dashboard", "x:app", "--auth", "nocolon", "--host", "0.0.0.0"]) == 2


def test_odd_task_ids_are_quoted_in_links_and_actions(client: TestClient) -> None:
    live: Live = client.app.state.live  # type: ignore[attr-defined]
    odd = "a/b?c#d <x>"
    live.apply(_event("task-sent", odd, name="dash.add", queue="default"))
    listing = client.get("/tasks").text
    assert 'href="/tasks/a%2Fb%3Fc%23d%20%3Cx%3E"' in listing
    page = client.get("/tasks/a%2Fb%3Fc%23d%20%3Cx%3E")
    assert page.status_code == 200 and "a/b?c#d &lt;x&gt;" in page.text
    token = _csrf(client)
    done = client.post(
        "/tasks/a%2Fb%3Fc%23d%20%3Cx%3E/revoke", data={"csrf": token}, follow_redirects=True
    )
    assert done.status_code == 200 and "will never start" in done.text


def test_arguments_are_masked_by_name_and_value() -> None:
    from aioqueue.dashboard.masks import display_arguments

    shown = display_arguments(
        _app(), "dash.add", (1, "redis://:pw@db:6379/0"), {"password": "hunter2", "b": 2}
    )
    assert shown["kwargs"] == {"password": "********", "b": 2}
    assert "pw@" not in shown["args"][1] and shown["args"][0] == 1


def test_arguments_of_declared_sensitive_parameters_are_masked() -> None:
    """With the security branch's ``sensitive=`` (``aioqueue.masking``) merged in."""
    pytest.importorskip("aioqueue.masking")
    from aioqueue.dashboard.masks import display_arguments

    app = App("dash-sensitive", broker="memory://")

    @app.task(name="dash.charge", sensitive=("card",))  # type: ignore[call-overload]
    async def charge(amount: int, card: str) -> None:
        return None

    shown = display_arguments(app, "dash.charge", (5, "4111-1111"), {})
    assert shown["args"] == [5, "********"]
    shown = display_arguments(app, "dash.charge", (5,), {"card": "4111-1111"})
    assert shown["kwargs"] == {"card": "********"}
