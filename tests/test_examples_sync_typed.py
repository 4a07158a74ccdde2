"""examples/sync_client.py and examples/typed_data.py run as the README says, on memory:// and
Redis (each run in its own key prefix)."""

from __future__ import annotations

import pytest
from conftest import REDIS_URL, delete_prefixed, require_server
from test_examples import run_example

pytestmark = pytest.mark.timeout(60)


def check_sync(output: str) -> None:
    assert [line for line in output.splitlines() if line.startswith("order")] == [
        f"order {n}: {n + 100} (SUCCESS)" for n in range(4)
    ]
    assert "send_many_sync: [2, 4]" in output
    assert "send_task_sync: 42" in output
    assert "in async code:" in output and "await task.send" in output


TYPED = "Invoice: total Decimal('3.10'), due datetime.date(2026, 12, 15), pdf b'%PDF-1.7'"


def test_sync_client_example_on_memory() -> None:
    check_sync(run_example("examples/sync_client.py", {"AIOQUEUE_BROKER_URL": "memory://"}))


def test_typed_data_example_on_memory() -> None:
    output = run_example("examples/typed_data.py", {"AIOQUEUE_BROKER_URL": "memory://"})
    assert output.strip() == TYPED


async def test_both_examples_on_redis(key_prefix: str) -> None:
    require_server(REDIS_URL, "Redis")
    env = {"AIOQUEUE_BROKER_URL": REDIS_URL, "AIOQUEUE_KEY_PREFIX": key_prefix}
    try:
        check_sync(run_example("examples/sync_client.py", env))
        assert run_example("examples/typed_data.py", env).strip() == TYPED
    finally:
        await delete_prefixed(REDIS_URL, key_prefix)
