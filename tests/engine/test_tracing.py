"""OpenTelemetry traces from ``pgflow.start()`` into every step, with the SDK's in-memory exporter.

The tracer provider is process-wide and can be set once: this module sets an
SDK provider with an in-memory exporter the first time it needs one and
clears the exporter around each test. Crash and replay with a real worker
process killed mid-run: ``tests/processes/test_tracing.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

import pgflow
from pgflow.testing import advance_time
from tests.support.helpers import wait_for

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


FLAKY_RETRY = pgflow.Retry(max_attempts=3, initial_interval=0.01)
_flaky_calls: dict[str, int] = {}


@pgflow.step
def fetch(order: str) -> str:
    return f"fetched {order}"


@pgflow.step
def charge(order: str) -> str:
    return f"charged {order}"


@pgflow.step(retry=FLAKY_RETRY)
def flaky(order: str) -> str:
    _flaky_calls[order] = _flaky_calls.get(order, 0) + 1
    if _flaky_calls[order] == 1:
        raise ConnectionError("first attempt fails")
    return "ok"


@pgflow.step(retry=pgflow.Retry(max_attempts=1))
def broken(order: str) -> str:
    raise ValueError(f"cannot handle {order}")


@pgflow.workflow(name="traced_two_steps")
def two_steps(ctx: pgflow.Context, order: str) -> str:
    return charge(fetch(order))


@pgflow.workflow(name="traced_flaky")
def flaky_flow(ctx: pgflow.Context, order: str) -> str:
    return flaky(order)


@pgflow.workflow(name="traced_broken")
def broken_flow(ctx: pgflow.Context, order: str) -> str:
    return broken(order)


@pgflow.workflow(name="traced_sleeper")
def sleeper(ctx: pgflow.Context, order: str) -> str:
    fetched = fetch(order)
    ctx.sleep(3600)
    return charge(fetched)


@pgflow.workflow(name="traced_child")
def child(ctx: pgflow.Context, order: str) -> str:
    return charge(order)


@pgflow.workflow(name="traced_parent")
def parent(ctx: pgflow.Context, order: str) -> list[str]:
    first = ctx.call(child, order)
    return [first, *ctx.map(fetch, ["a", "b"])]


def finished(exporter: InMemorySpanExporter, prefix: str = "pgflow.") -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def named(found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


def wait_spans(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    wait_for(lambda: len(named(finished(exporter), name)) >= count, timeout=60,
             what=f"{count} span(s) {name!r}")
    return named(finished(exporter), name)


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_a_run_started_inside_a_span_continues_its_trace(conn, spans, inprocess_worker):
    inprocess_worker.start([two_steps])
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("POST /orders") as request:
        run_id = pgflow.start(conn, two_steps, "o-1")
    assert pgflow.result(conn, run_id, timeout=60) == "charged fetched o-1"

    [run] = wait_spans(spans, "pgflow.run traced_two_steps", 1)
    steps = named(finished(spans), "pgflow.step fetch") + named(finished(spans), "pgflow.step charge")
    assert [s.name for s in steps] == ["pgflow.step fetch", "pgflow.step charge"]
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in [run, *steps]} == {trace_id}
    assert run.parent is not None and run.parent.span_id == request.get_span_context().span_id
    for step in steps:
        assert step.parent is not None and step.parent.span_id == run.context.span_id
        assert run.start_time <= step.start_time <= step.end_time <= run.end_time
    assert attributes(run) == {"pgflow.run_id": str(run_id), "pgflow.workflow": "traced_two_steps",
                               "pgflow.version": two_steps.version,
                               "pgflow.outcome": "completed"}
    assert attributes(steps[0])["pgflow.step"] == "fetch"
    assert attributes(steps[0])["pgflow.attempt"] == 1
    assert attributes(steps[0])["pgflow.run_id"] == str(run_id)
    assert conn.execute("select traceparent from pgflow.runs where id = %s", (run_id,)
                        ).fetchone()[0].split("-")[1] == f"{trace_id:032x}"


def test_a_run_started_outside_any_span_begins_a_trace_of_its_own(conn, spans,
                                                                 inprocess_worker):
    inprocess_worker.start([two_steps])
    run_id = pgflow.start(conn, two_steps, "o-2")
    pgflow.result(conn, run_id, timeout=60)
    [run] = wait_spans(spans, "pgflow.run traced_two_steps", 1)
    assert run.parent is None
    assert conn.execute("select traceparent from pgflow.runs where id = %s", (run_id,)
                        ).fetchone()[0] is None


def test_a_retried_step_has_one_span_an_attempt_and_the_failure_is_recorded(
        conn, spans, inprocess_worker):
    inprocess_worker.start([flaky_flow, broken_flow])
    ok_run = pgflow.start(conn, flaky_flow, "o-3")
    bad_run = pgflow.start(conn, broken_flow, "o-4")
    assert pgflow.result(conn, ok_run, timeout=60) == "ok"
    with pytest.raises(pgflow.WorkflowFailed):
        pgflow.result(conn, bad_run, timeout=60)

    attempts = sorted(wait_spans(spans, "pgflow.step flaky", 2),
                      key=lambda s: attributes(s)["pgflow.attempt"])
    assert [attributes(s)["pgflow.attempt"] for s in attempts] == [1, 2]
    assert attributes(attempts[0])["pgflow.outcome"] == "retrying"
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in attempts[0].events
            if e.name == "exception"] == ["ConnectionError"]
    assert attributes(attempts[1])["pgflow.outcome"] == "completed"
    assert attempts[1].status.status_code is not StatusCode.ERROR
    # Each attempt is its own execution of the run (a retry waits as a timer).
    assert len({s.parent.span_id for s in attempts if s.parent}) == 2

    [failed_step] = wait_spans(spans, "pgflow.step broken", 1)
    assert attributes(failed_step)["pgflow.outcome"] == "failed"
    [failed_run] = wait_spans(spans, "pgflow.run traced_broken", 1)
    assert failed_run.status.status_code is StatusCode.ERROR
    assert attributes(failed_run)["pgflow.outcome"] == "failed"


def test_a_replay_makes_no_span_for_a_step_already_checkpointed(conn, spans, inprocess_worker):
    inprocess_worker.start([sleeper])
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("enqueue") as root:
        run_id = pgflow.start(conn, sleeper, "o-5")
    wait_for(lambda: conn.execute("select status from pgflow.runs where id = %s", (run_id,)
                                  ).fetchone()[0] == "sleeping", timeout=60, what="asleep")
    [first] = wait_spans(spans, "pgflow.run traced_sleeper", 1)
    assert attributes(first)["pgflow.outcome"] == "suspended"
    try:
        advance_time(conn, 3601)
        assert pgflow.result(conn, run_id, timeout=60) == "charged fetched o-5"
    finally:
        conn.execute("select pgflow.reset_time()")
    executions = wait_spans(spans, "pgflow.run traced_sleeper", 2)
    time.sleep(0.1)  # any late span would be exported by now: there must be none
    found = finished(spans)
    assert len(named(found, "pgflow.step fetch")) == 1  # ran once; replayed without a span
    assert len(named(found, "pgflow.step charge")) == 1
    assert {s.context.trace_id for s in found} == {root.get_span_context().trace_id}
    [fetch_span] = named(found, "pgflow.step fetch")
    [charge_span] = named(found, "pgflow.step charge")
    by_id = {s.context.span_id: s for s in executions}
    assert attributes(by_id[fetch_span.parent.span_id])["pgflow.outcome"] == "suspended"
    assert attributes(by_id[charge_span.parent.span_id])["pgflow.outcome"] == "completed"


def test_children_and_map_items_continue_the_parents_trace(conn, spans, inprocess_worker):
    inprocess_worker.start([parent, child])
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("enqueue") as root:
        run_id = pgflow.start(conn, parent, "o-6")
    assert pgflow.result(conn, run_id, timeout=60) == ["charged o-6", "fetched a", "fetched b"]
    wait_spans(spans, "pgflow.run traced_child", 1)
    wait_spans(spans, "pgflow.step fetch", 2)
    found = finished(spans)
    assert {s.context.trace_id for s in found} == {root.get_span_context().trace_id}
    assert named(found, "pgflow.step charge")  # the child's step
    items = [s for s in found if s.name.startswith("pgflow.run pgflow.map:")]
    assert len(items) == 2, [s.name for s in found]
