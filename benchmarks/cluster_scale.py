"""Drain throughput on a private Redis Cluster with 1, 2 and 3 masters in use.

A private 3-master cluster (no replicas) is started on free ports. For M = 1, 2, 3: M queues
whose hash-tag slots live on M different masters are filled with ``n`` no-op tasks each
(``send_many``), then M worker processes (one per queue, concurrency 200) drain them at once.
Reported: total tasks/s, and each master's CPU (``INFO cpu`` delta over the drain, in % of one
core) so the per-shard load is visible. A single-node redis-server (private, same settings) gives
the baseline. On a 2-core machine the workers and the masters share the cores: the ratio is
bounded by the cores, not by Redis.

    .venv/bin/python benchmarks/cluster_scale.py [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from redis_cluster import RedisClusterServers, _free_port, _pings, _wait_for

from aioqueue import App


def _app(url: str, prefix: str) -> App:
    app = App("scale", broker=url, backend=url, key_prefix=prefix)

    @app.task(name="bench.noop")
    async def noop() -> None:
        return None

    return app


async def _fill(url: str, prefix: str, queue: str, n: int) -> None:
    app = _app(url, prefix)
    async with app:
        task = app.tasks["bench.noop"]
        for start in range(0, n, 1000):
            await task.options(queue=queue).send_many([() for _ in range(min(1000, n - start))])


async def _drain(url: str, prefix: str, queue: str, n: int) -> tuple[float, float]:
    app = _app(url, prefix)
    async with app:
        worker = app.worker(queues=[queue], concurrency=200, schedule=False)
        began = time.time()
        run = asyncio.get_running_loop().create_task(worker.run())
        while worker.processed < n:  # noqa: ASYNC110 - no event for it; 2 ms is noise
            await asyncio.sleep(0.002)
        ended = time.time()
        worker.stop()
        await run
    return began, ended


def _child(url: str, prefix: str, queue: str, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(_drain(url, prefix, queue, n)))


def _cpu(port: int) -> float:
    info = redis.Redis(port=port).info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _measure(url: str, queues: list[str], ports: list[int], n: int) -> tuple[float, list[float]]:
    prefix = f"aqscale-{uuid.uuid4().hex[:8]}"
    for queue in queues:
        asyncio.run(_fill(url, prefix, queue, n))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    before = [_cpu(port) for port in ports]
    procs = [ctx.Process(target=_child, args=(url, prefix, q, n, out)) for q in queues]
    for proc in procs:
        proc.start()
    spans = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    load = [(_cpu(port) - cpu) / wall * 100 for port, cpu in zip(ports, before, strict=True)]
    return len(queues) * n / wall, load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        single = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", tmp),
            ],
            stdout=subprocess.DEVNULL,
        )
        servers = RedisClusterServers(Path(tmp))
        try:
            _wait_for(lambda: _pings(port), "the single redis-server")
            rate, load = _measure(f"redis://127.0.0.1:{port}/0", ["q0"], [port], args.n)
            print(f"single node     1 worker : {rate:8.0f} tasks/s  redis cpu {load[0]:.0f}%")
            servers.start(masters=3, replicas=0)
            masters = servers.masters()
            queues: dict[int, str] = {}
            for i in range(100):
                owner = servers.master_of(f"p:{{q{i}}}").port
                queues.setdefault(owner, f"q{i}")
            ports = [m.port for m in masters]
            for count in (1, 2, 3):
                chosen = [queues[p] for p in ports[:count]]
                rate, load = _measure(servers.url, chosen, ports, args.n)
                loads = " ".join(f"{value:3.0f}%" for value in load)
                print(f"cluster {count} master(s) {count} worker(s): {rate:8.0f} tasks/s  "
                      f"master cpu {loads}")
        finally:
            servers.stop()
            single.kill()
            single.wait()


if __name__ == "__main__":
    main()
