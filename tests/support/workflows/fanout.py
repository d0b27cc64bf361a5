"""Fan-out workflows for the process-level ctx.map tests."""

from __future__ import annotations

import os
import time

import pgflow
from tests.support.workflows.effects import record

ITEM_SECONDS = float(os.environ.get("PGFLOW_TEST_ITEM_SECONDS", "0"))


@pgflow.step
def square(n: int) -> int:
    record(f"item-{n}", "square")
    if ITEM_SECONDS:
        time.sleep(ITEM_SECONDS)
    return n * n


@pgflow.workflow(name="fan_out")
def fan_out(ctx: pgflow.Context, n: int) -> list[int]:
    return ctx.map(square, list(range(n)))


@pgflow.step(retry=pgflow.Retry(max_attempts=2, initial_interval=0.05))
def picky(n: int) -> int:
    if n == 3:
        raise ValueError(f"item {n} is not welcome")
    return n


@pgflow.workflow(name="fan_out_picky")
def fan_out_picky(ctx: pgflow.Context) -> str:
    try:
        ctx.map(picky, list(range(6)))
    except pgflow.StepFailed as exc:
        return f"{exc.step}: {exc.error_type}: {exc.message} ({exc.attempts} attempts)"
    return "no failure"
