"""Orchestrator: runs every contestant, one at a time, and writes results/ and the chart.

Run through bench.sh (which builds the virtualenvs). Every contestant runs in its own venv:
a client *driver* process (contestants/_driver.py) that speaks line-JSON on stdin/stdout, and
worker processes started from the argv the driver hands back. Every process started here is in
its own session and is ended by its pid (SIGTERM, then SIGKILL) on every path out.

    python run.py [--quick] [--only ID,ID] [--skip ID,ID] [--growth N,N] [--payload N]
        [--queues QxN]

--only / --skip take contestant ids and step names (STEPS) alike: ``--skip payload,queues``
runs every contestant without those two steps; ``--only arq,main,latency,payload`` runs arq's
plain drain, latency and payload steps only. ``BENCH_REDIS_URL`` picks the Redis database
(default db 14, which the run flushes).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
CONTESTANTS_DIR = HERE / "contestants"
VENVS = HERE / ".venvs"
RESULTS = HERE / "results"
LOGS = RESULTS / "logs"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
BROKER_PORTS = {6379, 5672}

LIVE: dict[int, str] = {}  # pid -> label of every process group started and not yet ended


@dataclass(frozen=True)
class Spec:
    id: str
    label: str
    venv: str
    module: str
    transport: str
    variant: str = ""
    floor: bool = False


SPECS: list[Spec] = [
    Spec("floor-redis-1by1", "floor redis 1-by-1", "floor", "c_floor", "redis", "1by1", True),
    Spec("floor-redis-batch", "floor redis batch100", "floor", "c_floor", "redis", "batch", True),
    Spec("floor-redis-raw", "floor redis raw", "floor", "c_floor", "redis", "raw", True),
    Spec("floor-amqp", "floor amqp", "floor", "c_floor", "amqp", "batch", True),
    Spec("aioqueue-redis", "aioqueue", "aioqueue", "c_aioqueue", "redis"),
    Spec("aioqueue-amqp", "aioqueue", "aioqueue", "c_aioqueue", "amqp"),
    Spec(
        "aioqueue-amqp-noconfirm",
        "aioqueue noconfirm",
        "aioqueue",
        "c_aioqueue",
        "amqp",
        "noconfirm",
    ),
    Spec("arq", "arq", "arq", "c_arq", "redis"),
    Spec("saq", "saq", "saq", "c_saq", "redis"),
    Spec("taskiq-redis", "taskiq", "taskiq", "c_taskiq", "redis"),
    Spec("taskiq-amqp", "taskiq", "taskiq", "c_taskiq", "amqp"),
    Spec("streaq", "streaq", "streaq", "c_streaq", "redis"),
    Spec("dramatiq-redis", "dramatiq", "dramatiq", "c_dramatiq", "redis"),
    Spec("dramatiq-amqp", "dramatiq", "dramatiq", "c_dramatiq", "amqp"),
    Spec("celery-redis", "celery", "celery", "c_celery", "redis"),
    Spec("celery-amqp", "celery", "celery", "c_celery", "amqp"),
]


@dataclass
class Plan:
    quick: bool
    n: int  # tasks per enqueue / drain repetition
    reps: int  # one-by-one enqueue + drain repetitions wanted
    batch_reps: int  # batch enqueue + drain repetitions wanted
    leak_n: int  # keep draining (untimed fills) until the worker has run this many; 0: off
    rt_n: int
    fanin_n: int
    lat_reps: int
    sync_n: int
    sync_ids: tuple[str, ...] | None  # None: every contestant that supports it
    scale: tuple[int, ...]
    scale_n: int
    total_s: float  # whole-run budget; each contestant gets a share of what is left
    latency_cap_s: float  # one round-trip / fan-in repetition stops after this long
    growth: tuple[int, ...] = ()  # backlog sizes for the cost-growth rows (--growth)
    payload_n: int = 0  # tasks with one PAYLOAD_BYTES argument (--payload); 0: off
    payload_rt_n: int = 0  # sequential round trips with that argument
    queues: tuple[int, int] = (0, 0)  # (queues, tasks per queue) for the many-queues row


QUICK = Plan(
    quick=True,
    n=2000,
    reps=1,
    batch_reps=1,
    leak_n=0,
    rt_n=200,
    fanin_n=200,
    lat_reps=1,
    sync_n=100,
    sync_ids=("aioqueue-redis", "celery-redis"),
    scale=(),
    scale_n=0,
    total_s=95.0,
    latency_cap_s=5.0,
)
FULL = Plan(
    quick=False,
    n=20000,
    reps=3,
    batch_reps=3,
    leak_n=100000,
    rt_n=1000,
    fanin_n=1000,
    lat_reps=3,
    sync_n=2000,
    sync_ids=None,
    scale=(2, 4),
    scale_n=6000,
    total_s=720.0,
    latency_cap_s=5.0,
    growth=(10000, 100000),
    payload_n=2000,
    payload_rt_n=200,
    queues=(20, 500),
)
# share of a contestant's budget each step may use before it stops repeating
SHARES = {"main": 0.4, "latency": 0.15}
PAYLOAD_BYTES = 100_000  # one str argument of this many characters (ASCII, so as many bytes)
STEPS = ("main", "latency", "sync", "scaling", "growth", "payload", "queues", "leak")
# steps whose time is added back to the run's budget, so the rows added for issue 15 do not
# take repetitions away from the contestants that run after
UNBUDGETED = ("payload", "queues")
LEAK_CHUNK = 5000
CONCURRENT_SENDERS = 100
DRAIN_METHOD = (
    "fresh worker started after the enqueue; rate from the first completion to the last, "
    "as seen by the result-key sweep"
)


# -- processes -----------------------------------------------------------------------------
def end_group(pid: int, grace: float = 3.0) -> None:
    """SIGTERM the process group we started as ``pid``, then SIGKILL it after ``grace``."""
    label = LIVE.pop(pid, None)
    if label is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)  # a paused worker cannot act on SIGTERM
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done == pid:
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # stragglers in the group (children of the worker)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def end_all() -> None:
    for pid in list(LIVE):
        end_group(pid, grace=1.0)


def base_env(spec: Spec, run_id: str, plan: Plan) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_REDIS_URL=REDIS_URL,
        BENCH_AMQP_URL=AMQP_URL,
        BENCH_RUN_ID=run_id,
        BENCH_TRANSPORT=spec.transport,
        BENCH_VARIANT=spec.variant,
        BENCH_PAYLOAD_BYTES=str(PAYLOAD_BYTES),
        BENCH_QUEUES=str(plan.queues[0] or 1),
        PYTHONPATH=str(CONTESTANTS_DIR),
        PYTHONUNBUFFERED="1",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


class DriverError(Exception):
    def __init__(self, msg: str, na: bool = False) -> None:
        super().__init__(msg)
        self.na = na


class Driver:
    """The contestant's client process; one JSON request, one JSON reply."""

    def __init__(self, spec: Spec, env: dict[str, str], log: Path) -> None:
        py = VENVS / spec.venv / "bin" / "python"
        if not py.exists():
            raise DriverError(f"venv {spec.venv} missing (run bench.sh)", na=True)
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [str(py), str(CONTESTANTS_DIR / "_driver.py"), spec.module, spec.transport],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=CONTESTANTS_DIR,
            env=env,
            start_new_session=True,
        )
        LIVE[self.proc.pid] = f"driver {spec.id}"
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        hello = self._read(60.0)
        if not hello.get("ok"):
            raise DriverError(str(hello.get("error")), na=bool(hello.get("na")))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def _read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise DriverError(f"timed out after {timeout:.0f}s") from None
        if not line:
            raise DriverError("driver exited (see log)")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, cmd: str, wait_s: float, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._read(wait_s)
        if not reply.get("ok"):
            raise DriverError(str(reply.get("error")), na=bool(reply.get("na")))
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("quit", 10.0)
        end_group(self.proc.pid, grace=5.0)
        self.log.close()


class Workers:
    """k worker processes of one contestant, sampled for RSS while they run."""

    def __init__(self, argv: list[str], env: dict[str, str], k: int, log: Path) -> None:
        self.log = log.open("ab")
        self.pids: list[int] = []
        for _ in range(k):
            p = subprocess.Popen(
                argv,
                env=env,
                cwd=CONTESTANTS_DIR,
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=self.log,
                start_new_session=True,
            )
            LIVE[p.pid] = "worker"
            self.pids.append(p.pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic(), self._rss()))

    def rss_mb(self) -> float:
        return self._rss() / 2**20

    def peak_since(self, t: float) -> float:
        return max((r for ts, r in self.samples if ts >= t), default=0) / 2**20

    def alive(self) -> bool:
        return all(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in self.pids
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for pid in self.pids:
            end_group(pid, grace=3.0)
        self.log.close()

    def peak_rss_mb(self) -> float:
        return max((s for _, s in self.samples), default=0) / 2**20

    def rss_at(self, t: float) -> float:
        best = min(self.samples, key=lambda s: abs(s[0] - t), default=(0.0, 0))
        return best[1] / 2**20


class ConnSampler:
    """Peak number of TCP connections from a process to Redis/RabbitMQ."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _count(self) -> int:
        try:
            conns = self.proc.net_connections(kind="tcp")
        except psutil.Error:
            return 0
        return sum(1 for c in conns if c.raddr and c.raddr.port in BROKER_PORTS)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._count())
            if self._stop.wait(0.02):
                break

    def stop(self) -> int:
        self._stop.set()
        self._t.join(2)
        self.peak = max(self.peak, self._count())
        return self.peak


# -- measurement -----------------------------------------------------------------------------
def summarize(
    values: list[float], unit: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"unit": unit, "reps": values}
    if values:
        out.update(median=statistics.median(values), min=min(values), max=max(values))
    if extra:
        out.update(extra)
    return out


def na(reason: str) -> dict[str, Any]:
    return {"na": reason}


def err(reason: str) -> dict[str, Any]:
    return {"error": reason}


def mid_rate(progress: list[list[float]], n: int) -> float | None:
    """Tasks/s between 10% and 90% of n done (robust to staggered worker start-up)."""

    def t_at(target: float) -> float | None:
        prev: list[float] | None = None
        for t, d in progress:
            if d >= target:
                if prev is None or d == prev[1]:
                    return t
                return prev[0] + (t - prev[0]) * (target - prev[1]) / (d - prev[1])
            prev = [t, d]
        return None

    a, b = t_at(0.1 * n), t_at(0.9 * n)
    if a is None or b is None or b <= a:
        return None
    return 0.8 * n / (b - a)


@dataclass
class Runner:
    """Runs every workload of one contestant within ``budget_s`` (a share of the run's budget).

    Each enqueue + drain repetition enqueues with no worker running (so the enqueue is timed
    alone), then starts a fresh worker on the full queue; the drain is timed from the first
    completion, so start-up is not in it. (Pausing one warm worker with SIGSTOP instead was
    tried and dropped: a blocking read with a client-side timeout, like taskiq's XREADGROUP,
    fails when the process resumes.) Round trip, fan-in and the leak check share one
    long-lived worker.
    """

    spec: Spec
    plan: Plan
    run_id: str
    budget_s: float
    steps: tuple[str, ...] = STEPS
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.env = base_env(self.spec, self.run_id, self.plan)
        self.log = LOGS / f"{self.spec.id}.log"
        self.driver: Driver | None = None
        self.unsupported: dict[str, str] = {}
        self.unbudgeted_s = 0.0  # time in UNBUDGETED steps, given back to the run's budget

    def share(self, step: str) -> float:
        return self.budget_s * SHARES[step]

    def elapsed(self) -> float:
        """Seconds this contestant has used of its budget (UNBUDGETED steps not counted)."""
        return time.monotonic() - self.started - self.unbudgeted_s

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def drain_timeout(self, n: int) -> float:
        return max(30.0, n / 400.0)

    def call(self, cmd: str, wait_s: float = 60.0, **kw: Any) -> dict[str, Any]:
        assert self.driver is not None
        return self.driver.call(cmd, wait_s, **kw)

    def worker(self, kind: str, k: int = 1) -> Workers:
        w = self.call("worker_argv", 10, kind=kind)
        return Workers(w["argv"], {**self.env, **w["env"]}, k, self.log)

    def run(self) -> dict[str, Any]:
        try:
            self.driver = Driver(self.spec, self.env, self.log)
        except DriverError as exc:
            return {"status": "not available" if exc.na else "error", "error": str(exc)}
        out: dict[str, Any] = {"status": "ok", "budget_s": round(self.budget_s, 1)}
        try:
            desc = self.call("describe", 30)["describe"]
            out.update(describe=desc)
            self.unsupported = desc.get("unsupported", {})
            self.call("purge")
            steps = {
                "main": self.step_main,
                "latency": self.step_latency_worker,
                "sync": self.step_sync,
                "scaling": self.step_scaling,
                "growth": self.step_growth,
                "payload": self.step_payload,
                "queues": self.step_queues,
                "leak": self.step_leak,
            }
            for name, step in steps.items():
                if name in self.steps:
                    t0 = time.monotonic()
                    step()
                    if name in UNBUDGETED:
                        self.unbudgeted_s += time.monotonic() - t0
        except DriverError as exc:
            out["status"] = "error"
            out["error"] = str(exc)
        finally:
            self.final_cleanup()
        out["results"] = self.results
        out["elapsed_s"] = round(time.monotonic() - self.started, 1)
        out["unbudgeted_s"] = round(self.unbudgeted_s, 1)
        return out

    def final_cleanup(self) -> None:
        """Delete the run's queues; through a fresh driver if this one died or hung."""
        assert self.driver is not None
        try:
            self.call("cleanup")
            self.driver.close()
            return
        except Exception:
            self.driver.close()
        with contextlib.suppress(Exception):
            fresh = Driver(self.spec, self.env, self.log)
            try:
                fresh.call("cleanup", 60)
            finally:
                fresh.close()

    # -- enqueue, drain, memory, latency: one worker -------------------------------------
    def step_main(self) -> None:
        """Timed enqueue + drain repetitions, a fresh worker per drain; then batch enqueues."""
        p = self.plan
        enq: list[float] = []
        drains: list[float] = []
        mids: list[float] = []
        peaks: list[float] = []
        notes: list[str] = []
        t0 = time.monotonic()
        while len(enq) < p.reps and not (enq and time.monotonic() - t0 > self.share("main")):
            self.call("purge")
            r = self.call("enqueue", max(60.0, p.n / 200), n=p.n, batch=False)
            enq.append(r["rate"])
            res, peak = self.drain_with(1, p.n)
            peaks.append(peak)
            if res["rate"]:
                drains.append(res["rate"])
            if (m := mid_rate(res["progress"], p.n)) is not None:
                mids.append(m)
            if not res["complete"]:
                notes.append(f"drain incomplete: {res['done']}/{res['n']} (stalled or timed out)")
                break
        self.call("purge")
        self.results["enqueue"] = summarize(enq, "tasks/s", {"n": p.n})
        self.results["drain"] = summarize(
            drains, "tasks/s", {"n": p.n, "notes": notes, "method": DRAIN_METHOD}
        )
        self.results["drain_mid"] = summarize(mids, "tasks/s", {"n": p.n, "window": "10-90%"})
        self.results["peak_rss"] = summarize(peaks, "MB", {"during": "drain"})
        self.step_batch()

    def drain_with(self, k: int, n: int, kind: str = "noop") -> tuple[dict[str, Any], float]:
        """Start k workers on the queued tasks, wait for every result, stop the workers."""
        w = self.worker(kind, k)
        try:
            res = self.call("drain_wait", self.drain_timeout(n) + 30, timeout=self.drain_timeout(n))
        finally:
            w.stop()
        return res, w.peak_rss_mb()

    def step_batch(self) -> None:
        if "enqueue_batch" in self.unsupported:
            self.results["enqueue_batch"] = na(self.unsupported["enqueue_batch"])
            return
        rates: list[float] = []
        t0 = time.monotonic()
        while len(rates) < self.plan.batch_reps:
            if rates and time.monotonic() - t0 > self.share("main") / 3:
                break
            try:
                r = self.call("enqueue", 120, n=self.plan.n, batch=True)
            except DriverError as exc:
                self.results["enqueue_batch"] = na(str(exc)) if exc.na else err(str(exc))
                return
            finally:
                self.call("purge")
            rates.append(r["rate"])
        self.results["enqueue_batch"] = summarize(rates, "tasks/s", {"n": self.plan.n})
        self.step_concurrent()

    def step_concurrent(self) -> None:
        """Enqueue from CONCURRENT_SENDERS coroutines at once, each awaiting its own sends:
        what a web app sending from many requests sees (confirms shared, not one per RTT)."""
        rates: list[float] = []
        t0 = time.monotonic()
        while len(rates) < self.plan.batch_reps:
            if rates and time.monotonic() - t0 > self.share("main") / 3:
                break
            try:
                r = self.call(
                    "enqueue", 120, n=self.plan.n, batch=False, concurrency=CONCURRENT_SENDERS
                )
            except DriverError as exc:
                self.results["enqueue_c100"] = na(str(exc)) if exc.na else err(str(exc))
                return
            finally:
                self.call("purge")
            rates.append(r["rate"])
        self.results["enqueue_c100"] = summarize(
            rates, "tasks/s", {"n": self.plan.n, "senders": CONCURRENT_SENDERS}
        )

    # -- latency and memory over time: one long-lived worker ------------------------------
    def step_latency_worker(self) -> None:
        w = self.worker("noop")
        try:
            self.call("roundtrip", 120, n=5, timeout=90)  # worker up and consuming
            self.step_latency()
        except DriverError as exc:
            self.results["roundtrip"] = self.results["fanin"] = err(f"warm-up: {exc}")
        finally:
            w.stop()
        self.call("purge")

    # -- memory over many tasks: last, with whatever time is left --------------------------
    def step_leak(self) -> None:
        if not self.plan.leak_n:
            return
        if self.spec.floor:
            self.results["leak"] = na("floor: no task code")
            return
        if self.elapsed() > 1.25 * self.budget_s:
            self.results["leak"] = na("skipped: time budget")
            return
        w = self.worker("noop")
        try:
            self.call("roundtrip", 120, n=5, timeout=90)
            self.results["leak"] = self.leak_cell(w)
        except DriverError as exc:
            self.results["leak"] = err(str(exc))
        finally:
            w.stop()
        self.call("purge")

    def leak_cell(self, w: Workers) -> dict[str, Any]:
        """Feed the running worker chunks of tasks until leak_n ran or the budget is used (at
        least two chunks); RSS is read after each chunk has drained."""
        chunk = LEAK_CHUNK
        points: list[tuple[int, float]] = []
        total = 0
        while total < self.plan.leak_n and (len(points) < 2 or not self.over_budget()):
            self.call("prefill", 180, n=chunk)
            res = self.call(
                "drain_wait", self.drain_timeout(chunk) + 30, timeout=self.drain_timeout(chunk)
            )
            total += res["done"]
            points.append((total, w.rss_mb()))
            if not res["complete"]:
                break
        return leak_summary(points)

    def step_latency(self) -> None:
        p = self.plan
        for key, n in (("roundtrip", p.rt_n), ("fanin", p.fanin_n)):
            try:
                self.results[key] = self.latency_cell(key, n)
            except DriverError as exc:
                self.results[key] = err(str(exc))

    def latency_cell(self, cmd: str, n: int) -> dict[str, Any]:
        assert self.driver is not None
        p50: list[float] = []
        p99: list[float] = []
        conns: list[int] = []
        notes: list[str] = []
        limit = self.plan.latency_cap_s
        t0 = time.monotonic()
        while len(p50) < self.plan.lat_reps:
            if p50 and time.monotonic() - t0 > self.share("latency") / 2:
                break
            sampler = ConnSampler(self.driver.pid) if cmd == "fanin" else None
            try:
                r = self.call(cmd, limit + 30, n=n, timeout=limit)
            except DriverError as exc:
                if "Timeout" in str(exc) and cmd == "fanin":
                    raise DriverError(f"not all {n} results within {limit:.0f}s") from exc
                raise
            finally:
                peak = sampler.stop() if sampler else 0
            if r.get("partial"):
                notes.append(f"time cap {limit:.0f}s: {r['n']} of {n} round trips measured")
            p50.append(r["p50_ms"])
            p99.append(r["p99_ms"])
            conns.append(peak)
        out = summarize(p50, "ms", {"n": n, "p99": summarize(p99, "ms"), "notes": notes})
        if cmd == "fanin":
            out["connections"] = max(conns)
        return out

    # -- sync work ------------------------------------------------------------------------
    def step_sync(self) -> None:
        p = self.plan
        for kind, ms in (("cpu", 5.0), ("block", 10.0)):
            key = f"sync_{kind}"
            if self.spec.floor:
                self.results[key] = na("floor: no task code")
            elif kind in self.unsupported:
                self.results[key] = na(self.unsupported[kind])
            elif p.sync_ids is not None and self.spec.id not in p.sync_ids:
                self.results[key] = na("skipped in quick mode")
            else:
                self.results[key] = self.sync_cell(kind, ms)

    def sync_cell(self, kind: str, ms: float) -> dict[str, Any]:
        n = self.plan.sync_n
        self.call("purge")
        self.call("prefill", 120, n=n, kind=kind, ms=ms)
        w = self.worker(kind)
        try:
            res = self.call("drain_wait", 120, timeout=90)
        finally:
            w.stop()
        self.call("purge")
        ideal = n * ms / 1000 / (2 if kind == "cpu" else 50)
        out = summarize(
            [res["seconds"]],
            "s",
            {
                "n": n,
                "task_ms": ms,
                "rate": res["rate"],
                "peak_rss_mb": w.peak_rss_mb(),
                "ideal_s": ideal,
            },
        )
        if not res["complete"]:
            out["notes"] = [f"incomplete: {res['done']}/{n}"]
        return out

    # -- scaling ----------------------------------------------------------------------------
    def step_scaling(self) -> None:
        if not self.plan.scale or self.spec.floor:
            return
        one = self.results.get("drain_mid", {}).get("median")
        # about 4 s of work at the one-process rate, so fast rows are not timed over a blink
        n = min(self.plan.n, max(self.plan.scale_n, int((one or 0) * 4)))
        out: dict[str, Any] = {"unit": "tasks/s", "window": "10-90%", "n": n, "1": one}
        for k in self.plan.scale:
            if time.monotonic() - self.started > 1.5 * self.budget_s:
                out[str(k)] = None
                out.setdefault("notes", []).append(f"{k} procs skipped: time budget")
                continue
            self.call("purge")
            self.call("prefill", 180, n=n)
            w = self.worker("noop", k)
            try:
                res = self.call(
                    "drain_wait", self.drain_timeout(n) + 30, timeout=self.drain_timeout(n)
                )
            finally:
                w.stop()
            out[str(k)] = robust_rate(res, n, out)
        self.call("purge")
        self.results["scaling"] = out

    # -- cost growth: deep backlogs ------------------------------------------------------
    def step_growth(self) -> None:
        """Per backlog size n: prefill n tasks (no worker), the bytes each waiting task costs
        the broker, then one worker drains them all (rate first to last, peak RSS)."""
        if not self.plan.growth or self.spec.floor:
            return
        out: dict[str, Any] = {"unit": "tasks/s", "sizes": list(self.plan.growth)}
        for n in self.plan.growth:
            if time.monotonic() - self.started > 2.0 * self.budget_s:
                out.setdefault("notes", []).append(f"{n:,} skipped: time budget")
                continue
            self.call("purge")
            self.call("prefill", max(180.0, n / 200), n=n)
            size = waiting_bytes(self.spec, self.run_id)
            res, peak = self.drain_with(1, n)
            out[str(n)] = {
                "drain": res["rate"] or None,
                "complete": res["complete"],
                "bytes_per_task": size / n if size else None,
                "peak_rss": peak,
            }
        self.call("purge")
        self.results["growth"] = out

    # -- cost growth: payload size and queue count ----------------------------------------
    def plain(self, key: str) -> float | None:
        """The median of this contestant's plain (no-op, one-queue) cell ``key``, if measured."""
        cell = self.results.get(key)
        v = cell.get("median") if isinstance(cell, dict) else None
        return float(v) if isinstance(v, int | float) and v else None

    def step_payload(self) -> None:
        """payload_n tasks, each with one PAYLOAD_BYTES str argument and a tiny result: timed
        one-by-one enqueue, then a fresh worker drains them (rate first to last, peak RSS),
        then payload_rt_n sequential round trips on that warm worker. Each is set against the
        same contestant's no-op cell (enqueue, drain, roundtrip) of this run."""
        n = self.plan.payload_n
        if not n or self.spec.floor:
            return
        if "payload" in self.unsupported:
            self.results["payload"] = na(self.unsupported["payload"])
            return
        if self.elapsed() > 2.0 * self.budget_s:
            self.results["payload"] = na("skipped: time budget")
            return
        out: dict[str, Any] = {"unit": "tasks/s", "n": n, "bytes": PAYLOAD_BYTES}
        try:
            self.call("purge")
            r = self.call("enqueue", max(120.0, n / 50), n=n, batch=False, kind="payload")
            out["enqueue"] = r["rate"]
            w = self.worker("payload")
            try:
                t = self.drain_timeout(n)
                res = self.call("drain_wait", t + 30, timeout=t)
                out.update(drain=res["rate"] or None, complete=res["complete"])
                out["peak_rss"] = w.peak_rss_mb()
                if not res["complete"]:
                    out.setdefault("notes", []).append(f"drain incomplete: {res['done']}/{n}")
                rt_n = self.plan.payload_rt_n
                if rt_n:
                    cap = self.plan.latency_cap_s
                    rt = self.call("roundtrip", cap + 60, n=rt_n, timeout=cap, kind="payload")
                    out.update(rt_n=rt["n"], rt_p50=rt["p50_ms"], rt_p99=rt["p99_ms"])
                    if rt.get("partial"):
                        out.setdefault("notes", []).append(
                            f"time cap {cap:.0f}s: {rt['n']} of {rt_n} round trips measured"
                        )
            finally:
                w.stop()
        except DriverError as exc:
            self.call("purge")
            self.results["payload"] = na(str(exc)) if exc.na else err(str(exc))
            return
        self.call("purge")
        # own ratios: throughput payload / plain (below 1: slower), latency payload / plain
        # (above 1: slower)
        for key, base in (("enqueue", "enqueue"), ("drain", "drain"), ("rt_p50", "roundtrip")):
            plain = self.plain(base)
            out[f"{key}_plain"] = plain
            v = out.get(key)
            out[f"{key}_x"] = v / plain if isinstance(v, int | float) and plain else None
        self.results["payload"] = out

    def step_queues(self) -> None:
        """queues x per no-op tasks spread evenly (round robin) over that many queues, prefilled
        with no worker; then one worker listening on all of them drains them (rate first to
        last), set against the same contestant's one-queue drain of this run. Fast rows get more
        per queue (about 4 s of work, at most the plain drain's n)."""
        q, per = self.plan.queues
        if not q or not per or self.spec.floor:
            return
        if "queues" in self.unsupported:
            self.results["queues"] = na(self.unsupported["queues"])
            return
        if self.elapsed() > 2.0 * self.budget_s:
            self.results["queues"] = na("skipped: time budget")
            return
        plain = self.plain("drain")
        # fast rows: at least ~4 s of work at the one-queue rate, up to the plain drain's n, so
        # the drain is not timed over a blink (the scaling step does the same)
        per = max(per, min(self.plan.n, int((plain or 0) * 4)) // q)
        n = q * per
        try:
            self.call("purge")
            self.call("prefill", max(180.0, n / 100), n=n, kind="queues")
            res, peak = self.drain_with(1, n, "queues")
        except DriverError as exc:
            self.call("purge")
            self.results["queues"] = na(str(exc)) if exc.na else err(str(exc))
            return
        self.call("purge")
        drain = res["rate"] or None
        out: dict[str, Any] = {
            "unit": "tasks/s",
            "queues": q,
            "per_queue": per,
            "n": n,
            "drain": drain,
            "drain_mid": mid_rate(res["progress"], n),
            "complete": res["complete"],
            "peak_rss": peak,
            "drain_plain": plain,
            "drain_x": drain / plain if drain and plain else None,
        }
        if not res["complete"]:
            out["notes"] = [f"drain incomplete: {res['done']}/{n}"]
        self.results["queues"] = out


def waiting_bytes(spec: Spec, run_id: str) -> int:
    """Bytes the waiting tasks take in the broker: every key of the bench db (MEMORY USAGE, exact),
    plus on RabbitMQ the ``message_bytes`` of this run's queues (message bodies: RabbitMQ does
    not count their properties there)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    total = 0
    try:
        for key in client.scan_iter(count=1000):
            total += int(client.memory_usage(key, samples=0) or 0)
    finally:
        client.close()
    if spec.transport == "amqp":
        res = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "--no-table-headers", "name", "message_bytes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for line in res.stdout.splitlines():
            name, _, count = line.partition("\t")
            if run_id in name and count.strip().isdigit():
                total += int(count)
    return total


def robust_rate(res: dict[str, Any], n: int, out: dict[str, Any]) -> float | None:
    """The 10-90% rate, unless it disagrees wildly with first-to-last (a completion sweep that
    saw most tasks at once makes the window collapse); then first-to-last, with a note."""
    mid = mid_rate(res["progress"], n)
    span = res.get("rate") or None
    if mid is not None and span and mid > 2.5 * span:
        out.setdefault("notes", []).append(
            f"10-90% window collapsed ({mid:,.0f}/s); first-to-last rate used"
        )
        return float(span)
    return mid if mid is not None else span


def leak_summary(rss_after: list[tuple[int, float]]) -> dict[str, Any]:
    """RSS after the first drain vs after the last one, in the same worker process."""
    if len(rss_after) < 2:
        return na("needs two drained chunks in one worker (full mode)")
    (n0, r0), (n1, r1) = rss_after[0], rss_after[-1]
    return {
        "unit": "MB",
        "tasks": n1,
        "from_tasks": n0,
        "rss_first": r0,
        "rss_last": r1,
        "growth": r1 - r0,
        "per_10k": (r1 - r0) / max(1, n1 - n0) * 10000,
        "points": rss_after,
    }


def run_all(specs: list[Spec], plan: Plan, steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
    """Each contestant gets a share of the time left, weighted (floors run fewer workloads)."""
    run_id = uuid.uuid4().hex[:8]
    out: dict[str, Any] = {}
    t_end = time.monotonic() + plan.total_s
    for i, spec in enumerate(specs):
        t0 = time.monotonic()
        weights = [0.5 if s.floor else 1.0 for s in specs[i:]]
        budget = max(5.0, (t_end - t0) * weights[0] / sum(weights))
        print(f"-- {spec.id} (budget {budget:.0f}s) ...", end="", flush=True)
        res = Runner(spec, plan, run_id, budget, steps).run()
        t_end += res.get("unbudgeted_s", 0.0)
        out[spec.id] = {"spec": spec.__dict__, **res}
        print(
            f" {res['status']} ({time.monotonic() - t0:.1f}s)"
            + (f": {res.get('error')}" if res.get("error") else ""),
            flush=True,
        )
    return out


def meta(plan: Plan) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if plan.quick else "full",
        "plan": plan.__dict__,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "servers": server_versions(),
    }


def server_versions() -> dict[str, str]:
    out = {}
    try:
        import redis

        out["redis"] = str(redis.Redis.from_url(REDIS_URL).info("server")["redis_version"])
    except Exception as exc:
        out["redis"] = f"unknown ({exc})"
    try:
        res = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=20, check=False
        )
        out["rabbitmq"] = res.stdout.strip() or "unknown"
    except Exception:
        out["rabbitmq"] = "unknown"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--only", default="", help=f"contestant ids and/or step names ({','.join(STEPS)}) to run"
    )
    ap.add_argument("--skip", default="", help="contestant ids and/or step names to leave out")
    ap.add_argument(
        "--growth",
        default=None,
        help="backlog sizes for the cost-growth rows, e.g. 10000,100000,1000000 "
        "(full mode: 10000,100000; quick mode: none unless given)",
    )
    ap.add_argument(
        "--payload",
        type=int,
        default=None,
        help=f"tasks with one {PAYLOAD_BYTES:,}-byte argument for the payload row "
        "(full mode: 2000; quick mode: 0 = off unless given)",
    )
    ap.add_argument(
        "--queues",
        default=None,
        help="QxN: N tasks on each of Q queues, one worker on all Q, for the many-queues row "
        "(full mode: 20x500; quick mode: off unless given)",
    )
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    if args.growth is not None:
        sizes = tuple(int(x) for x in args.growth.split(",") if x.strip())
        plan = dataclasses.replace(plan, growth=sizes)
    if args.payload is not None:
        rt_n = plan.payload_rt_n or max(1, min(200, args.payload // 10))
        plan = dataclasses.replace(plan, payload_n=args.payload, payload_rt_n=rt_n)
    if args.queues is not None:
        q, _, per = args.queues.lower().partition("x")
        plan = dataclasses.replace(plan, queues=(int(q or 0), int(per or 0)))
    only = [x for x in args.only.split(",") if x]
    skip = [x for x in args.skip.split(",") if x]
    ids = {s.id for s in SPECS}
    for name in only + skip:
        if name not in ids and name not in STEPS:
            ap.error(f"unknown contestant id or step name: {name}")
    specs = SPECS
    if any(x in ids for x in only):
        specs = [s for s in specs if s.id in only]
    specs = [s for s in specs if s.id not in skip]
    steps = STEPS
    if any(x in STEPS for x in only):
        steps = tuple(x for x in steps if x in only)
    steps = tuple(x for x in steps if x not in skip)
    LOGS.mkdir(parents=True, exist_ok=True)
    for f in LOGS.glob("*.log"):
        f.unlink()
    atexit.register(end_all)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(130))
    t0 = time.monotonic()
    data = {"meta": meta(plan), "contestants": run_all(specs, plan, steps)}
    data["meta"]["steps"] = list(steps)
    data["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    from report import write_outputs

    write_outputs(data, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
