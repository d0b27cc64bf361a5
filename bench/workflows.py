"""Workflows the benchmark runs: trivial steps, so the numbers are pgflow's own overhead.

Loaded by the worker subprocess (``python -m pgflow worker bench.workflows``)
and by the producers, which start runs with the decorated functions (so
``pgflow.start`` needs no lookup of a registered version).
"""

from __future__ import annotations

import os
import time

import pgflow

if os.environ.get("PGFLOW_BENCH_TRACING") == "1":  # see bench/harness.py: WORKER_TRACING
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class _Dropped(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    _provider = TracerProvider()
    _provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    trace.set_tracer_provider(_provider)

TEN = 10  # steps of ten_steps; bench.run computes steps/s from it


@pgflow.step
def bump(n: int) -> int:
    """The trivial step: a small int in, a small int out."""
    return n + 1


@pgflow.workflow(name="one_step")
def one_step(ctx: pgflow.Context, n: int) -> int:
    return bump(n)


@pgflow.step(transactional=True)
def bump_in_transaction(conn: object, n: int) -> int:
    """bump as a transactional step: the same nothing, in its checkpoint's own transaction."""
    return n + 1


@pgflow.workflow(name="one_tx_step")
def one_tx_step(ctx: pgflow.Context, n: int) -> int:
    return bump_in_transaction(n)


@pgflow.workflow(name="ten_steps")
def ten_steps(ctx: pgflow.Context, n: int) -> int:
    for _ in range(TEN):
        n = bump(n)
    return n


@pgflow.step
def stamp() -> float:
    """Wall-clock time at which the step body starts (for the wake-latency workload)."""
    return time.time()


@pgflow.workflow(name="wake_probe")
def wake_probe(ctx: pgflow.Context) -> float:
    return stamp()


SLEEP_S = 2.0  # sleeper's default sleep (W4); W4b passes its own


@pgflow.workflow(name="sleeper")
def sleeper(ctx: pgflow.Context, n: int, seconds: float = SLEEP_S) -> int:
    """A durable sleep, then one trivial step (the timer workloads W4, W4b)."""
    ctx.sleep(seconds)
    return bump(n)


@pgflow.step
async def async_bump(n: int) -> int:
    """``bump`` as a coroutine: runs on the worker's event loop, no thread."""
    return n + 1


@pgflow.workflow(name="async_sleeper")
async def async_sleeper(ctx: pgflow.Context, n: int, seconds: float = SLEEP_S) -> int:
    """``sleeper`` written with ``async def`` (W4a): replay needs no thread either."""
    await ctx.sleep(seconds)
    return await async_bump(n)


@pgflow.step
async def async_stamp() -> float:
    """stamp, ``async def``: no thread between the claim and the step (W3a)."""
    return time.time()


@pgflow.workflow(name="async_wake_probe")
async def async_wake_probe(ctx: pgflow.Context) -> float:
    return await async_stamp()
