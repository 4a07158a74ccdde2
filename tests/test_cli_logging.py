"""The worker's log lines as users run it: ``--log-format json``, ``--tracebacks``, redeliveries
after a worker is killed, dependency noise kept out, ``worker --help`` and ``conf``."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import AMQP_URL, REDIS_URL, wait_until
from test_cli_ops import aioqueue
from workers import WorkerSet, worker_env

from aioqueue import App
from aioqueue.config import mask_url

pytestmark = pytest.mark.timeout(90)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON: nothing else slips in


def task_lines(records: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("task_id") == task_id]


async def test_json_lines_tracebacks_and_redeliveries(
    client: App, broker_url: str, key_prefix: str, tmp_path: Path
) -> None:
    env = worker_env(broker_url, key_prefix, result_backend=REDIS_URL)
    workers = WorkerSet(env, tmp_path)
    try:
        first = await workers.start("-c", "2", "--log-format", "json", app_path="ops_app:app")
        ok = await client.send_task("ops_app.late", [4])
        assert await ok.get(timeout=10) == 40
        bad = await client.send_task("ops_app.boom", ["no good"])
        with pytest.raises(ValueError):
            await bad.get(timeout=10)

        async def logged() -> bool:
            return bool(task_lines(json_lines(first.stderr()), bad.id))

        await wait_until(logged, timeout=10)
        records = json_lines(first.stderr())
        (done,) = task_lines(records, ok.id)
        assert done["outcome"] == "succeeded" and done["level"] == "INFO"
        assert {"task": "ops_app.late", "queue": "default", "attempt": 1}.items() <= done.items()
        assert done["runtime"] >= 0 and done["logger"] == "aioqueue.worker"
        (failed,) = task_lines(records, bad.id)
        assert failed["outcome"] == "failed" and failed["level"] == "ERROR"
        assert "ValueError" in failed["message"] and "traceback" not in failed

        # a task running when its worker is killed: the next worker says it came back
        napping = await client.send_task("ops_app.nap", [60.0])

        async def running() -> bool:
            code, out, _ = await aioqueue(
                env, "inspect", "active", "ops_app:app", "--json", "--timeout", "0.5"
            )
            return code == 0 and napping.id in out

        await wait_until(running, timeout=15, interval=0.1)
        first.send_signal(signal.SIGKILL)
        await first.wait_exit(10)

        second = await workers.start(
            "-c",
            "2",
            "--log-format",
            "json",
            "--loglevel",
            "debug",
            "--tracebacks",
            app_path="ops_app:app",
        )

        async def redelivered() -> bool:
            lines = task_lines(json_lines(second.stderr()), napping.id)
            return any(r.get("outcome") == "redelivered" for r in lines)

        await wait_until(redelivered, timeout=30, interval=0.1)
        records = json_lines(second.stderr())
        (again,) = [r for r in task_lines(records, napping.id) if r["outcome"] == "redelivered"]
        assert again["attempt"] == 2 and again["task"] == "ops_app.nap"
        if broker_url == REDIS_URL:
            assert any("recovered 1 task(s) from dead worker" in r["message"] for r in records)

        bad2 = await client.send_task("ops_app.boom", ["again"])
        with pytest.raises(ValueError):
            await bad2.get(timeout=10)

        async def failed_logged() -> bool:
            return bool(task_lines(json_lines(second.stderr()), bad2.id))

        await wait_until(failed_logged, timeout=10)
        records = json_lines(second.stderr())
        (failed,) = task_lines(records, bad2.id)
        assert "Traceback" in failed["traceback"] and "\n" not in failed["message"]
        # --loglevel debug shows aioqueue's debug lines, not its dependencies'
        noisy = {"aio_pika", "aiormq", "pamqp", "redis", "asyncio"}
        assert not [
            r for r in records if r["logger"].split(".")[0] in noisy and r["level"] == "DEBUG"
        ]
        await client.control.revoke(napping.id, terminate=True)
    finally:
        await workers.close()


async def test_worker_help_shows_defaults_and_conf_the_values_in_use() -> None:
    env = worker_env(AMQP_URL, "aqtest-conf")
    del env["AIOQUEUE_RESULT_BACKEND"]
    code, out, _ = await aioqueue(env, "worker", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "worker_concurrency, 100 out of the box" in flat
    assert "worker_shutdown_timeout, 30 out of the box" in flat
    assert "(default: info)" in flat and "(default: text)" in flat
    code, out, err = await aioqueue(env, "conf", "ops_app:app")
    assert code == 0, err
    settings = dict(line.split(": ", 1) for line in out.splitlines())
    assert settings["result_backend"] == "'rpc://'"
    assert settings["broker_url"] == repr(mask_url(AMQP_URL)) and "guest:guest" not in out
