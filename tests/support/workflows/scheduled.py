"""Workflows started by schedules: for the schedule tests (tests/*/test_schedule*.py)."""

from __future__ import annotations

import pgflow
from tests.support.workflows.effects import record


def _tick(ctx: pgflow.Context) -> str:
    return ctx.scheduled_time.isoformat() if ctx.scheduled_time else "none"


@pgflow.step
def note_tick(run_id: str, label: str) -> None:
    record(run_id, f"tick:{label}")


@pgflow.workflow(name="report_tick")
def report_tick(ctx: pgflow.Context, label: str) -> str:
    """Logs one execution if a schedule started it, and returns the tick's time."""
    if ctx.scheduled_time is not None:  # a branch replay must take the same way
        note_tick(str(ctx.workflow_id), label)
    return _tick(ctx)


@pgflow.workflow(name="held_tick")
def held_tick(ctx: pgflow.Context, label: str) -> str:
    """Outlives any interval: runs until the test sends it signal "finish"."""
    ctx.wait_for_signal("finish")
    return _tick(ctx)
