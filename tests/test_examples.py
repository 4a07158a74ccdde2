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
    done = subprocess.run(
        [sys.executable, "examples/quickstart.py"],
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

    api = memory_examples["fastapi_app"].api
    app = memory_examples["proj"].app
    async with api.router.lifespan_context(api), app.worker(concurrency=5):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            sent = await client.post("/add", params={"x": 2, "y": 3})
            task_id = sent.json()["task_id"]
            got = await client.get(f"/result/{task_id}")
            assert got.json() == {"state": "SUCCESS", "value": 5}


async def test_aiohttp_example(memory_examples: dict[str, ModuleType]) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    web_app = memory_examples["aiohttp_app"].make_app()
    app = memory_examples["proj"].app
    async with TestClient(TestServer(web_app)) as client, app.worker(concurrency=5):
        sent = await client.post("/add", params={"x": 20, "y": 22})
        task_id = (await sent.json())["task_id"]
        got = await client.get(f"/result/{task_id}")
        assert await got.json() == {"state": "SUCCESS", "value": 42}
