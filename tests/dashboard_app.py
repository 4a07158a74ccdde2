"""The app tests/test_dashboard_browser.py runs a worker and the dashboard for (settings from
the ``AIOQUEUE_*`` variables the test sets)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aioqueue import App

app = App("dash-app")


@app.task(name="dash_app.add")
async def add(a: int, b: int) -> int:
    return a + b


@app.task(name="dash_app.nap")
async def nap(seconds: float, password: str = "") -> float:
    """Runs long enough to show as busy on the dashboard (a secret among its arguments)."""
    await asyncio.sleep(seconds)
    return seconds


@app.task(name="dash_app.fragile", retry_for=(FileNotFoundError,), max_retries=0)
def fragile(path: str) -> str:
    """Fails for good (and is dead-lettered) until ``path`` exists; then returns its text."""
    return Path(path).read_text()
