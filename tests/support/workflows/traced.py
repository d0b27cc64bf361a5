"""A workflow for the tracing crash test: spans go to a JSON-lines file, one line a span.

Importing this module in a worker process configures the OpenTelemetry SDK
(as an application would) with an exporter that appends each ended span to
the file named by ``PGFLOW_TEST_SPANS`` and flushes it at once, so that the
spans of a worker killed with SIGKILL are on disk up to its last ended span.
The second step waits until the file named by ``PGFLOW_TEST_GATE`` exists:
the test kills the worker while it waits.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import pgflow

SPANS_ENV = "PGFLOW_TEST_SPANS"
GATE_ENV = "PGFLOW_TEST_GATE"


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self._path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self._path, "a", encoding="utf-8") as out:
            for span in spans:
                parent = span.parent.span_id if span.parent else None
                out.write(json.dumps({
                    "name": span.name, "trace_id": f"{span.context.trace_id:032x}",
                    "span_id": f"{span.context.span_id:016x}",
                    "parent_id": None if parent is None else f"{parent:016x}",
                    "pid": os.getpid(), "attributes": dict(span.attributes or {})}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        return SpanExportResult.SUCCESS


if os.environ.get(SPANS_ENV):
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ[SPANS_ENV])))
    trace.set_tracer_provider(_provider)


@pgflow.step
def reserve(order: str) -> str:
    return f"reserved {order}"


@pgflow.step
def ship(reserved: str) -> str:
    gate = Path(os.environ[GATE_ENV])
    while not gate.exists():  # the first worker is killed here
        time.sleep(0.05)
    return f"shipped ({reserved})"


@pgflow.workflow(name="traced_shipping")
def shipping(ctx: pgflow.Context, order: str) -> str:
    return ship(reserve(order))
