"""``aioqueue queues``, ``purge`` and ``dead-letters`` as subprocesses, on Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from conftest import (
    REDIS_URL,
    running_worker,
    wait_until,
)
from workers import TESTS_DIR, worker_env

from aioqueue import App, TaskNotRegistered
from aioqueue.operations import queue_stats

pytestmark = pytest.mark.timeout(60)


async def aioqueue(env: dict[str, str], *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aioqueue.cli",
        *args,
        cwd=TESTS_DIR,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_queues_purge_and_dead_letters_from_the_command_line(
    client: App, broker_url: str, key_prefix: str, tmp_path: Path
) -> None:
    env = worker_env(broker_url, key_prefix, result_backend=REDIS_URL)
    async with running_worker(client):
        doomed = [await client.send_task("ops_app.late", [n]) for n in (1, 2, 3)]
        for result in doomed:
            with pytest.raises(TaskNotRegistered):
                await result.get(timeout=10)

    for n in range(4):
        await client.send_task("ops_app.unknown", [n])

    async def settled() -> bool:
        (stats,) = await queue_stats(client, ["default"])
        return (stats.depth, stats.dead) == (4, 3)

    await wait_until(settled, timeout=10)

    code, out, err = await aioqueue(env, "queues", "ops_app:app")
    assert code == 0, err
    header, row, *notes = out.splitlines()
    assert header.split()[:2] == ["QUEUE", "DEPTH"]
    cells = row.split()
    assert cells[0] == "default" and cells[1] == "4" and cells[-1] == "3"
    if broker_url.startswith("amqp"):  # four wait, and RabbitMQ cannot show them: "?" and why
        assert cells[-2] == "?" and notes == [
            "? default OLDEST: RabbitMQ cannot show a waiting message without taking it"
        ]
    else:
        assert cells[-2].endswith("s") and notes == []

    # purge asks first: anything but yes leaves the queue as it was
    code, out, _ = await aioqueue(env, "purge", "ops_app:app", "-Q", "default", stdin=b"n\n")
    assert code == 1 and "Delete the 4 message(s)" in out and "nothing purged" in out
    code, out, _ = await aioqueue(env, "purge", "ops_app:app", "-Q", "default", stdin=b"y\n")
    assert code == 0 and "purged 4 message(s)" in out
    (stats,) = await queue_stats(client, ["default"])
    assert stats.depth == 0 and stats.dead == 3

    code, out, _ = await aioqueue(env, "dead-letters", "list", "ops_app:app")
    assert code == 0
    assert {line.split()[0] for line in out.splitlines()} == {r.id for r in doomed}
    assert all("TaskNotRegistered" in line for line in out.splitlines())
    code, out, _ = await aioqueue(env, "dead-letters", "show", "ops_app:app", "--id", doomed[0].id)
    assert code == 0 and '"ops_app.late"' in out and doomed[1].id not in out

    code, _, err = await aioqueue(env, "dead-letters", "requeue", "ops_app:app")
    assert code == 2 and "--id ID or --all" in err
    code, out, _ = await aioqueue(
        env, "dead-letters", "requeue", "ops_app:app", "--id", doomed[0].id
    )
    assert code == 0 and "requeued 1 dead letter(s)" in out
    code, out, _ = await aioqueue(
        env, "dead-letters", "drop", "ops_app:app", "-Q", "default", "--all"
    )
    assert code == 0 and "dropped 2 dead letter(s)" in out

    # a burst worker of the app that knows the task runs the requeued one under its own id
    code, _, err = await aioqueue(env, "worker", "ops_app:app", "--burst")
    assert code == 0, err
    # read from another app: this one keeps the failure it was pushed (as any process that
    # already read an outcome keeps it)
    reader = App("reader", broker=broker_url, backend=REDIS_URL, key_prefix=key_prefix)
    async with reader:
        assert await reader.AsyncResult(doomed[0].id).get(timeout=10) == 10
    (stats,) = await queue_stats(client, ["default"])
    assert (stats.depth, stats.dead) == (0, 0)
