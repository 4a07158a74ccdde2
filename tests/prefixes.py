"""Key prefixes for the tests, all under one token per pytest run.

The shared RabbitMQ keeps what a test declared beyond its app's own queues (claim queues of
``rpc://``, control streams, delay queues) until they expire, some for a day or a week, and each
durable queue holding a message keeps one of the broker's few file descriptors open. Prefixes
that share the run's token let the run delete exactly what it made when it ends
(:func:`delete_run_leftovers`), and nothing of another run going on beside it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
import warnings

RUN_TOKEN = uuid.uuid4().hex[:4]
RUN_PREFIX = f"aqtest-{RUN_TOKEN}"


def new_prefix() -> str:
    """A fresh key prefix (``aqtest-`` and ten hex digits, the first four the run's)."""
    return f"{RUN_PREFIX}{uuid.uuid4().hex[:6]}"


def _listed(kind: str) -> list[str]:
    done = subprocess.run(
        ["rabbitmqctl", kind, "-q", "--no-table-headers", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [name for name in done.stdout.splitlines() if name.startswith(RUN_PREFIX)]


async def _delete(amqp_url: str, queues: list[str], exchanges: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def delete_run_leftovers(amqp_url: str) -> None:
    """Delete this run's queues and exchanges on the shared RabbitMQ's default vhost.

    Housekeeping, not a test: a failure is a warning (a broker that was never reachable has
    already failed the tests that needed it).
    """
    if shutil.which("rabbitmqctl") is None:
        return
    try:
        queues, exchanges = _listed("list_queues"), _listed("list_exchanges")
        if queues or exchanges:
            asyncio.run(_delete(amqp_url, queues, exchanges))
    except Exception as exc:  # housekeeping must not fail a run that passed
        warnings.warn(f"could not delete this run's RabbitMQ leftovers: {exc!r}", stacklevel=1)
