"""Send N `add` tasks to examples.proj and check every result (a new user's first load test).

aioqueue worker examples.proj:app --concurrency 50     # in one shell
python -m examples.send_many 10000                      # in another
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

from aioqueue import AsyncResult, BrokerError, Signature

from .proj import add, app


async def send_with_retry(chunk: list[Signature[[int, int], int]]) -> list[AsyncResult[int]]:
    for attempt in range(1, 6):
        try:
            return await add.send_many(chunk)
        except BrokerError as exc:  # raised, never silently lost: the caller decides
            print(f"send failed ({exc}); attempt {attempt}, sending the chunk again")
            await asyncio.sleep(0.5 * attempt)
    raise SystemExit("broker unavailable")


async def main(count: int) -> None:
    async with app:
        started = time.perf_counter()
        run = uuid.uuid4().hex[:8]
        results = []
        for start in range(0, count, 1000):
            # Fixed ids make a resend after a connection loss harmless: a duplicate message
            # (at-least-once) writes the same result under the same id.
            chunk = [
                add.s(i, i).set(task_id=f"{run}-{i}")
                for i in range(start, min(start + 1000, count))
            ]
            results.extend(await send_with_retry(chunk))
        sent = time.perf_counter()
        values = await asyncio.gather(*(r.get(timeout=600) for r in results))
        done = time.perf_counter()
    wrong = [i for i, v in enumerate(values) if v != 2 * i]
    print(f"sent {count} in {sent - started:.2f}s, all results in {done - started:.2f}s")
    print("every result correct" if not wrong else f"{len(wrong)} WRONG results, e.g. {wrong[:5]}")
    if wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))
