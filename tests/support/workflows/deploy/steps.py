"""Steps shared by the deploys of the versioning tests (each deploy is its own module)."""

from __future__ import annotations

import os

import pgflow
from tests.support.workflows.effects import record


@pgflow.step
def old_price(order: str) -> int:
    record(order, "old_price")
    return 100


@pgflow.step
def new_price(order: str) -> int:
    record(order, "new_price")
    return 90


@pgflow.step
def charge(order: str, cents: int) -> str:
    record(order, "charge")
    return f"charged {cents}"


@pgflow.step
def step_a(run_id: str) -> str:
    record(run_id, "step_a")
    return "a"


@pgflow.step
def step_b(run_id: str) -> str:
    record(run_id, "step_b")
    return "b"


@pgflow.step
def step_c(run_id: str) -> str:
    record(run_id, "step_c")
    return "c"


@pgflow.step
def where_am_i(run_id: str, version: str) -> int:
    record(run_id, f"v{version}")
    return os.getpid()
