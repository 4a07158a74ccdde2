"""The FastAPI, aiohttp and Flask examples started for real, as their docstrings say: each web
server and one ``aioqueue worker examples.proj:app`` are subprocesses (started once for the
module) on the real Redis, and the tests talk HTTP to them."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@dataclass
class Stack:
    urls: dict[str, str]
    processes: list[Process]

    def output(self) -> str:
        return "\n".join(process.output() for process in self.processes)


def server_argv(name: str, port: int) -> list[str]:
    python = sys.executable
    return {
        "fastapi": [python, "-m", "uvicorn", "examples.fastapi_app:api", "--port", str(port)],
        "aiohttp": [
            *(python, "-m", "aiohttp.web", "-H", "127.0.0.1", "-P", str(port)),
            "examples.aiohttp_app:make_app",
        ],
        "flask": [python, "-m", "flask", "--app", "examples.flask_app:web", "run", "-p", str(port)],
    }[name]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_server(REDIS_URL, "Redis")
    prefix = new_prefix()
    env = {
        "AIOQUEUE_BROKER_URL": REDIS_URL,
        "AIOQUEUE_RESULT_BACKEND": REDIS_URL,
        "AIOQUEUE_KEY_PREFIX": prefix,
    }
    log_dir = tmp_path_factory.mktemp("example-servers")
    ports = {name: free_port() for name in ("fastapi", "aiohttp", "flask")}
    processes: list[Process] = []
    try:
        # All start at once; then each is waited for.
        servers = {
            name: Process(name, server_argv(name, port), cwd=ROOT, env=env, log_dir=log_dir)
            for name, port in ports.items()
        }
        processes.extend(servers.values())
        processes.append(start_worker("examples.proj:app", cwd=ROOT, env=env, log_dir=log_dir))
        for name, server in servers.items():
            server.wait_for(lambda port=ports[name]: port_open(port), "open port")  # type: ignore[misc]
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        yield Stack(urls, processes)
    finally:
        for process in processes:
            process.stop()
        delete_prefixed_sync(prefix)


def round_trip(base: str, x: int, y: int) -> dict[str, object]:
    with httpx.Client(base_url=base, timeout=20) as client:
        sent = client.post("/add", params={"x": x, "y": y})
        assert sent.status_code == 200, sent.text
        got = client.get(f"/result/{sent.json()['task_id']}", params={"wait": 10})
        assert got.status_code == 200, got.text
        return dict(got.json())


def progress_stream(base: str) -> list[dict[str, object]]:
    """Sends count(3) and reads its server-sent events to the end of the stream."""
    with httpx.Client(base_url=base, timeout=20) as client:
        page = client.get("/")
        assert "EventSource" in page.text
        task_id = client.post("/count", params={"total": 3}).json()["task_id"]
        events = []
        with client.stream("GET", f"/progress/{task_id}") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
        return events


def check_progress(events: list[dict[str, object]]) -> None:
    assert events[-1] == {"state": "SUCCESS", "meta": 3}, events
    progress = [event["meta"] for event in events if event["state"] == "PROGRESS"]
    assert progress, events  # at least one PROGRESS update reached the browser
    assert progress[-1] == {"done": 3, "total": 3}, events
    assert progress == sorted(progress, key=lambda meta: meta["done"])  # type: ignore[index]


@pytest.mark.parametrize("framework", ["fastapi", "aiohttp", "flask"])
def test_send_and_get_the_result(stack: Stack, framework: str) -> None:
    assert round_trip(stack.urls[framework], 2, 3) == {"state": "SUCCESS", "value": 5}


@pytest.mark.parametrize("framework", ["fastapi", "aiohttp"])
def test_progress_streams_as_server_sent_events(stack: Stack, framework: str) -> None:
    check_progress(progress_stream(stack.urls[framework]))


def test_flask_request_threads_share_the_sync_client(stack: Stack) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: round_trip(stack.urls["flask"], i, i), range(16)))
    assert [result["value"] for result in results] == [2 * i for i in range(16)]


def test_an_unfinished_result_is_a_404(stack: Stack) -> None:
    with httpx.Client(base_url=stack.urls["fastapi"], timeout=20) as client:
        got = client.get(f"/result/{uuid.uuid4().hex}", params={"wait": 0.1})
        assert got.status_code == 404


def test_the_readiness_probe_asks_the_broker(stack: Stack) -> None:
    with httpx.Client(base_url=stack.urls["fastapi"], timeout=20) as client:
        got = client.get("/healthz")
        assert got.status_code == 200, got.text
        assert got.json()["waiting"] >= 0
