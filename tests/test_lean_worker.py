"""A worker loads only what its app uses: every module it imports stays in its memory for good.

The benchmark compares worker RSS with the leanest peer's; these pin the imports that were made
lazy so that a later top-level import cannot bring them back unnoticed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

# What a worker of plain coroutine tasks on Redis never needs: the AMQP client, the thread
# offload (anyio), pickle, Decimal, time zones and cron (periodic entries), the metrics server.
NOT_LOADED = (
    "aio_pika",
    "aiormq",
    "anyio",
    "pickle",
    "decimal",
    "zoneinfo",
    "croniter",
    "aioqueue.metrics",
)

_WORKER = """
import asyncio, sys
import aioqueue

app = aioqueue.App("lean", broker=sys.argv[1], key_prefix=sys.argv[2])

@app.task
async def add(x: int, y: int) -> int:
    return x + y

@app.task(executor="thread")
def blocking(x: int) -> int:
    return x * 2

async def main() -> None:
    async with app, app.worker():
        assert await (await add.send(2, 3)).get(timeout=10) == 5
        loaded = [name for name in sys.argv[3].split(",") if name in sys.modules]
        assert not loaded, f"a plain Redis worker imported {loaded}"
        # the first thread task brings the thread offload, and it works
        assert await (await blocking.send(4)).get(timeout=10) == 8
        assert "anyio" in sys.modules

asyncio.run(main())
"""


def test_a_plain_redis_worker_imports_nothing_it_does_not_use(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    subprocess.run(
        [sys.executable, "-c", _WORKER, redis_url, key_prefix, ",".join(NOT_LOADED)],
        check=True,
        timeout=50,
    )


def test_decimal_and_time_zones_still_work_once_used() -> None:
    """Loaded on first use: a Decimal argument is written as its string and rebuilt from a
    Decimal hint; an interval entry's default zone is UTC; pickle round-trips when chosen."""
    code = (
        "import sys\n"
        "from aioqueue.serializers import get_serializer\n"
        "from aioqueue.typed import plan\n"
        "from aioqueue.periodic.schedules import Every\n"
        "assert 'decimal' not in sys.modules and 'zoneinfo' not in sys.modules\n"
        "from decimal import Decimal\n"
        "assert get_serializer('json').dumps([Decimal('1.10')]) == b'[\"1.10\"]'\n"
        "convert = plan(Decimal)\n"
        "assert convert is not None and convert('2.5') == Decimal('2.5')\n"
        "assert Every(30).tz.key == 'UTC'\n"
        "assert get_serializer('pickle').loads(get_serializer('pickle').dumps({1})) == {1}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
