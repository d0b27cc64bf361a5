"""Workflows started by schedules: for the schedule tests (tests/*/test_schedules*.py)."""

from __future__ import annotations

from datetime import timedelta

import pgflow
from tests.support.workflows.effects import record


@pgflow.step
def note_tick(run_id: str, label: str, scheduled: str) -> str:
    record(run_id, f"tick:{label}")
    return scheduled


@pgflow.workflow(name="report_tick")
def report_tick(ctx: pgflow.Context, label: str) -> str:
    """Records the tick's time (ctx.scheduled_time) once, and returns it."""
    scheduled = ctx.scheduled_time.isoformat() if ctx.scheduled_time else "none"
    return note_tick(str(ctx.workflow_id), label, scheduled)


@pgflow.workflow(name="long_tick")
def long_tick(ctx: pgflow.Context, label: str, hours: float = 1.5) -> str:
    """Outlives an hourly schedule's interval: sleeps `hours` of engine time."""
    ctx.sleep(timedelta(hours=hours))
    scheduled = ctx.scheduled_time.isoformat() if ctx.scheduled_time else "none"
    return note_tick(str(ctx.workflow_id), label, scheduled)
