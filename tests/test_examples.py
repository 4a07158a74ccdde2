"""The examples run as the README says they do."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REDIS_URL, delete_prefixed, require_server

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


def run_quickstart(env: dict[str, str]) -> str:
    return run_example("examples/quickstart.py", env)


def run_example(path: str, env: dict[str, str]) -> str:
    """Run an example script as a user would; its stdout."""
    done = subprocess.run(
        [sys.executable, path],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def check_demo_output(output: str) -> None:
    assert [line.split("->")[1].strip() for line in output.splitlines() if "async" in line] == [
        "0",
        "2",
        "4",
        "6",
        "8",
    ]
    assert "HELLO! (from AnyIO worker thread)" in output
    assert output.count("computed in pid") == 2
    parent = output.split("parent pid ")[1].split(")")[0]
    assert f"computed in pid {parent}" not in output  # really in child processes


def test_demo_on_memory() -> None:
    check_demo_output(run_quickstart({"AIOQUEUE_BROKER_URL": "memory://"}))


async def test_demo_on_redis(key_prefix: str) -> None:
    require_server(REDIS_URL, "Redis")
    try:
        output = run_quickstart(
            {"AIOQUEUE_BROKER_URL": REDIS_URL, "AIOQUEUE_KEY_PREFIX": key_prefix}
        )
        assert "redis://" in output
        check_demo_output(output)
    finally:
        await delete_prefixed(REDIS_URL, key_prefix)


@pytest.fixture
def memory_examples(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ModuleType]]:
    """Import the examples fresh with memory:// so their module-level App uses it."""
    monkeypatch.setenv("AIOQUEUE_BROKER_URL", "memory://")
    monkeypatch.setenv("AIOQUEUE_RESULT_BACKEND", "memory://")
    monkeypatch.syspath_prepend(str(ROOT))
    names = ["examples.proj", "examples.fastapi_app", "examples.aiohttp_app"]
    for name in names:
        sys.modules.pop(name, None)
    yield {name.split(".")[1]: importlib.import_module(name) for name in names}
    for name in names:
        sys.modules.pop(name, None)


async def test_fastapi_example(memory_examples: dict[str, ModuleType]) -> None:
    import httpx

    fastapi_app = memory_examples["fastapi_app"]
    api = fastapi_app.api
    app = memory_examples["proj"].app
    # httpx's ASGITransport runs no lifespan, so no lifespan state: the dependency is overridden
    # (the way a test swaps in its own app); test_example_servers runs the real lifespan.
    api.dependency_overrides[fastapi_app.get_queue] = lambda: app
    async with api.router.lifespan_context(api), app.worker(concurrency=5):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            sent = await client.post("/add", params={"x": 2, "y": 3})
            task_id = sent.json()["task_id"]
            got = await client.get(f"/result/{task_id}")
            assert got.json() == {"state": "SUCCESS", "value": 5}
            health = await client.get("/healthz")
            assert health.status_code == 200 and health.json() == {"waiting": 0}


async def test_fastapi_readiness_is_503_while_the_broker_is_away(
    memory_examples: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from aioqueue import App

    fastapi_app = memory_examples["fastapi_app"]
    monkeypatch.delenv("AIOQUEUE_BROKER_URL")  # the environment wins over broker=
    monkeypatch.delenv("AIOQUEUE_RESULT_BACKEND")
    away = App("away", broker="redis://127.0.0.1:1/0", broker_connect_timeout=0.5)
    fastapi_app.api.dependency_overrides[fastapi_app.get_queue] = lambda: away
    transport = httpx.ASGITransport(app=fastapi_app.api)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            health = await client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"detail": "broker: BrokerConnectionError"}
    finally:
        await away.close()


async def test_aiohttp_example(memory_examples: dict[str, ModuleType]) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    web_app = memory_examples["aiohttp_app"].make_app()
    app = memory_examples["proj"].app
    async with TestClient(TestServer(web_app)) as client, app.worker(concurrency=5):
        sent = await client.post("/add", params={"x": 20, "y": 22})
        task_id = (await sent.json())["task_id"]
        got = await client.get(f"/result/{task_id}")
        assert await got.json() == {"state": "SUCCESS", "value": 42}


def run_retries_example(env: dict[str, str]) -> str:
    return run_example("examples/retries.py", env)


def check_retries_output(output: str) -> None:
    lines = output.splitlines()
    assert sum("on_retry" in line for line in lines) == 2, output
    assert "charged c-1 500 on try 3 (trace t-42)" in lines, output
    assert "retries: 2, state: SUCCESS" in lines, output
    assert "hopeless failed for good: GatewayBusy('still busy') after 1 retry" in lines, output


def test_retries_example_on_memory() -> None:
    check_retries_output(run_retries_example({"AIOQUEUE_BROKER_URL": "memory://"}))


async def test_retries_example_on_redis(key_prefix: str) -> None:
    require_server(REDIS_URL, "Redis")
    try:
        env = {"AIOQUEUE_BROKER_URL": REDIS_URL, "AIOQUEUE_KEY_PREFIX": key_prefix}
        check_retries_output(run_retries_example(env))
    finally:
        await delete_prefixed(REDIS_URL, key_prefix)


def run_periodic_example(env: dict[str, str]) -> str:
    return run_example("examples/periodic.py", env)


def check_periodic_output(output: str) -> None:
    lines = output.splitlines()
    assert lines[:3] == ["heartbeat 1", "heartbeat 2", "heartbeat 3"], output
    rows = {line.split()[0]: line for line in lines[4:]}
    assert rows.keys() == {
        "demo.heartbeat",
        "morning-report",
        "cleanup-at-midnight",
        "weekly-report",
    }
    assert rows["demo.heartbeat"].endswith("SUCCESS"), output
    assert "07:00:00+08:00" in rows["morning-report"], output


def test_periodic_example_on_memory() -> None:
    check_periodic_output(run_periodic_example({"AIOQUEUE_BROKER_URL": "memory://"}))


async def test_periodic_example_on_redis(key_prefix: str) -> None:
    require_server(REDIS_URL, "Redis")
    try:
        env = {"AIOQUEUE_BROKER_URL": REDIS_URL, "AIOQUEUE_KEY_PREFIX": key_prefix}
        check_periodic_output(run_periodic_example(env))
    finally:
        await delete_prefixed(REDIS_URL, key_prefix)


def run_control_example(env: dict[str, str]) -> str:
    return run_example("examples/control.py", env)


def check_control_output(output: str) -> None:
    lines = output.splitlines()
    assert lines[0] == "revoked: True, it was PENDING", output
    progress = [line for line in lines if line.startswith("watch: PROGRESS")]
    assert progress and progress[-1] == "watch: PROGRESS {'done': 3, 'total': 3}", output
    assert "watch: SUCCESS 3" in lines, output
    assert lines[-3:] == ["doomed: revoked", "forever: TaskRevoked", "revoked again: False"]


def test_control_example_on_memory() -> None:
    check_control_output(run_control_example({"AIOQUEUE_BROKER_URL": "memory://"}))


async def test_control_example_on_redis(key_prefix: str) -> None:
    require_server(REDIS_URL, "Redis")
    try:
        env = {"AIOQUEUE_BROKER_URL": REDIS_URL, "AIOQUEUE_KEY_PREFIX": key_prefix}
        check_control_output(run_control_example(env))
    finally:
        await delete_prefixed(REDIS_URL, key_prefix)


def check_limits_output(output: str) -> None:
    assert output.splitlines() == [
        "6 calls at 5/s: 1 s from the first start to the last",
        "render: at most 2 at once",
        "6 calls at 50/s: under a second: True",
        "render without a cap: more than 2 at once: True",
    ], output


def test_limits_example_on_memory() -> None:
    check_limits_output(run_example("examples/limits.py", {"AIOQUEUE_BROKER_URL": "memory://"}))


async def test_limits_example_on_redis(key_prefix: str) -> None:
    require_server(REDIS_URL, "Redis")
    try:
        env = {"AIOQUEUE_BROKER_URL": REDIS_URL, "AIOQUEUE_KEY_PREFIX": key_prefix}
        check_limits_output(run_example("examples/limits.py", env))
    finally:
        await delete_prefixed(REDIS_URL, key_prefix)


def test_observability_example() -> None:
    output = run_example("examples/observability.py", {"AIOQUEUE_BROKER_URL": "memory://"})
    lines = output.splitlines()
    assert lines[0] == "receipt for order-1"
    assert 'aioqueue_tasks_total{outcome="success",task="observability.checkout"} 1.0' in lines
    spans = [line.split() for line in lines if line.startswith("trace ")]
    assert [s[-1] for s in spans] == [
        "/checkout",
        "observability.checkout",
        "observability.checkout",
        "observability.receipt",
        "observability.receipt",
    ]
    assert len({s[1] for s in spans}) == 1  # one trace
    assert all(spans[i + 1][5] == spans[i][3] for i in range(4))  # each the parent of the next


def test_security_example_on_memory() -> None:
    lines = run_example("examples/security.py", {"AIOQUEUE_BROKER_URL": "memory://"}).splitlines()
    assert lines[:4] == [
        "charged 5",
        "failed: card ******** declined",
        "  login sees Secret('********'), the value has 13 characters",
        "welcome ann",
    ]
    assert lines[4].startswith("forged message: BadSignature: bad signature")
    assert lines[4].endswith("(body kept: b'')")


def run_workflows_example(env: dict[str, str]) -> str:
    return run_example("examples/workflows.py", env)


def check_workflows_output(output: str) -> None:
    assert output.splitlines() == [
        "told ops about mp4(raw(cat.mov))",
        "thumbnails: [0, 10, 20, 30, 40]",
        "zip of 100 thumbnails, 49500 bytes",
        "chord failed: builtins.ValueError: no picture -1",
        "alert: FAILURE builtins.ValueError: no picture -2",
        "starmap: [3, 7]",
        "chunks: [[0, 2], [4, 6], [8]]",
        "tree: chain [('workflows.add', 'SUCCESS'), ('workflows.add', 'SUCCESS')]",
    ], output


def test_workflows_example_on_memory() -> None:
    check_workflows_output(run_workflows_example({"AIOQUEUE_BROKER_URL": "memory://"}))


async def test_workflows_example_on_redis(key_prefix: str) -> None:
    require_server(REDIS_URL, "Redis")
    try:
        env = {"AIOQUEUE_BROKER_URL": REDIS_URL, "AIOQUEUE_KEY_PREFIX": key_prefix}
        check_workflows_output(run_workflows_example(env))
    finally:
        await delete_prefixed(REDIS_URL, key_prefix)
