"""Metrics and traces: ``python examples/observability.py`` (needs the metrics and otel extras
plus opentelemetry-sdk; memory:// unless AIOQUEUE_BROKER_URL is set).

A request span is open while ``checkout`` is sent; the task sends ``receipt``; the four spans
(send, execute, send, execute) print as one trace. The worker serves Prometheus metrics on a
port the system picks, and the script scrapes its own worker.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aioqueue import App, Tracing

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # what an app does once at start-up (or OTel's auto-setup)

app = App(
    "shop",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "memory://"),
    middleware=[Tracing()],  # the global tracer provider and W3C propagator
)


@app.task
async def receipt(order: str) -> str:
    return f"receipt for {order}"


@app.task
async def checkout(order: str) -> str:
    sent = await receipt.send(order)  # a child of this task's execute span
    return sent.id


def scrape(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return [line for line in text.splitlines() if line.startswith("aioqueue_tasks_total")]


async def main() -> None:
    async with app, app.worker(metrics_port=0, metrics_addr="127.0.0.1") as worker:
        with trace.get_tracer("shop.web").start_as_current_span("POST /checkout"):
            result = await checkout.send("order-1")
        receipt_id = await result.get(timeout=10)
        print(await app.AsyncResult(receipt_id).get(timeout=10))
        assert worker.metrics is not None and worker.metrics.port is not None
        for line in sorted(await asyncio.to_thread(scrape, worker.metrics.port)):
            print(line)
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    for span in spans:
        assert span.context is not None
        parent = span.parent.span_id if span.parent else None
        print(
            f"trace {span.context.trace_id:032x} span {span.context.span_id:016x} "
            f"parent {parent or 0:016x} {span.name}"
        )


if __name__ == "__main__":
    asyncio.run(main())
