"""Shared by both sides of the workflow benchmark: sizes, the worker subprocess, the report."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUICK = os.environ.get("BENCH_QUICK", "0") == "1"
CHAIN_STEPS = 10
CHAIN_RUNS = 20 if QUICK else 100
GROUP_SIZE = 2_000 if QUICK else 10_000
CHORD_SIZE = 1_000
REPS = 1 if QUICK else 3
HERE = os.path.dirname(os.path.abspath(__file__))


class WorkerProcess:
    """The library's own worker CLI in a session of its own, ended by pid (its group)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], ready: str) -> None:
        name = os.path.join(HERE, f".{os.path.basename(argv[0])}-{os.getpid()}.log")
        self.log = open(name, "w+b")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            env={**os.environ, **env, "PYTHONPATH": HERE},
            cwd=HERE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ready = ready

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.log.seek(0)
            if self.ready.encode() in self.log.read():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.log.seek(0)
        raise RuntimeError(f"worker not ready: {self.log.read().decode(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(
    chain_ms: list[float], groups: list[dict[str, float]], chords: list[float]
) -> dict[str, Any]:
    """Medians over repetitions, in milliseconds."""
    return {
        "chain_p50_ms": percentile(chain_ms, 0.5),
        "chain_p99_ms": percentile(chain_ms, 0.99),
        "group_enqueue_ms": statistics.median(g["enqueue"] for g in groups),
        "group_all_results_ms": statistics.median(g["done"] for g in groups),
        "group_floor_ms": statistics.median(g.get("floor", float("nan")) for g in groups),
        "chord_ms": statistics.median(chords),
        "sizes": {
            "chain": CHAIN_STEPS,
            "chain_runs": len(chain_ms),
            "group": GROUP_SIZE,
            "chord": CHORD_SIZE,
            "reps": REPS,
        },
    }


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
