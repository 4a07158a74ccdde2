"""Workflows side by side with Celery: ``python benchmarks/workflows/run.py [--quick] [--amqp]``.

Run from the repository root after ``make bench`` (or ``bash benchmarks/bench.sh``) built
``benchmarks/.venvs/aioqueue`` (this checkout with uvloop) and ``benchmarks/.venvs/celery``. Each
side starts its library's own worker CLI (one process: aioqueue ``--concurrency 200`` on uvloop,
Celery ``-P solo`` with prefetch 64, as in the main benchmark; both log one line per task at
INFO), measures, prints one RESULT line and cleans up: Redis
db 14 under keys of its own run only, its own RabbitMQ queue.

Workloads: a chain of 10 no-op steps, sent and awaited one after another (end-to-end latency,
p50 and p99 over 100 chains; 20 with --quick); a group of 10,000 no-op tasks (2,000 with
--quick): time for ``send()`` to return (enqueue) and until every result is in, next to the
pipelined floor of the main benchmark (``floor-redis-batch``: raw redis.asyncio building a JSON
body and a waiter per task, LPUSHed 100 per round trip); a chord
of 1,000 no-op members: time from send to the callback's result. Medians of 3 repetitions (1
with --quick).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SIDES = {
    # the main benchmark's venv of aioqueue: this checkout, editable, with uvloop (the loop
    # SETTINGS.md gives every asyncio worker and client); the project's own venv has no uvloop
    "aioqueue": (
        os.path.join(REPO, "benchmarks", ".venvs", "aioqueue", "bin", "python"),
        "wf_aioqueue.py",
    ),
    "celery": (
        os.path.join(REPO, "benchmarks", ".venvs", "celery", "bin", "python"),
        "wf_celery.py",
    ),
}


def run_side(library: str, broker: str, quick: bool) -> dict[str, object] | str:
    python, script = SIDES[library]
    if not os.path.exists(python):
        return f"no venv at {python}"
    done = subprocess.run(
        [python, os.path.join(HERE, script), broker],
        cwd=HERE,
        env={**os.environ, "BENCH_QUICK": "1" if quick else "0", "PYTHONPATH": HERE},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    return f"failed ({done.returncode}): {done.stderr[-1500:]}"


def table(rows: dict[str, dict[str, object]], broker: str) -> str:
    ours, peer = rows.get(f"aioqueue-{broker}"), rows.get(f"celery-{broker}")
    names = [
        ("chain of 10, p50 (ms)", "chain_p50_ms"),
        ("chain of 10, p99 (ms)", "chain_p99_ms"),
        ("group: enqueue (ms)", "group_enqueue_ms"),
        ("group: all results (ms)", "group_all_results_ms"),
        ("chord of 1,000: send to callback done (ms)", "chord_ms"),
    ]
    lines = [
        f"{'workload (' + broker + ')':<46}{'aioqueue':>12}{'celery':>12}{'celery/aioqueue':>18}"
    ]
    for label, key in names:
        a = float(ours[key]) if ours else float("nan")  # type: ignore[arg-type]
        c = float(peer[key]) if peer else float("nan")  # type: ignore[arg-type]
        lines.append(f"{label:<46}{a:>12.1f}{c:>12.1f}{c / a:>17.1f}x")
    if ours and broker == "redis":
        floor, enq = float(ours["group_floor_ms"]), float(ours["group_enqueue_ms"])  # type: ignore[arg-type]
        lines.append(
            f"group enqueue vs pipelined floor ({floor:.1f} ms): {floor / enq:.2f}x of the floor"
        )
    if ours:
        lines.append(f"sizes: {ours['sizes']}")
    return "\n".join(lines)


def main() -> None:
    quick = "--quick" in sys.argv
    brokers = ["redis", "amqp"] if "--amqp" in sys.argv else ["redis"]
    for broker in brokers:
        rows: dict[str, dict[str, object]] = {}
        for library in SIDES:
            got = run_side(library, broker, quick)
            if isinstance(got, str):
                print(f"{library}-{broker}: {got}")
            else:
                rows[str(got["library"])] = got
        print(table(rows, broker))
        print()


if __name__ == "__main__":
    main()
