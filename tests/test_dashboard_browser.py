"""The dashboard in a real headless Chromium (Debian's, driven by Playwright with no browser
download): ``aioqueue dashboard`` and a worker as subprocesses on the real Redis with events on.
A screenshot of the overview with live data, a workflow's tree on a task page (a click on a
step's link in it), and a click on "Requeue" for a dead letter that then runs.

Set ``AIOQUEUE_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to also save the README's picture.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI, REDIS_URL, delete_prefixed, require_server
from workers import REPO_DIR, TESTS_DIR, WorkerSet, worker_env

from aioqueue import App, chain

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHROMIUM = Path(os.environ.get("AIOQUEUE_TEST_CHROMIUM", "/usr/bin/chromium"))


def _browser() -> Any:
    """Playwright's async API, or a skip (a failure in CI) naming what is missing."""
    problem = ""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        problem = "the playwright package is not installed (make install)"
    if not problem and not CHROMIUM.exists():
        problem = f"no Chromium at {CHROMIUM} (make install apt-installs Debian's chromium)"
    if problem:
        if IN_CI:
            pytest.fail(f"{problem}; CI must have it", pytrace=False)
        pytest.skip(problem)
    return async_playwright


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def client(key_prefix: str) -> AsyncIterator[App]:
    require_server(REDIS_URL, "Redis")
    app = App("client", broker=REDIS_URL, backend=REDIS_URL, key_prefix=key_prefix, events=True)
    async with app:
        yield app
    await delete_prefixed(REDIS_URL, key_prefix)


async def _start_dashboard(env: dict[str, str], port: int, log: Path) -> Any:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aioqueue.cli",
            "dashboard",
            "dashboard_app:app",
            "--port",
            str(port),
            "--poll-interval",
            "0.5",
            cwd=TESTS_DIR,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    async with asyncio.timeout(20):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert proc.returncode is None, _read(log)
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return proc


async def test_dashboard_in_chromium(client: App, key_prefix: str, tmp_path: Path) -> None:
    async_playwright = _browser()
    env = worker_env(REDIS_URL, key_prefix, events="1")
    port = _free_port()
    workers = WorkerSet(env, tmp_path)
    dashboard = await _start_dashboard(env, port, tmp_path / "dashboard.log")
    try:
        worker = await workers.start("-c", "4", app_path="dashboard_app:app")
        wid = await worker.wait_ready()
        for i in range(6):
            assert await (await client.send_task("dash_app.add", (i, i))).get(timeout=20) == 2 * i
        steps = [client.signature("dash_app.add", (1, 2)), client.signature("dash_app.add", (3,))]
        flow = await chain(*steps).send()
        assert await flow.get(timeout=20) == 6
        nap = await client.send_task("dash_app.nap", (30,), {"password": "hunter2"})
        flag = tmp_path / "flag.txt"
        broken = await client.send_task("dash_app.fragile", (str(flag),))
        with pytest.raises(FileNotFoundError):
            await broken.get(timeout=20)

        base = f"http://127.0.0.1:{port}"
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM))
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 860})
                await page.goto(base + "/")
                # live data: the worker with a busy slot, the tasks' states (the page refreshes)
                await page.get_by_text("1/4 busy").first.wait_for(timeout=20_000)
                await page.get_by_text(wid).first.wait_for()
                await page.get_by_text("SUCCESS").first.wait_for()
                await page.get_by_text("FAILURE").first.wait_for()
                assert "Task events are off" not in await page.content()
                shot = tmp_path / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                wanted = os.environ.get("AIOQUEUE_DASHBOARD_SCREENSHOT")
                if wanted:
                    shutil.copyfile(shot, REPO_DIR / wanted)

                # the task page of the failure: its dead letter, arguments, traceback
                await page.goto(f"{base}/tasks/{broken.id}")
                await page.get_by_text("retries exhausted").first.wait_for()
                assert "FileNotFoundError" in await page.content()
                await page.screenshot(path=str(tmp_path / "task.png"), full_page=True)

                # the chain's last step: its workflow tree, both steps done, a link to the first
                async with asyncio.timeout(20):
                    while True:
                        await page.goto(f"{base}/tasks/{flow.id}")
                        tree = page.locator("ul.tree")
                        if await tree.count() and await tree.get_by_text("SUCCESS").count() == 2:
                            break
                        await asyncio.sleep(0.2)
                assert await tree.is_visible()
                await tree.get_by_role("link", name=flow.parent.id).click()
                await page.get_by_role("heading", name=f"Task {flow.parent.id}").wait_for()
                here = page.locator("ul.tree li.here")
                assert flow.parent.id in await here.inner_text()

                # the running nap's page: arguments from the worker (inspect), password masked
                async with asyncio.timeout(20):
                    while True:
                        await page.goto(f"{base}/tasks/{nap.id}")
                        text = await page.content()
                        if "&quot;password&quot;" in text or '"password"' in text:
                            break
                        await asyncio.sleep(0.2)
                assert "hunter2" not in text and "********" in text

                # requeue the dead letter from the dead letters page; it runs this time
                flag.write_text("fixed")
                await page.goto(base + "/dead-letters")
                row = page.locator("tr", has_text=broken.id)
                await row.get_by_role("button", name="Requeue").click()
                await page.get_by_text("requeued 1 dead letter").wait_for()
                # it ran: its task page shows the success event and the stored result
                async with asyncio.timeout(20):
                    while True:
                        await page.goto(f"{base}/tasks/{broken.id}")
                        text = await page.content()
                        if "task-succeeded" in text and "<b>SUCCESS</b>" in text:
                            break
                        await asyncio.sleep(0.2)
                assert '"fixed"' in text
            finally:
                await browser.close()
    finally:
        await workers.close()
        if dashboard.returncode is None:
            dashboard.terminate()
            async with asyncio.timeout(15):
                await dashboard.wait()
