"""Deleting one benchmark run's Redis keys (those under its own prefix), for the scripts in this
directory that share a database with other work instead of flushing one of their own."""

from __future__ import annotations

import redis.asyncio as aioredis

__all__ = ["delete_prefixed"]


async def delete_prefixed(url: str, prefix: str) -> None:
    """Delete every key of ``url``'s database that starts with ``prefix``, 1,000 per DEL."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()
