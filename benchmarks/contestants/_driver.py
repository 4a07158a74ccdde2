"""Client-side driver: runs inside one contestant's virtualenv and speaks line-JSON.

    python _driver.py MODULE TRANSPORT

reads one JSON command per line on stdin and writes one JSON reply per line on the original
stdout (the library's own prints are sent to stderr). Commands:

    describe | purge | cleanup | quit
    enqueue   {n, batch, concurrency, kind}  timed sends (noop unless kind), handles kept for
                                    drain_wait (concurrency > 1: that many coroutines in turn)
    prefill   {n, kind, ms}         untimed, fastest available way; handles kept
    drain_wait {timeout}            waits until every kept handle finished; rate from the
                                    first observed completion to the last
    roundtrip {n, timeout, kind}    n sequential send + wait

kinds: noop, cpu, block (ms each), payload (one str argument of BENCH_PAYLOAD_BYTES chars,
tiny result), queues (noop, round robin over BENCH_QUEUES queues; the "queues" worker listens
on all of them). A kind in the contestant's ``unsupported`` map is answered with its reason.
    fanin     {n, timeout}          n concurrent senders, each awaiting its own result

Every reply is {"ok": true, ...} or {"ok": false, "error": "...", "na": bool}.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import REDIS_URL, Contestant, Unsupported

SWEEP_WINDOW = 500
IDLE_POLL_S = 0.005
STALL_S = 8.0  # a drain that made progress and then none for this long is reported as is
SYNC_CLIENT_THREADS = 64  # threads for sync clients' blocking waits (redis-py 8 pools cap at 100)
PREFILL_CONCURRENCY = 64
MISSING_LUA = """
local missing = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then missing[#missing + 1] = i end
end
return missing
"""


def pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def latency_stats(lat_s: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000.0 for x in lat_s)
    return {
        "p50_ms": pct(ms, 0.50),
        "p90_ms": pct(ms, 0.90),
        "p99_ms": pct(ms, 0.99),
        "max_ms": ms[-1] if ms else float("nan"),
        "mean_ms": sum(ms) / len(ms) if ms else float("nan"),
    }


class Driver:
    def __init__(self, contestant: Contestant) -> None:
        self.c = contestant
        self.handles: list[Any] = []

    # -- commands -------------------------------------------------------------------------
    async def cmd_describe(self) -> dict[str, Any]:
        return {"describe": self.c.describe(), "pid": os.getpid()}

    async def cmd_worker_argv(self, kind: str) -> dict[str, Any]:
        argv, env = self.c.worker_argv(kind)
        return {"argv": argv, "env": env}

    async def cmd_purge(self) -> dict[str, Any]:
        self.handles = []
        await self.c.purge()
        return {}

    async def cmd_cleanup(self) -> dict[str, Any]:
        self.handles = []
        await self.c.cleanup()
        return {}

    def check(self, kind: str) -> None:
        if kind in self.c.unsupported:
            raise Unsupported(self.c.unsupported[kind])

    async def cmd_enqueue(
        self, n: int, batch: bool, concurrency: int = 1, kind: str = "noop"
    ) -> dict[str, Any]:
        self.check(kind)
        # noop: the bound method itself, so the plain enqueue rows time exactly what they did
        send = self.c.send if kind == "noop" else functools.partial(self.c.send, kind)
        handles: list[Any] = []
        if concurrency > 1 and not self.c.async_client:
            raise Unsupported("sync client: concurrent senders would be threads, not coroutines")
        t0 = time.perf_counter()
        if concurrency > 1:
            # ``concurrency`` coroutines, each sending its share one at a time (awaited in turn)
            async def sender(count: int) -> list[Any]:
                return [await send() for _ in range(count)]

            shares = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]
            for part in await asyncio.gather(*(sender(k) for k in shares)):
                handles.extend(part)
        elif batch:
            size = self.c.batch_size
            if kind != "noop":
                raise Unsupported("batch enqueue is measured with noop tasks only")
            if size is None:
                raise Unsupported("no batch enqueue API")
            for i in range(0, n, size):
                handles.extend(await self.c.send_batch(min(size, n - i)))
        else:
            for _ in range(n):
                handles.append(await send())
        seconds = time.perf_counter() - t0
        self.handles.extend(handles)
        return {"seconds": seconds, "n": n, "rate": n / seconds}

    async def cmd_prefill(self, n: int, kind: str = "noop", ms: float = 0.0) -> dict[str, Any]:
        self.check(kind)
        t0 = time.perf_counter()
        if kind == "noop" and self.c.batch_size is not None:
            for i in range(0, n, self.c.batch_size):
                self.handles.extend(await self.c.send_batch(min(self.c.batch_size, n - i)))
        elif self.c.async_client:
            for i in range(0, n, PREFILL_CONCURRENCY):
                chunk = min(PREFILL_CONCURRENCY, n - i)
                self.handles.extend(
                    await asyncio.gather(*(self.c.send(kind, ms) for _ in range(chunk)))
                )
        else:
            for _ in range(n):
                self.handles.append(await self.c.send(kind, ms))
        return {"seconds": time.perf_counter() - t0, "n": n}

    async def cmd_drain_wait(self, timeout: float) -> dict[str, Any]:
        handles, self.handles = self.handles, []
        n = len(handles)
        deadline = time.monotonic() + timeout
        if n and self.c.result_key(handles[0]) is not None:
            progress = await self._sweep_keys(handles, deadline)
        else:
            progress = await self._count_loop(handles, deadline)
        return self._drain_summary(n, progress)

    @staticmethod
    def _drain_summary(n: int, progress: list[tuple[float, int]]) -> dict[str, Any]:
        done = progress[-1][1] if progress else 0
        first_t, first_done = progress[0] if progress else (0.0, 0)
        last_t = progress[-1][0] if progress else 0.0
        span = max(last_t - first_t, 1e-9)
        counted = done - first_done
        return {
            "n": n,
            "done": done,
            "complete": done >= n,
            "seconds": span,
            "rate": counted / span if counted > 0 else 0.0,
            "t_first": first_t,
            "t_last": last_t,
            "progress": thin(progress, 200),
        }

    async def _sweep_keys(self, handles: list[Any], deadline: float) -> list[tuple[float, int]]:
        """Which result keys exist, oldest first, SWEEP_WINDOW keys per Lua call (one command,
        so the sweep costs the client little CPU next to the worker it measures). A window with
        nothing finished goes to the back, so out-of-order completion is still seen."""
        import redis.asyncio as aioredis

        remaining = collections.deque(self.c.result_key(h) for h in handles)
        done = 0
        zero_windows = 0
        progress: list[tuple[float, int]] = []
        client = aioredis.Redis.from_url(REDIS_URL)
        missing_of = client.register_script(MISSING_LUA)
        try:
            while remaining and time.monotonic() < deadline:
                window = [remaining.popleft() for _ in range(min(SWEEP_WINDOW, len(remaining)))]
                idx = await missing_of(keys=window)
                now = time.monotonic()
                missing = [window[int(i) - 1] for i in idx]
                got = len(window) - len(missing)
                if got:
                    zero_windows = 0
                    remaining.extendleft(reversed(missing))  # keep the oldest at the front
                else:
                    zero_windows += 1
                    remaining.extend(missing)  # nothing here yet: look further along next time
                if got:
                    done += got
                    progress.append((now, done))
                elif progress and now - progress[-1][0] > STALL_S:
                    break  # started, then nothing finished for STALL_S: report what we have
                # sleep when the oldest window is waiting on stragglers, or when a whole cycle
                # over the remaining keys found nothing; otherwise look at the next window now
                cycled = zero_windows * SWEEP_WINDOW >= len(remaining)
                if (got and missing) or (not got and cycled):
                    zero_windows = 0 if cycled else zero_windows
                    await asyncio.sleep(IDLE_POLL_S)
        finally:
            await client.aclose() if hasattr(client, "aclose") else await client.close()
        return progress

    async def _count_loop(self, handles: list[Any], deadline: float) -> list[tuple[float, int]]:
        n = len(handles)
        progress: list[tuple[float, int]] = []
        last = 0
        while time.monotonic() < deadline:
            done = n - await self.c.count_remaining(handles)
            now = time.monotonic()
            if done > last:
                progress.append((now, done))
                last = done
            if done >= n or (progress and now - progress[-1][0] > STALL_S):
                break
            await asyncio.sleep(IDLE_POLL_S)
        return progress

    async def cmd_roundtrip(self, n: int, timeout: float, kind: str = "noop") -> dict[str, Any]:
        """n sequential round trips; stops early (partial) when ``timeout`` seconds are used."""
        self.check(kind)
        lat: list[float] = []
        deadline = time.monotonic() + timeout
        for _ in range(n):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            t0 = time.perf_counter()
            h = await self.c.send(kind)
            try:
                await self.c.wait(h, left)
            except Exception:
                if time.monotonic() >= deadline:  # the time cap fell inside this round trip
                    break
                raise
            lat.append(time.perf_counter() - t0)
        return {"n": len(lat), "partial": len(lat) < n, **latency_stats(lat)}

    async def cmd_fanin(self, n: int, timeout: float) -> dict[str, Any]:
        start = asyncio.Event()

        async def one() -> float:
            await start.wait()
            t0 = time.perf_counter()
            h = await self.c.send()
            await self.c.wait(h, timeout)
            return time.perf_counter() - t0

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        start.set()
        lat = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        wall = time.perf_counter() - t0
        return {"n": n, "wall_s": wall, **latency_stats(list(lat))}


def thin(progress: list[tuple[float, int]], keep: int) -> list[tuple[float, int]]:
    if len(progress) <= keep:
        return progress
    step = len(progress) / keep
    out = [progress[int(i * step)] for i in range(keep)]
    out.append(progress[-1])
    return out


async def serve(driver: Driver, proto: Any) -> None:
    loop = asyncio.get_running_loop()
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stdin")
    while True:
        line = await loop.run_in_executor(reader, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "quit":
            proto.write(json.dumps({"ok": True}) + "\n")
            proto.flush()
            break
        try:
            reply = {"ok": True, **(await getattr(driver, f"cmd_{cmd}")(**req))}
        except Unsupported as exc:
            reply = {"ok": False, "na": True, "error": str(exc)}
        except Exception as exc:
            traceback.print_exc()
            reply = {"ok": False, "na": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
    reader.shutdown(wait=False, cancel_futures=True)


async def amain(module: str, transport: str, proto: Any) -> None:
    if module_uses_threads(module):
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=SYNC_CLIENT_THREADS)
        )
    mod = importlib.import_module(module)
    contestant: Contestant = mod.make(transport)
    try:
        await contestant.start()
    except Exception as exc:
        traceback.print_exc()
        proto.write(json.dumps({"ok": False, "na": True, "error": f"start failed: {exc}"}) + "\n")
        proto.flush()
        return
    proto.write(json.dumps({"ok": True, "ready": True}) + "\n")
    proto.flush()
    try:
        await serve(Driver(contestant), proto)
    finally:
        await asyncio.wait_for(contestant.stop(), 10)


def module_uses_threads(module: str) -> bool:
    return module in {"c_celery", "c_dramatiq"}


def main() -> None:
    module, transport = sys.argv[1], sys.argv[2]
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr
    sys.stdout = sys.stderr
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(amain(module, transport, proto))


if __name__ == "__main__":
    main()
