"""How an App picks its result backend when it is given a broker instance.

A broker instance says nothing about where results should go; keeping them in this process's
memory would look like it works and then lose every result a worker in another process stores.
"""

from __future__ import annotations

import pytest

from aioqueue import App, ConfigurationError
from aioqueue.backends.memory import MemoryBackend
from aioqueue.brokers.memory import MemoryBroker
from aioqueue.brokers.redis import RedisBroker

pytestmark = pytest.mark.timeout(10)

UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens there: nothing below may connect


async def test_broker_instance_without_backend_is_refused_on_first_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AIOQUEUE_RESULT_BACKEND", raising=False)
    app = App("instance", broker=RedisBroker(UNREACHABLE))
    with pytest.raises(ConfigurationError, match="pass backend="):
        _ = app.backend
    with pytest.raises(ConfigurationError, match="pass backend="):
        await app.AsyncResult("some-id").get(timeout=1)
    await app.close()  # closing an app that never had a backend is fine


async def test_broker_instance_with_a_named_backend_is_fine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = MemoryBackend()
    assert App("b1", broker=RedisBroker(UNREACHABLE), backend=backend).backend is backend
    url_app = App("b2", broker=RedisBroker(UNREACHABLE), backend="memory://")
    assert isinstance(url_app.backend, MemoryBackend)
    monkeypatch.setenv("AIOQUEUE_RESULT_BACKEND", "memory://")
    assert isinstance(App("b3", broker=RedisBroker(UNREACHABLE)).backend, MemoryBackend)


def test_memory_broker_instance_defaults_to_memory_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AIOQUEUE_RESULT_BACKEND", raising=False)
    assert isinstance(App("mem", broker=MemoryBroker()).backend, MemoryBackend)
    assert isinstance(App("default").backend, MemoryBackend)
