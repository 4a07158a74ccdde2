"""send_on_commit with Django's real transactions (SQLite) over the real Redis broker: a commit
sends once, a rollback (of the transaction or of the savepoint) sends nothing, and the worker
finds the committed row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest
import redis
from conftest import REDIS_URL, require_server, wait_until
from django.conf import settings
from django.db import connection, connections, transaction
from test_sync_client import worker_on_client_loop

from aioqueue import App, Task
from aioqueue.contrib.django import send_on_commit
from aioqueue.sync import run_sync, sync_client


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Django configured once for this process, on a SQLite file the worker threads share."""
    if not settings.configured:
        path = tmp_path_factory.mktemp("django") / "db.sqlite3"
        settings.configure(
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)}},
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, status TEXT)")
    yield
    connections.close_all()
    Path(settings.DATABASES["default"]["NAME"]).unlink(missing_ok=True)


@pytest.fixture
def app(database: None, key_prefix: str) -> Iterator[App]:
    require_server(REDIS_URL, "Redis")
    app = App("django-contrib", broker=REDIS_URL, backend=REDIS_URL, key_prefix=key_prefix)
    yield app
    sync_client(app).close()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def confirm_task(app: App) -> Task[Any, int]:
    @app.task(name="orders.confirm", executor="thread")
    def confirm(order_id: int) -> int:
        """Marks the order; returns how many rows it found (0: the row was not committed)."""
        try:
            with connection.cursor() as cursor:
                cursor.execute("UPDATE orders SET status = 'confirmed' WHERE id = %s", [order_id])
                return int(cursor.rowcount)
        finally:
            connection.close()

    return confirm


def queued(app: App) -> int:
    return run_sync(app, "queue_length", app.broker.queue_length, app.conf.default_queue)


def status(order_id: int) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT status FROM orders WHERE id = %s", [order_id])
        row = cursor.fetchone()
    return None if row is None else str(row[0])


def test_commit_sends_once_and_the_worker_finds_the_row(app: App) -> None:
    confirm = confirm_task(app)
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO orders (id, status) VALUES (1, 'new')")
        send_on_commit(confirm.s(1))
        assert queued(app) == 0  # not before the commit
    assert queued(app) == 1
    with transaction.atomic():
        pass  # a later commit does not send it again
    assert queued(app) == 1
    with worker_on_client_loop(app):
        run_sync(app, "wait", wait_for_empty, app)
    assert status(1) == "confirmed"


async def wait_for_empty(app: App) -> None:
    async def done() -> bool:
        return await app.broker.queue_length(app.conf.default_queue) == 0

    await wait_until(done)


def test_rollback_sends_nothing(app: App) -> None:
    confirm = confirm_task(app)
    with pytest.raises(RuntimeError, match="payment declined"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO orders (id, status) VALUES (2, 'new')")
        send_on_commit(confirm.s(2))
        raise RuntimeError("payment declined")
    assert status(2) is None
    assert queued(app) == 0


def test_savepoint_rollback_drops_only_its_sends(app: App) -> None:
    confirm = confirm_task(app)
    with transaction.atomic():
        send_on_commit(confirm.s(3).set(task_id="kept"))
        with pytest.raises(RuntimeError), transaction.atomic():
            send_on_commit(confirm.s(4).set(task_id="dropped"))
            raise RuntimeError("inner step failed")
    assert queued(app) == 1
    with worker_on_client_loop(app):
        result = app.AsyncResult("kept")
        assert run_sync(app, "get", result.get, 10) == 0  # no row 3: it just runs
    assert run_sync(app, "state", app.AsyncResult("dropped").state) == "PENDING"


def test_autocommit_sends_at_once(app: App) -> None:
    confirm = confirm_task(app)
    send_on_commit(confirm.s(5))
    assert queued(app) == 1


def test_only_a_bound_call_is_accepted(app: App) -> None:
    confirm = confirm_task(app)
    with pytest.raises(TypeError, match=r"add\.s\(2, 3\)"):
        send_on_commit(confirm)  # type: ignore[arg-type]
    with transaction.atomic():
        pass
    assert queued(app) == 0


def test_the_task_methods_wait_for_the_commit_too(app: App) -> None:
    """``confirm.send_on_commit(6)`` (Celery users' spelling) and the ``.options()`` form ride on
    the same helper: nothing before the commit, nothing on rollback."""
    confirm = confirm_task(app)
    with transaction.atomic():
        confirm.send_on_commit(6)
        confirm.options(task_id="with-options").send_on_commit(7)
        assert queued(app) == 0
    assert queued(app) == 2
    with pytest.raises(RuntimeError), transaction.atomic():
        confirm.send_on_commit(8)
        raise RuntimeError("rolled back")
    assert queued(app) == 2
