"""Prometheus metrics of a real ``aioqueue worker --metrics-port`` subprocess, Redis and AMQP.

The test scrapes ``/metrics`` over HTTP and reads it with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import REDIS_URL, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families
from workers import WorkerSet, worker_env

from aioqueue import App, ConfigurationError, TaskNotRegistered

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def scrape(port: int) -> Samples:
    text = await asyncio.to_thread(_scrape, port)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_a_cli_worker_serves_its_metrics(
    client: App, broker_url: str, key_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    env = worker_env(
        broker_url, key_prefix, result_backend=REDIS_URL, worker_metrics_interval="0.05"
    )
    workers = WorkerSet(env, tmp_path)
    try:
        await workers.start(
            *("--metrics-port", str(port), "--metrics-addr", "127.0.0.1"),
            *("-c", "1", "--processes", "1"),
            app_path="metrics_app:app",
        )
        ok = [await client.send_task("metrics_app.ok", [n]) for n in range(3)]
        boom = await client.send_task("metrics_app.boom")
        flaky = await client.send_task("metrics_app.flaky")
        square = await client.send_task("metrics_app.square", [4])
        missing = await client.send_task("metrics_app.missing")
        assert [await r.get(timeout=15) for r in ok] == [0, 1, 2]
        with pytest.raises(ValueError, match="boom"):
            await boom.get(timeout=15)
        assert await flaky.get(timeout=15) == "done"
        assert await square.get(timeout=15) == 16
        with pytest.raises(TaskNotRegistered):
            await missing.get(timeout=15)

        samples = await scrape(port)
        tasks = "aioqueue_tasks_total"
        assert value(samples, tasks, task="metrics_app.ok", outcome="success") == 3
        assert value(samples, tasks, task="metrics_app.boom", outcome="failure") == 1
        assert value(samples, tasks, task="metrics_app.flaky", outcome="retry") == 1
        assert value(samples, tasks, task="metrics_app.flaky", outcome="success") == 1
        assert value(samples, tasks, task="metrics_app.square", outcome="success") == 1
        assert value(samples, "aioqueue_task_retries_total", task="metrics_app.flaky") == 1
        runtime = "aioqueue_task_runtime_seconds_count"
        assert value(samples, runtime, task="metrics_app.ok") == 3
        assert value(samples, runtime, task="metrics_app.flaky") == 2
        assert value(samples, runtime, task="metrics_app.square") == 1  # ran in the child
        # seven runs waited in the queue (the unknown task never ran)
        assert value(samples, "aioqueue_task_queue_wait_seconds_count", queue="default") == 7
        wait_sum = value(samples, "aioqueue_task_queue_wait_seconds_sum", queue="default")
        assert wait_sum is not None and 0 < wait_sum < 60
        assert value(samples, "aioqueue_dead_letters_total", queue="default") == 1
        assert value(samples, "aioqueue_worker_process_children") == 1
        assert value(samples, "aioqueue_worker_slots") == 1

        async def sampled(**expected: float) -> bool:
            now = await scrape(port)
            return all(value(now, name, queue="default") == v for name, v in expected.items())

        await wait_until(lambda: sampled(aioqueue_queue_dead_letters=1), timeout=10)

        # one gated task holds the only slot: the next three wait in the queue
        opened = tmp_path / "open"
        gated = await client.send_task("metrics_app.gate", [str(opened)])

        async def busy() -> bool:
            now = await scrape(port)
            return (
                value(now, "aioqueue_worker_tasks_in_flight") == 1
                and value(now, "aioqueue_worker_slots_free") == 0
            )

        await wait_until(busy, timeout=10)
        waiting = [await client.send_task("metrics_app.ok", [n]) for n in range(3)]
        await wait_until(lambda: sampled(aioqueue_queue_depth=3), timeout=10)
        opened.touch()
        assert await gated.get(timeout=15) == "opened"
        assert [await r.get(timeout=15) for r in waiting] == [0, 1, 2]
        await wait_until(lambda: sampled(aioqueue_queue_depth=0), timeout=10)
        samples = await scrape(port)
        assert value(samples, tasks, task="metrics_app.ok", outcome="success") == 6
        assert value(samples, "aioqueue_worker_tasks_in_flight") == 0
        assert value(samples, "aioqueue_worker_slots_free") == 1
    finally:
        await workers.close()


def test_a_bad_metrics_port_is_refused_before_connecting() -> None:
    app = App("ports", broker="memory://")
    with pytest.raises(ConfigurationError, match="metrics port"):
        app.worker(metrics_port=70000)
    with pytest.raises(ConfigurationError, match="worker_metrics_interval"):
        App("interval", broker="memory://", worker_metrics_interval=0).worker(metrics_port=0)


async def test_a_port_in_use_is_a_clear_error() -> None:
    app = App("busy", broker="memory://")

    @app.task
    async def noop() -> None:
        return None

    port = free_port()
    async with app.worker(metrics_port=port, metrics_addr="127.0.0.1") as first:
        assert first.metrics is not None and first.metrics.port == port
        second = app.worker(metrics_port=port, metrics_addr="127.0.0.1")
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await second.run()
    await app.close()


def test_a_worker_runs_without_prometheus_client_or_opentelemetry() -> None:
    """As if neither were installed (a None in sys.modules makes an import fail); a worker not
    asked for metrics does not import aioqueue.metrics; asking for either says what to install."""
    code = (
        "import sys, asyncio\n"
        "for name in ('prometheus_client', 'opentelemetry'):\n"
        "    sys.modules[name] = None\n"
        "import aioqueue\n"
        "app = aioqueue.App('plain', broker='memory://')\n"
        "@app.task\n"
        "async def f(): return 1\n"
        "async def main():\n"
        "    async with app.worker():\n"
        "        assert await (await f.send()).get(timeout=5) == 1\n"
        "asyncio.run(main())\n"
        "assert 'aioqueue.metrics' not in sys.modules\n"
        "for ask, extra in ((lambda: app.worker(metrics_port=0), 'metrics'),\n"
        "                   (aioqueue.Tracing, 'otel')):\n"
        "    try:\n"
        "        ask()\n"
        "    except aioqueue.ConfigurationError as exc:\n"
        "        assert f\"pip install 'aioqueue[{extra}]'\" in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError(extra)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_the_metrics_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOQUEUE_WORKER_METRICS_PORT", "9808")
    monkeypatch.setenv("AIOQUEUE_WORKER_METRICS_INTERVAL", "2.5")
    conf = App("env", broker="memory://").conf
    assert (conf.worker_metrics_port, conf.worker_metrics_interval) == (9808, 2.5)
    monkeypatch.setenv("AIOQUEUE_WORKER_METRICS_PORT", "")
    assert App("unset", broker="memory://").conf.worker_metrics_port is None


def test_the_cli_refuses_a_bad_metrics_port(tmp_path: Path) -> None:
    env = worker_env("memory://", "unused", result_backend="memory://")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "aioqueue.cli",
            "worker",
            "metrics_app:app",
            "--metrics-port",
            "1e6",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2  # argparse: not a whole number
    assert "--metrics-port: invalid int value: '1e6'" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "aioqueue.cli", "worker", "metrics_app:app", "--metrics-port=70000"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "metrics port must be a whole number 0-65535, not 70000" in done.stderr


def test_histogram_buckets_follow_prometheus_le_semantics() -> None:
    from prometheus_client import generate_latest

    app = App("buckets", broker="memory://")
    metrics = app.worker(metrics_port=0).metrics
    assert metrics is not None
    for seconds in (0.005, 0.0051, 1.0, 5000.0):  # on a bound, just above one, past the last
        metrics.runtime.observe("t", seconds)
    text = generate_latest(metrics.registry).decode()
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == "aioqueue_task_runtime_seconds"
    ]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert (buckets["0.005"], buckets["0.01"], buckets["1.0"], buckets["1800.0"]) == (1, 2, 3, 3)
    assert buckets["+Inf"] == 4
    totals = {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")}
    assert totals["aioqueue_task_runtime_seconds_count"] == 4
    assert totals["aioqueue_task_runtime_seconds_sum"] == pytest.approx(5001.0101)
