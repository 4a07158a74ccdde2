"""The Django example shop started for real: ``manage.py migrate``, ``manage.py runserver`` and
``aioqueue worker shop.worker:app`` as subprocesses (once for the module) on a SQLite file and
the real Redis; and the shop's own tests under Django's test runner (``manage.py test``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from conftest import REDIS_URL, require_server
from servers import (
    ROOT,
    Process,
    delete_prefixed_sync,
    free_port,
    new_prefix,
    port_open,
    start_worker,
)

from aioqueue import App, States
from aioqueue.sync import run_sync, sync_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

PROJECT = ROOT / "examples" / "django_project"


@dataclass
class Shop:
    url: str
    env: dict[str, str]
    queue: App
    """An App on the shop's broker and key prefix, for looking at what was sent."""
    processes: list[Process]


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    require_server(REDIS_URL, "Redis")
    prefix = new_prefix()
    log_dir = tmp_path_factory.mktemp("django-shop")
    env = {
        "AIOQUEUE_BROKER_URL": REDIS_URL,
        "AIOQUEUE_RESULT_BACKEND": REDIS_URL,
        "AIOQUEUE_KEY_PREFIX": prefix,
        "DJANGO_DB_PATH": str(log_dir / "db.sqlite3"),
    }
    migrated = manage("migrate", "-v", "0", env=env)
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    queue = App("shop-probe", broker=REDIS_URL, backend=REDIS_URL, key_prefix=prefix)
    argv = [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]
    processes = [Process("runserver", argv, cwd=PROJECT, env=env, log_dir=log_dir)]
    try:
        # One task at a time, in queue order: see test_a_rolled_back_order_sends_nothing.
        worker = start_worker(
            "shop.worker:app", cwd=PROJECT, env=env, log_dir=log_dir, concurrency=1
        )
        processes.append(worker)
        processes[0].wait_for(lambda: port_open(port), "open port")
        yield Shop(f"http://127.0.0.1:{port}", env, queue, processes)
    finally:
        for process in processes:
            process.stop()
        sync_client(queue).close()
        delete_prefixed_sync(prefix)


def wait_for_status(client: httpx.Client, order_id: int, status: str) -> None:
    deadline = time.monotonic() + 20
    while (got := client.get(f"/orders/{order_id}/").json()["status"]) != status:
        assert time.monotonic() < deadline, f"order {order_id} is still {got!r}"
        time.sleep(0.05)


def test_the_worker_confirms_a_committed_order(shop: Shop) -> None:
    with httpx.Client(base_url=shop.url, timeout=20) as client:
        created = client.post("/orders/", data={"item": "book"})
        assert created.status_code == 201, created.text
        wait_for_status(client, created.json()["order_id"], "confirmed")
        result = shop.queue.AsyncResult(created.json()["task_id"])
        assert run_sync(shop.queue, "get", result.get, 10) == "confirmed"


def test_a_rolled_back_order_sends_nothing(shop: Shop) -> None:
    with httpx.Client(base_url=shop.url, timeout=20) as client:
        declined = client.post("/orders/", params={"fail": 1}, data={"item": "lamp"})
        assert declined.status_code == 402, declined.text
        # An order sent after it is confirmed; the worker runs one task at a time in queue
        # order, so a confirmation sent for the declined order would have run before it.
        created = client.post("/orders/", data={"item": "pen"})
        wait_for_status(client, created.json()["order_id"], "confirmed")
    never_sent = shop.queue.AsyncResult(declined.json()["task_id"])
    assert run_sync(shop.queue, "state", never_sent.state) == States.PENDING
    assert run_sync(shop.queue, "queued", shop.queue.broker.queue_length, "default") == 0


def test_the_shops_tests_pass_under_djangos_runner(shop: Shop) -> None:
    # Their own key prefix: the running worker must not take what they count.
    env = {**shop.env, "AIOQUEUE_KEY_PREFIX": new_prefix()}
    try:
        ran = manage("test", "orders", "-v", "2", env=env)
        assert ran.returncode == 0, ran.stderr
        assert "Ran 2 tests" in ran.stderr
    finally:
        delete_prefixed_sync(env["AIOQUEUE_KEY_PREFIX"])
