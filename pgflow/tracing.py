"""OpenTelemetry: one trace from ``pgflow.start()`` to every step a worker runs (extra ``pgflow[otel]``).

``pgflow.start`` records the W3C ``traceparent`` of the span current in the
caller (``runs.traceparent``; inside the caller's transaction like the rest
of the run). The worker then makes, in that trace, a span
``pgflow.run <workflow>`` for each execution of the run (a crash or a durable
wait ends one, the next claim opens another) and, under it, a span
``pgflow.step <step>`` for each step it runs live. Replayed steps make none:
they ran in an earlier execution, whose span they are in. Children and map
items inherit their parent's ``traceparent`` (SQL) and so continue its trace.

Only the OpenTelemetry *API* is used, and only when it is installed; spans
record when the application has configured a tracer provider (the SDK, an
exporter). Without the API, or without a provider, everything here is a
cheap no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:  # the API alone; the SDK and exporters are the application's choice
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
    )
except ImportError:  # pragma: no cover - exercised by the no-extra install
    trace = None  # type: ignore[assignment]

TRACER_NAME = "pgflow"


def available() -> bool:
    """Whether the OpenTelemetry API is installed."""
    return trace is not None


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the caller's current span, or None (no valid span)."""
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _parent(traceparent: str | None) -> Any:
    """The OpenTelemetry context a run's spans start in: its recorded trace, else a new one."""
    if not traceparent:
        return None
    try:
        _version, trace_id, span_id, flags = traceparent.split("-")
        parent = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                             trace_flags=TraceFlags(int(flags, 16)))
    except ValueError:
        return None  # checked when the run started; never trust stored text blindly
    if not parent.is_valid:
        return None
    return trace.set_span_in_context(NonRecordingSpan(parent))


_cached: tuple[Any, Any] | None = None  # (provider, its pgflow tracer)


def _tracer() -> Any:
    """pgflow's tracer, or None when no tracer provider is configured (the API's
    default records nothing). One tracer a provider: asking the SDK for one
    costs more than a span."""
    global _cached
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    if _cached is None or _cached[0] is not provider:
        _cached = (provider, provider.get_tracer(TRACER_NAME))
    return _cached[1]


class RunSpans:
    """The spans of one execution of a run; every method is a no-op when not tracing."""

    def __init__(self, run_id: Any, workflow: str, version: str,
                 traceparent: str | None) -> None:
        self._span: Any = None
        self._tracer = None if trace is None else _tracer()
        if self._tracer is None:
            return
        self._span = self._tracer.start_span(
            f"pgflow.run {workflow}", context=_parent(traceparent), kind=SpanKind.CONSUMER,
            attributes={"pgflow.run_id": str(run_id), "pgflow.workflow": workflow,
                        "pgflow.version": version})
        self._attributes = {"pgflow.run_id": str(run_id), "pgflow.workflow": workflow,
                            "pgflow.version": version}

    @property
    def active(self) -> bool:
        return self._span is not None

    @contextlib.contextmanager
    def step(self, name: str, seq: int, attempt: int) -> Iterator[StepSpan]:
        """A span for a live step, current (attached) in this thread or task meanwhile."""
        if self._span is None:
            yield _NO_STEP
            return
        span = self._tracer.start_span(
            f"pgflow.step {name}", context=trace.set_span_in_context(self._span),
            attributes={**self._attributes, "pgflow.step": name, "pgflow.seq": seq,
                        "pgflow.attempt": attempt})
        token = otel_context.attach(trace.set_span_in_context(span))
        step = StepSpan(span)
        try:
            yield step
        finally:
            otel_context.detach(token)
            span.end()

    def end(self, outcome: str, error: BaseException | None = None) -> None:
        """End the run's span: ``completed``, ``failed``, ``suspended``, ``cancelled``, ..."""
        if self._span is None:
            return
        _record(self._span, outcome, error)
        self._span.end()
        self._span = None


class StepSpan:
    """A live step's span: its outcome and, when it failed, the exception."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def ended(self, outcome: str, error: BaseException | None = None) -> None:
        if self._span is not None:
            _record(self._span, outcome, error)


_NO_STEP = StepSpan(None)


def _record(span: Any, outcome: str, error: BaseException | None) -> None:
    """The outcome on ``span``; a failure as an exception event and an error status."""
    span.set_attribute("pgflow.outcome", outcome)
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
