"""``aioqueue inspect`` and ``aioqueue control`` against a real worker subprocess.

Redis (the control bus is a Redis channel) and RabbitMQ alone (``rpc://`` results: the control
bus is a RabbitMQ stream, replies come on an exclusive queue).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_URL, delete_prefixed, wait_until
from test_cli_ops import aioqueue
from workers import WorkerSet, worker_env

from aioqueue import App, ResultTimeout, TaskRevoked

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def client(urls: tuple[str, str], key_prefix: str) -> AsyncIterator[App]:
    broker, backend = urls
    app = App(
        "client",
        broker=broker,
        backend=backend,
        key_prefix=key_prefix,
        amqp_delete_queues_on_close=True,
    )
    async with app:
        yield app
    if backend.startswith("redis"):
        await delete_prefixed(REDIS_URL, key_prefix)


async def test_inspect_and_control_a_worker_from_the_command_line(
    client: App, urls: tuple[str, str], key_prefix: str, tmp_path: Path
) -> None:
    broker, backend = urls
    env = worker_env(broker, key_prefix, result_backend=backend)
    workers = WorkerSet(env, tmp_path)
    try:
        worker = await workers.start("-c", "4", "--shutdown-timeout", "5", app_path="ops_app:app")
        wid = await worker.wait_ready()
        code, out, err = await aioqueue(env, "inspect", "ping", "ops_app:app", "--json")
        assert code == 0, err
        assert json.loads(out) == {wid: "pong"}

        secret_dsn = "amqp://user:s3cret@mq:5672/"
        napping = await client.send_task(
            "ops_app.nap", [60.0], {"password": "hunter2", "dsn": secret_dsn}
        )

        async def active() -> list[dict[str, object]]:
            code, out, err = await aioqueue(
                env, "inspect", "active", "ops_app:app", "--worker", wid, "--json"
            )
            assert code == 0, err
            rows: list[dict[str, object]] = json.loads(out)[wid]
            return rows

        async def napping_seen() -> bool:
            return bool(await active())

        await wait_until(napping_seen, timeout=20, interval=0.1)
        (row,) = await active()
        assert row["id"] == napping.id and row["name"] == "ops_app.nap"
        assert row["kwargs"] == {"password": "********", "dsn": "amqp://user:********@mq:5672/"}

        code, out, _ = await aioqueue(env, "inspect", "active", "ops_app:app", "--worker", wid)
        assert code == 0 and f"{wid}: 1 active" in out and napping.id in out
        assert "hunter2" not in out and "s3cret" not in out

        code, out, _ = await aioqueue(env, "inspect", "registered", "ops_app:app", "--json")
        names = {entry["name"] for entry in json.loads(out)[wid]}
        assert {"ops_app.nap", "ops_app.late"} <= names
        code, out, _ = await aioqueue(env, "inspect", "stats", "ops_app:app", "--worker", wid)
        assert code == 0 and "concurrency: 4" in out and "running: 1" in out
        code, out, _ = await aioqueue(env, "inspect", "conf", "ops_app:app", "--json")
        conf = json.loads(out)[wid]
        assert conf["key_prefix"] == key_prefix and conf["result_backend"] == backend
        if broker.startswith("amqp"):
            assert "guest:guest" not in out and ":********@" in conf["broker_url"]

        # nobody by that id: a bounded wait, then exit 1
        started = time.monotonic()
        code, _, err = await aioqueue(
            env, "inspect", "ping", "ops_app:app", "--worker", "nobody", "--timeout", "0.5"
        )
        assert code == 1 and "no worker replied within 0.5s" in err
        assert time.monotonic() - started < 15

        code, out, err = await aioqueue(
            env, "control", "revoke", "ops_app:app", napping.id, "--terminate"
        )
        assert code == 0 and napping.id in out, err
        with pytest.raises(TaskRevoked):
            await napping.get(timeout=20)

        code, out, err = await aioqueue(
            env, "control", "add-consumer", "ops_app:app", "extra", "--worker", wid
        )
        assert code == 0 and out.strip() == f"{wid}: consuming default,extra", err
        code, out, _ = await aioqueue(env, "inspect", "stats", "ops_app:app", "--json")
        assert json.loads(out)[wid]["queues"] == ["default", "extra"]
        code, out, err = await aioqueue(
            env, "control", "cancel-consumer", "ops_app:app", "default", "--worker", wid
        )
        assert code == 0 and out.strip() == f"{wid}: consuming extra", err
        extra = await client.send_task("ops_app.late", [5], queue="extra")
        assert await extra.get(timeout=20) == 50
        code, out, _ = await aioqueue(
            env, "control", "cancel-consumer", "ops_app:app", "extra", "--worker", wid
        )
        assert code == 1 and "only queue" in out

        code, out, err = await aioqueue(
            env, "control", "shutdown", "ops_app:app", "--worker", wid, "--json", "--timeout", "10"
        )
        assert code == 0, err
        assert json.loads(out) == {wid: "shutting down"}
        assert await worker.wait_exit(30) == 0
        assert "shutdown requested by remote control" in worker.stderr()
    finally:
        await workers.close()


async def test_limits_set_from_the_command_line_reach_a_running_worker(
    client: App, urls: tuple[str, str], key_prefix: str, tmp_path: Path
) -> None:
    broker, backend = urls
    env = worker_env(broker, key_prefix, result_backend=backend)
    workers = WorkerSet(env, tmp_path)
    try:
        worker = await workers.start("-c", "4", "--shutdown-timeout", "5", app_path="ops_app:app")
        await worker.wait_ready()
        code, out, err = await aioqueue(
            env, "control", "rate-limit", "ops_app:app", "ops_app.late", "1/m"
        )
        assert code == 0 and "rate limit 1/m" in out, err

        async def deferred() -> bool:
            """A late task that does not finish within a second: the limit is in force (the
            first one after it takes the minute's one start)."""
            handle = await client.send_task("ops_app.late", [1])
            try:
                await handle.get(timeout=1.0)
            except ResultTimeout:
                await handle.revoke()
                return True
            return False

        await wait_until(deferred, timeout=30, interval=0.1)
        code, out, err = await aioqueue(
            env, "control", "reset-limits", "ops_app:app", "ops_app.late"
        )
        assert code == 0 and "declared limits" in out, err

        async def prompt() -> bool:
            handle = await client.send_task("ops_app.late", [2])
            try:
                return bool(await handle.get(timeout=1.0) == 20)
            except ResultTimeout:
                await handle.revoke()
                return False

        await wait_until(prompt, timeout=30, interval=0.1)
        code, _, err = await aioqueue(
            env, "control", "concurrency-limit", "ops_app:app", "ops_app.late", "many"
        )
        assert code == 2 and "positive number or none" in err
    finally:
        await workers.close()


def _default_row(out: str) -> dict[str, Any]:
    rows = [row for row in json.loads(out) if row["queue"] == "default"]
    assert len(rows) == 1, out
    row: dict[str, Any] = rows[0]
    return row


async def test_queues_counts_what_a_live_worker_holds(
    client: App, urls: tuple[str, str], key_prefix: str, tmp_path: Path
) -> None:
    """IN FLIGHT and OLDEST come from the workers where the broker cannot tell (RabbitMQ):
    exact once every live worker answered; with none running, nothing is held."""
    broker, backend = urls
    env = worker_env(broker, key_prefix, result_backend=backend)
    code, out, err = await aioqueue(env, "queues", "ops_app:app", "--json")
    assert code == 0, err
    idle = _default_row(out)
    assert idle["in_flight"] == 0 and idle["oldest"] is None, idle
    assert not {"in_flight", "oldest_held_age"} & set(idle["unknown"]), idle

    workers = WorkerSet(env, tmp_path)
    try:
        worker = await workers.start("-c", "4", "--shutdown-timeout", "1", app_path="ops_app:app")
        await worker.wait_ready()
        await client.send_task("ops_app.nap", [60.0])
        first_sent = time.time()
        await client.send_task("ops_app.nap", [60.0])

        async def two_held() -> bool:
            code, out, err = await aioqueue(env, "queues", "ops_app:app", "--json")
            assert code == 0, err
            return bool(_default_row(out)["in_flight"] == 2)

        await wait_until(two_held, timeout=20, interval=0.1)
        asked = time.time()
        code, out, err = await aioqueue(env, "queues", "ops_app:app", "--json")
        assert code == 0, err
        row = _default_row(out)
        assert (row["depth"], row["in_flight"], row["consumers"]) == (0, 2, 1), row
        assert row["oldest_held_age"] >= asked - first_sent, row
        assert row["oldest"] == row["oldest_held_age"] and row["unknown"] == {}, row

        code, out, err = await aioqueue(env, "queues", "ops_app:app", "-Q", "default")
        assert code == 0, err
        header, line = out.splitlines()  # nothing unknown: no footnote
        cells = dict(
            zip(header.replace("IN FLIGHT", "IN_FLIGHT").split(), line.split(), strict=True)
        )
        assert cells["IN_FLIGHT"] == "2" and cells["OLDEST"].endswith("s"), out
    finally:
        await workers.close()
