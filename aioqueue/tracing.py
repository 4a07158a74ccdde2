"""OpenTelemetry tracing: a span for each send and each run, one trace from caller to task.

::

    from aioqueue.tracing import Tracing

    app = App("proj", broker="redis://localhost", middleware=[Tracing()])

``Tracing`` is a :class:`~aioqueue.Middleware` (the seam for tracing, see :mod:`aioqueue.hooks`):

* ``before_send`` starts a ``send <task>`` span (kind PRODUCER) as a child of whatever span is
  current where ``send`` is called (a FastAPI request's, say), and writes that span's context
  into the message headers with the globally configured propagator (W3C ``traceparent`` and
  ``tracestate`` by default). ``after_send`` ends it once the publish is over, so the span
  covers the publish (a slow broker shows in it) and a failed one has ERROR status with the
  exception recorded.
* ``before_execute`` starts an ``execute <task>`` span (kind CONSUMER) whose parent is the
  context read back from the headers, and makes it the current span for the run, so spans the
  task makes, and the sends it makes (the next steps of a workflow), are its children. A retry
  keeps the headers, so every try of a task is a child of the one send.
* ``after_execute`` records the outcome (``aioqueue.outcome``; ERROR status on FAILURE) and
  ends the span.

Only ``opentelemetry-api`` is needed (the ``otel`` extra); without an SDK configured its tracer
does nothing. An app without ``Tracing`` never imports OpenTelemetry and pays nothing.

A process-pool task's own code runs in a child that does not get the span: what it sends starts
from the context of the worker's loop, not from its execute span.
"""

from __future__ import annotations

import contextvars
from dataclasses import replace
from typing import TYPE_CHECKING

from .errors import ConfigurationError
from .hooks import Middleware
from .message import States

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, TracerProvider

    from .context import Context
    from .message import Message, Outcome

__all__ = ["Tracing"]

_MAX_OPEN_SENDS = 10_000

_running: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "aioqueue_tracing_span", default=None
)
"""The execute span and its context token, in the run's own asyncio task (so nothing to clean
up when a run ends without after_execute, as a terminated one does)."""


class _Run:
    """One open execute span, its context token and the run it is nested in (a task that
    calls another task's ``apply``), restored when it ends."""

    __slots__ = ("outer", "span", "token")

    def __init__(self, span: Span, token: contextvars.Token[OtelContext], outer: _Run | None):
        self.span = span
        self.token = token
        self.outer = outer


class Tracing(Middleware):
    """Spans for sends and runs, with the trace context carried in the message headers.

    ``tracer_provider``: the provider to take the tracer from (default: the global one, as set
    by ``opentelemetry.trace.set_tracer_provider``). ``propagator``: how the context is written
    to and read from the headers (default: the global one, W3C trace context and baggage).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        try:
            from opentelemetry import context, propagate, trace
        except ImportError as exc:
            raise ConfigurationError(
                "Tracing needs opentelemetry-api: pip install 'aioqueue[otel]'"
            ) from exc
        from . import __version__

        self._trace = trace
        self._context = context
        self._tracer = trace.get_tracer("aioqueue", __version__, tracer_provider=tracer_provider)
        self._propagator = propagator or propagate.get_global_textmap()
        self._sending: dict[str, Span] = {}  # send spans by message id, until after_send
        self._producer = trace.SpanKind.PRODUCER
        self._consumer = trace.SpanKind.CONSUMER

    def before_send(self, message: Message) -> Message:
        span = self._tracer.start_span(
            f"send {message.task}",
            kind=self._producer,
            attributes={
                "messaging.system": "aioqueue",
                "messaging.operation.type": "send",
                "messaging.destination.name": message.queue,
                "messaging.message.id": message.id,
                "aioqueue.task": message.task,
            },
        )
        headers = dict(message.headers)  # never the sender's own dict (a shared options one)
        self._propagator.inject(headers, context=self._trace.set_span_in_context(span))
        earlier = self._sending.pop(message.id, None)
        if earlier is not None:  # one id twice in a batch: it is sent once
            earlier.end()
        elif len(self._sending) >= _MAX_OPEN_SENDS:  # an after_send that never came (a hook
            self._sending.pop(next(iter(self._sending))).end()  # before this one broke)
        self._sending[message.id] = span
        return replace(message, headers=headers)

    def after_send(self, message: Message, error: BaseException | None) -> None:
        span = self._sending.pop(message.id, None)
        if span is None:
            return
        if error is not None:
            span.record_exception(error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)))
        span.end()

    def before_execute(self, ctx: Context) -> None:
        # On a worker the parent is what the headers say, and nothing else (not whatever span
        # was current where the worker started); under Task.apply it is the caller's span.
        parent = None if ctx.is_eager else self._propagator.extract(ctx.headers)
        span = self._tracer.start_span(
            f"execute {ctx.name}",
            context=parent,
            kind=self._consumer,
            attributes={
                "messaging.system": "aioqueue",
                "messaging.operation.type": "process",
                "messaging.destination.name": ctx.queue,
                "messaging.message.id": ctx.id,
                "aioqueue.task": ctx.name,
                "aioqueue.attempt": ctx.attempt,
                "aioqueue.retries": ctx.retries,
            },
        )
        token = self._context.attach(self._trace.set_span_in_context(span))
        _running.set(_Run(span, token, _running.get()))

    def on_error(self, ctx: Context, exc: BaseException) -> None:
        found = _running.get()
        if found is not None:
            found.span.record_exception(exc)

    def after_execute(self, ctx: Context, outcome: Outcome) -> None:
        found = _running.get()
        if found is None:
            return
        span, token = found.span, found.token
        _running.set(found.outer)
        span.set_attribute("aioqueue.outcome", outcome.state)
        if outcome.state == States.FAILURE:
            status = self._trace.Status(self._trace.StatusCode.ERROR, outcome.exc_type)
            span.set_status(status)
        span.end()
        self._context.detach(token)

    def __repr__(self) -> str:
        return f"<Tracing tracer={self._tracer!r}>"
