"""Runs that sleep, then do one step: for the scheduler's process-level tests."""

from __future__ import annotations

import pgflow
from tests.support.workflows.effects import record


@pgflow.step
def wake_up(run_id: str) -> str:
    record(run_id, "wake_up")
    return "awake"


@pgflow.workflow(name="nap")
def nap(ctx: pgflow.Context, seconds: float) -> str:
    ctx.sleep(seconds)
    return wake_up(str(ctx.workflow_id))


@pgflow.step
def nothing() -> int:
    return 1


@pgflow.workflow(name="quiet_nap")
def quiet_nap(ctx: pgflow.Context, seconds: float) -> int:
    """No side-effect log: for thousands of runs, where the journal is the proof."""
    ctx.sleep(seconds)
    return nothing()
