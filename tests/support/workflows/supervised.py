"""Workflows for the supervisor tests: three steps of 0.2 s each, every execution logged."""

from __future__ import annotations

import time

import pgflow
from tests.support.workflows.effects import record

STEP_SECONDS = 0.2


@pgflow.step
def slow_step(run_id: str, index: int) -> int:
    record(run_id, f"step {index}")
    time.sleep(STEP_SECONDS)
    return index


@pgflow.workflow(name="three_slow_steps")
def three_slow_steps(ctx: pgflow.Context) -> list[int]:
    run_id = str(ctx.workflow_id)
    return [slow_step(run_id, i) for i in range(3)]
