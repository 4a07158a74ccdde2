"""Orchestrator: runs every contestant, one at a time, and writes results/ and the chart.

Run through bench.sh (which builds the virtualenvs). Every contestant runs in its own venv:
a client *driver* process (contestants/_driver.py) that speaks line-JSON on stdin/stdout, and
worker processes started from the argv the driver hands back. Every process started here is in
its own session and is ended by its pid (SIGTERM, then SIGKILL) on every path out.

    python run.py [--quick] [--only ID,ID] [--skip ID,ID]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
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
REDIS_URL = "redis://127.0.0.1:6379/14"
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
    Spec("floor-amqp", "floor amqp", "floor", "c_floor", "amqp", "batch", True),
    Spec("aioqueue-redis", "aioqueue", "aioqueue", "c_aioqueue", "redis"),
    Spec("aioqueue-amqp", "aioqueue", "aioqueue", "c_aioqueue", "amqp"),
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
    n: int  # enqueue + drain
    reps: int
    batch_reps: int
    rt_n: int
    rt_reps: int
    fanin_n: int
    fanin_reps: int
    sync_n: int
    sync_ids: tuple[str, ...] | None  # None: every contestant
    scale: tuple[int, ...]
    leak_n: int  # 0: skipped
    budget_s: float  # soft budget per contestant; reps are cut when exceeded
    cell_budget_s: float  # stop repeating a cell once it has used this much time
    latency_cap_s: float  # one round-trip / fan-in repetition stops after this long


QUICK = Plan(True, 2000, 1, 1, 200, 1, 200, 1, 100, ("aioqueue-redis", "celery-redis"), (),
             0, 12.0, 6.0, 6.0)
FULL = Plan(False, 20000, 3, 3, 1000, 3, 1000, 2, 2000, None, (2, 4), 100000, 75.0, 18.0,
            25.0)


# -- processes -----------------------------------------------------------------------------
def end_group(pid: int, grace: float = 3.0) -> None:
    """SIGTERM the process group we started as ``pid``, then SIGKILL it after ``grace``."""
    label = LIVE.pop(pid, None)
    if label is None:
        return
    with contextlib.suppress(ProcessLookupError):
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


def base_env(spec: Spec, run_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_REDIS_URL=REDIS_URL,
        BENCH_AMQP_URL=AMQP_URL,
        BENCH_RUN_ID=run_id,
        BENCH_TRANSPORT=spec.transport,
        BENCH_VARIANT=spec.variant,
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
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            cwd=CONTESTANTS_DIR, env=env, start_new_session=True,
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
            p = subprocess.Popen(argv, env=env, cwd=CONTESTANTS_DIR, stdin=subprocess.DEVNULL,
                                 stdout=self.log, stderr=self.log, start_new_session=True)
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

    def alive(self) -> bool:
        return all(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in self.pids)

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
def summarize(values: list[float], unit: str, extra: dict[str, Any] | None = None
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
    spec: Spec
    plan: Plan
    run_id: str
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.env = base_env(self.spec, self.run_id)
        self.log = LOGS / f"{self.spec.id}.log"
        self.driver: Driver | None = None
        self.unsupported: dict[str, str] = {}

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.plan.budget_s

    def reps_for(self, wanted: int, cell_start: float, done: int) -> bool:
        """Whether to run another repetition of a cell."""
        if done >= wanted:
            return False
        if done == 0:
            return True
        used = time.monotonic() - cell_start
        return used < self.plan.cell_budget_s and not self.over_budget()

    def drain_timeout(self, n: int) -> float:
        return max(30.0, n / 400.0)

    def worker(self, kind: str, k: int = 1) -> Workers:
        assert self.driver is not None
        w = self.driver.call("worker_argv", 10, kind=kind)
        env = {**self.env, **w["env"]}
        return Workers(w["argv"], env, k, self.log)

    def run(self) -> dict[str, Any]:
        try:
            self.driver = Driver(self.spec, self.env, self.log)
        except DriverError as exc:
            return {"status": "not available" if exc.na else "error", "error": str(exc)}
        d = self.driver
        out: dict[str, Any] = {"status": "ok"}
        try:
            desc = d.call("describe", 30)["describe"]
            out.update(describe=desc)
            self.unsupported = desc.get("unsupported", {})
            d.call("purge", 60)
            steps = [self.step_enqueue_drain, self.step_batch, self.step_latency,
                     self.step_sync, self.step_scaling, self.step_leak]
            for step in steps:
                step()
        except DriverError as exc:
            out["status"] = "error"
            out["error"] = str(exc)
        finally:
            with contextlib.suppress(Exception):
                d.call("cleanup", 60)
            d.close()
        out["results"] = self.results
        out["elapsed_s"] = time.monotonic() - self.started
        return out

    # -- steps ---------------------------------------------------------------------------
    def step_enqueue_drain(self) -> None:
        assert self.driver is not None
        p = self.plan
        enq: list[float] = []
        drains: list[float] = []
        mids: list[float] = []
        peaks: list[float] = []
        notes: list[str] = []
        t0 = time.monotonic()
        while self.reps_for(p.reps, t0, len(enq)):
            self.driver.call("purge", 60)
            r = self.driver.call("enqueue", max(60.0, p.n / 200), n=p.n, batch=False)
            enq.append(r["rate"])
            res, peak = self.drain_with(1, p.n)
            if res is None:
                notes.append("drain failed")
                break
            if not res["complete"]:
                notes.append(f"drain incomplete: {res['done']}/{res['n']} before timeout")
            drains.append(res["rate"])
            if (m := mid_rate(res["progress"], p.n)) is not None:
                mids.append(m)
            peaks.append(peak)
        self.results["enqueue"] = summarize(enq, "tasks/s", {"n": p.n})
        self.results["drain"] = summarize(drains, "tasks/s", {"n": p.n, "notes": notes})
        self.results["drain_mid"] = summarize(mids, "tasks/s", {"n": p.n, "window": "10-90%"})
        self.results["peak_rss"] = summarize(peaks, "MB", {"during": "drain"})

    def drain_with(self, k: int, n: int, kind: str = "noop"
                   ) -> tuple[dict[str, Any] | None, float]:
        assert self.driver is not None
        w = self.worker(kind, k)
        try:
            res = self.driver.call("drain_wait", self.drain_timeout(n) + 30,
                                   timeout=self.drain_timeout(n))
        finally:
            w.stop()
        return res, w.peak_rss_mb()

    def step_batch(self) -> None:
        assert self.driver is not None
        if "enqueue_batch" in self.unsupported:
            self.results["enqueue_batch"] = na(self.unsupported["enqueue_batch"])
            return
        rates: list[float] = []
        t0 = time.monotonic()
        while self.reps_for(self.plan.batch_reps, t0, len(rates)):
            self.driver.call("purge", 60)
            try:
                r = self.driver.call("enqueue", 120, n=self.plan.n, batch=True)
            except DriverError as exc:
                self.results["enqueue_batch"] = na(str(exc)) if exc.na else err(str(exc))
                return
            rates.append(r["rate"])
        self.driver.call("purge", 60)
        self.results["enqueue_batch"] = summarize(rates, "tasks/s", {"n": self.plan.n})

    def step_latency(self) -> None:
        assert self.driver is not None
        p = self.plan
        w = self.worker("noop")
        try:
            # warm-up: worker start-up and client connections; partial is fine
            self.driver.call("roundtrip", 90, n=20, timeout=60)
            for key, n, reps in (("roundtrip", p.rt_n, p.rt_reps),
                                 ("fanin", p.fanin_n, p.fanin_reps)):
                try:
                    self.results[key] = self.latency_cell(key, n, reps)
                except DriverError as exc:
                    self.results[key] = err(str(exc))
        except DriverError as exc:
            self.results["roundtrip"] = self.results["fanin"] = err(f"warm-up: {exc}")
        finally:
            w.stop()
        self.driver.call("purge", 60)

    def latency_cell(self, cmd: str, n: int, reps: int) -> dict[str, Any]:
        assert self.driver is not None
        p50: list[float] = []
        p99: list[float] = []
        conns: list[int] = []
        notes: list[str] = []
        limit = self.plan.latency_cap_s
        t0 = time.monotonic()
        while self.reps_for(reps, t0, len(p50)):
            sampler = ConnSampler(self.driver.pid) if cmd == "fanin" else None
            try:
                r = self.driver.call(cmd, limit + 30, n=n, timeout=limit)
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

    def step_sync(self) -> None:
        p = self.plan
        for kind, ms in (("cpu", 5.0), ("block", 10.0)):
            key = f"sync_{kind}"
            if kind in self.unsupported:
                self.results[key] = na(self.unsupported[kind])
            elif p.sync_ids is not None and self.spec.id not in p.sync_ids:
                self.results[key] = na("skipped in quick mode")
            else:
                self.results[key] = self.sync_cell(kind, ms)

    def sync_cell(self, kind: str, ms: float) -> dict[str, Any]:
        assert self.driver is not None
        n = self.plan.sync_n
        self.driver.call("purge", 60)
        self.driver.call("prefill", 120, n=n, kind=kind, ms=ms)
        res, peak = self.drain_with(1, n, kind)
        self.driver.call("purge", 60)
        if res is None:
            return err("drain failed")
        out = summarize([res["seconds"]], "s", {"n": n, "task_ms": ms, "rate": res["rate"],
                                                "peak_rss_mb": peak})
        if not res["complete"]:
            out["notes"] = [f"incomplete: {res['done']}/{n}"]
        return out

    def step_scaling(self) -> None:
        assert self.driver is not None
        if not self.plan.scale:
            return
        one = self.results.get("drain_mid", {}).get("median")
        out: dict[str, Any] = {"unit": "tasks/s", "window": "10-90%", "1": one}
        for k in self.plan.scale:
            if self.over_budget():
                out[str(k)] = None
                out.setdefault("notes", []).append(f"k={k} skipped: time budget")
                continue
            self.driver.call("purge", 60)
            self.driver.call("prefill", 180, n=self.plan.n)
            res, _ = self.drain_with(k, self.plan.n)
            out[str(k)] = mid_rate(res["progress"], self.plan.n) if res else None
        self.driver.call("purge", 60)
        self.results["scaling"] = out

    def step_leak(self) -> None:
        assert self.driver is not None
        n = self.plan.leak_n
        if not n:
            return
        self.driver.call("purge", 60)
        self.driver.call("prefill", 300, n=n)
        w = self.worker("noop")
        limit = 40.0
        try:
            res = self.driver.call("drain_wait", limit + 30, timeout=limit)
        finally:
            w.stop()
        self.driver.call("purge", 60)
        prog = res["progress"]
        if not prog:
            self.results["leak"] = err("no progress")
            return
        t_10k = next((t for t, d in prog if d >= min(10000, n // 10)), prog[0][0])
        t_end = prog[-1][0]
        rss0, rss1 = w.rss_at(t_10k), w.rss_at(t_end)
        self.results["leak"] = {
            "unit": "MB", "tasks": res["done"], "of": n, "rss_at_10k": rss0,
            "rss_at_end": rss1, "growth": rss1 - rss0, "peak": w.peak_rss_mb(),
            "complete": res["complete"], "time_cap_s": limit,
        }


def run_all(specs: list[Spec], plan: Plan) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    out: dict[str, Any] = {}
    for spec in specs:
        t0 = time.monotonic()
        print(f"-- {spec.id} ...", end="", flush=True)
        res = Runner(spec, plan, run_id).run()
        out[spec.id] = {"spec": spec.__dict__, **res}
        print(f" {res['status']} ({time.monotonic() - t0:.1f}s)"
              + (f": {res.get('error')}" if res.get("error") else ""), flush=True)
    return out


def meta(plan: Plan) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if plan.quick else "full",
        "plan": plan.__dict__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "mem_gb": round(psutil.virtual_memory().total / 2**30, 1)},
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
        res = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True,
                             timeout=20, check=False)
        out["rabbitmq"] = res.stdout.strip() or "unknown"
    except Exception:
        out["rabbitmq"] = "unknown"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    specs = SPECS
    if args.only:
        specs = [s for s in specs if s.id in args.only.split(",")]
    if args.skip:
        specs = [s for s in specs if s.id not in args.skip.split(",")]
    LOGS.mkdir(parents=True, exist_ok=True)
    for f in LOGS.glob("*.log"):
        f.unlink()
    atexit.register(end_all)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(130))
    t0 = time.monotonic()
    data = {"meta": meta(plan), "contestants": run_all(specs, plan)}
    data["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    from report import write_outputs

    write_outputs(data, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
