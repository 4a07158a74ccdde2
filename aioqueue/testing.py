"""The pytest plugin: your app's tasks on a memory transport with a virtual clock, per test.

Enable it with ``-p aioqueue.testing`` (installing aioqueue also registers it as a pytest11
entry point) and name the app with ``--aioqueue-app proj.tasks:app`` or the ini option
``aioqueue_app``. Then, in every test, that app sends to a fresh in-memory broker (nothing
reaches Redis or RabbitMQ) and reads a virtual clock. Fixtures:

``aioqueue_worker``
    ``await aioqueue_worker.drain()`` runs everything sent, through the real worker's handler
    and settle step, until nothing is queued or delayed (the virtual clock moves on to each
    eta: countdowns, retries with their backoff, what tasks send), and returns how many ran.
    ``await aioqueue_worker.run_due()`` runs only what is due by the clock;
    ``aioqueue_worker.drain_sync()`` is ``drain()`` for a sync test that used ``send_sync``.
``aioqueue_clock``
    A virtual clock that starts at today's midnight UTC: after ``aioqueue_clock.advance(3600)``
    the next run replays that hour in order, so countdowns, each retry with its backoff,
    expiry and the app's periodic entries happen at their own virtual moments, instantly.
``aioqueue_sent``
    ``aioqueue_sent("proj.add", args=(2, 3))`` lists the matching messages sent;
    ``aioqueue_sent.assert_sent(...)`` fails with a listing of what was sent.
``aioqueue_app``
    The app itself.

With no app configured, the plugin does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .app import App
from .loader import load_app
from .testkit import Harness, InProcessWorker, SentMessages, VirtualClock, on_memory

__all__ = [
    "aioqueue_app",
    "aioqueue_clock",
    "aioqueue_harness",
    "aioqueue_sent",
    "aioqueue_worker",
    "pytest_addoption",
]

_HELP = "the aioqueue App your tests use, as module:attribute (runs on memory:// in tests)"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aioqueue")
    group.addoption("--aioqueue-app", dest="aioqueue_app", default=None, help=_HELP)
    parser.addini("aioqueue_app", _HELP, default=None)


def _configured(config: pytest.Config) -> str | None:
    value = config.getoption("aioqueue_app") or config.getini("aioqueue_app")
    return str(value) if value else None


@pytest.fixture(scope="session")
def aioqueue_app(pytestconfig: pytest.Config) -> App:
    """The app named by ``--aioqueue-app`` / ``aioqueue_app``."""
    path = _configured(pytestconfig)
    if path is None:
        raise pytest.UsageError(
            "no aioqueue app configured: pass --aioqueue-app module:app or set aioqueue_app "
            "in the pytest ini options"
        )
    return load_app(path)


@pytest.fixture(autouse=True)
def aioqueue_harness(request: pytest.FixtureRequest) -> Iterator[Harness | None]:
    """Every test runs the configured app on a fresh memory transport and virtual clock."""
    if _configured(request.config) is None:
        yield None
        return
    app: App = request.getfixturevalue("aioqueue_app")
    with on_memory(app, VirtualClock()) as harness:
        yield harness


def _harness(harness: Harness | None) -> Harness:
    if harness is None:
        raise pytest.UsageError(
            "the aioqueue fixtures need an app: pass --aioqueue-app module:app or set "
            "aioqueue_app in the pytest ini options"
        )
    return harness


@pytest.fixture
def aioqueue_worker(aioqueue_harness: Harness | None) -> InProcessWorker:
    return _harness(aioqueue_harness).worker


@pytest.fixture
def aioqueue_clock(aioqueue_harness: Harness | None) -> VirtualClock:
    return _harness(aioqueue_harness).clock


@pytest.fixture
def aioqueue_sent(aioqueue_harness: Harness | None) -> SentMessages:
    return _harness(aioqueue_harness).sent
