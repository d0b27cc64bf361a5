"""Small workflows for throughput and race tests: every step body logs an effect."""

from __future__ import annotations

import pgflow
from tests.support.workflows.effects import record


@pgflow.step
def first(run_id: str, n: int) -> int:
    record(run_id, "first")
    return n + 1


@pgflow.step
def second(run_id: str, n: int) -> int:
    record(run_id, "second")
    return n * 2


@pgflow.workflow(name="two_steps")
def two_steps(ctx: pgflow.Context, n: int) -> int:
    run_id = str(ctx.workflow_id)
    return second(run_id, first(run_id, n))
