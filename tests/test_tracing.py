"""OpenTelemetry: a caller's trace goes through send, execute, and a send made by the task.

Spans go to the SDK's in-memory exporter through a provider of the test's own (the global
provider is never set, so tests cannot leak spans into each other).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import AppFactory, running_worker, wait_until
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from aioqueue import App, Context, Message, SerializationError, Tracing, current_context

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["memory", "redis", "amqp-redis", "amqp-rpc"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def traced_app(make_app: AppFactory, provider: TracerProvider) -> App:
    app = make_app("traced", middleware=[Tracing(tracer_provider=provider)])

    @app.task(name="traced.inner")
    async def inner(n: int) -> int:
        return n + 1

    @app.task(name="traced.outer")
    async def outer(n: int) -> str:
        sent = await inner.send(n)
        return sent.id

    @app.task(name="traced.fails")
    async def fails() -> None:
        raise KeyError("nope")

    @app.task(name="traced.flaky", bind=True, max_retries=2)
    async def flaky(ctx: Context) -> int:
        if ctx.retries == 0:
            ctx.retry(countdown=0.01)
        return ctx.retries

    @app.task(name="traced.nests")
    async def nests(n: int) -> int:
        return await (await inner.apply(n)).get() * 10  # apply: run here, inside this run

    @app.task(name="traced.sees", executor="thread")
    def sees() -> str:
        from opentelemetry import trace

        # a thread task runs in its execute span too
        assert current_context() is not None
        return format(trace.get_current_span().get_span_context().span_id, "016x")

    return app


def by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    spans = by_name(exporter, name)
    assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
    return spans[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_from_the_caller_through_a_task_and_the_task_it_sends(
    make_app: AppFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(make_app, provider)
    tracer = provider.get_tracer("test")
    async with app, running_worker(app):
        with tracer.start_as_current_span("request") as request:
            result = await app.send_task("traced.outer", [1])
        assert len(await result.get(timeout=10)) == 32  # the inner task's id

        async def inner_ran() -> bool:  # (rpc:// cannot wait for a result another one sent)
            return bool(by_name(exporter, "execute traced.inner"))

        await wait_until(inner_ran)

    trace_id = request.get_span_context().trace_id
    send_outer = only(exporter, "send traced.outer")
    run_outer = only(exporter, "execute traced.outer")
    send_inner = only(exporter, "send traced.inner")
    run_inner = only(exporter, "execute traced.inner")
    for span in (send_outer, run_outer, send_inner, run_inner):
        assert span.context is not None and span.context.trace_id == trace_id, span.name
    assert parent_of(send_outer) == request.get_span_context().span_id
    assert send_outer.context is not None and run_outer.context is not None
    assert parent_of(run_outer) == send_outer.context.span_id
    assert run_outer.parent is not None and run_outer.parent.is_remote  # read from the headers
    assert parent_of(send_inner) == run_outer.context.span_id
    assert send_inner.context is not None
    assert parent_of(run_inner) == send_inner.context.span_id
    assert send_outer.kind is SpanKind.PRODUCER and run_outer.kind is SpanKind.CONSUMER
    attributes = run_outer.attributes or {}
    assert attributes["aioqueue.outcome"] == "SUCCESS"
    assert attributes["messaging.message.id"] == result.id
    assert attributes["messaging.destination.name"] == "default"


async def test_failures_retries_and_thread_tasks_are_traced(
    make_app: AppFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(make_app, provider)
    async with app, running_worker(app):
        failed = await app.send_task("traced.fails")
        with pytest.raises(KeyError):
            await failed.get(timeout=10)
        flaky = await app.send_task("traced.flaky")
        assert await flaky.get(timeout=10) == 1
        seen = await (await app.send_task("traced.sees")).get(timeout=10)

    run = only(exporter, "execute traced.fails")
    assert run.status.status_code is StatusCode.ERROR
    assert [e.name for e in run.events] == ["exception"]
    # both tries are children of the one send (the retry keeps the headers)
    send = only(exporter, "send traced.flaky")
    tries = by_name(exporter, "execute traced.flaky")
    assert send.context is not None
    assert [parent_of(t) for t in tries] == [send.context.span_id] * 2
    assert sorted((t.attributes or {})["aioqueue.outcome"] for t in tries) == ["RETRY", "SUCCESS"]
    thread_run = only(exporter, "execute traced.sees")
    assert thread_run.context is not None
    assert seen == format(thread_run.context.span_id, "016x")


async def test_a_message_without_trace_headers_starts_a_trace(
    make_app: AppFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(make_app, provider)
    # a worker started inside a span: that span is no parent of the tasks it runs
    with provider.get_tracer("test").start_as_current_span("where the worker started"):
        async with app, running_worker(app):
            # published as it is, with no traceparent (as by a sender without Tracing)
            message = Message(id=uuid.uuid4().hex, task="traced.inner", queue="default", args=(5,))
            broker = await app.ready_broker()
            await broker.publish("default", app.codec.encode(message))

            async def ran() -> bool:
                return bool(by_name(exporter, "execute traced.inner"))

            await wait_until(ran)
    run = only(exporter, "execute traced.inner")
    assert run.parent is None
    assert (run.attributes or {})["aioqueue.outcome"] == "SUCCESS"


async def test_apply_runs_in_the_callers_trace(
    make_app: AppFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(make_app, provider)
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        result = await app.tasks["traced.inner"].apply(1)
    assert await result.get() == 2
    run = only(exporter, "execute traced.inner")
    assert parent_of(run) == caller.get_span_context().span_id


async def test_a_task_applied_inside_a_task_nests_its_span(
    make_app: AppFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(make_app, provider)
    async with app, running_worker(app):
        assert await (await app.send_task("traced.nests", [1])).get(timeout=10) == 20
    outer = only(exporter, "execute traced.nests")  # ended, though another run nested in it
    nested = only(exporter, "execute traced.inner")
    assert outer.context is not None and parent_of(nested) == outer.context.span_id
    assert (outer.attributes or {})["aioqueue.outcome"] == "SUCCESS"


async def test_the_send_span_covers_the_publish(
    make_app: AppFactory,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The span ends once the broker has the message, not when the headers are written."""
    app = traced_app(make_app, provider)
    async with app:
        broker = await app.ready_broker()
        publish = broker.publish
        published_at: list[int] = []

        async def recorded(*args: Any, **kwargs: Any) -> None:
            await publish(*args, **kwargs)
            published_at.append(time.time_ns())

        monkeypatch.setattr(broker, "publish", recorded)
        await app.send_task("traced.inner", [1])
    send = only(exporter, "send traced.inner")
    assert send.end_time is not None and len(published_at) == 1
    assert send.end_time >= published_at[0]
    assert send.status.status_code is not StatusCode.ERROR


async def test_a_send_that_fails_after_its_span_began_ends_it_in_error(
    make_app: AppFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """An argument that cannot be encoded fails the send after before_send: the span (and,
    in a batch, every span the batch began) ends with ERROR status and the exception."""
    app = traced_app(make_app, provider)
    inner = app.tasks["traced.inner"]
    async with app:
        with pytest.raises(SerializationError):
            await inner.send(object())  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            await inner.send_many([(1,), (object(),)])
    spans = by_name(exporter, "send traced.inner")
    assert len(spans) == 3
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert [e.name for e in span.events] == ["exception"]
