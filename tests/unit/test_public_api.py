"""The public surface, pinned: a name added to or removed from it is a decision, made here.

Users import these names; API.md and the README document them. Changing this
list means changing the contract: do it in one step with the docs.
"""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "pgflow": [
        "Cancelled", "ChildFailed", "Concurrency", "Context", "EncodingError", "KeyConflict",
        "LeaseLost", "NonDeterminismError", "PayloadTooLarge", "PgflowError", "RateLimit",
        "Retry", "Run", "RunNotFound",
        "RunStateError", "ScheduleNotFound", "SchemaNotMigrated", "SchemaTooNew",
        "SignalTimeout", "Step", "StepFailed", "StepRecord", "StepTimeout", "Worker", "Workflow",
        "WorkflowCancelled", "WorkflowFailed", "WorkflowNotFound", "WorkflowTimeout",
        "backfill_schedule", "cancel", "create_schedule", "delete_schedule", "get",
        "get_state", "pause_queue", "pause_schedule", "result", "resume_queue",
        "resume_schedule", "retry", "schedule", "set_queue", "signal", "start", "step",
        "testing", "trigger_schedule", "workflow",
    ],
    "pgflow.aio": ["backfill_schedule", "cancel", "create_schedule", "delete_schedule", "get",
                   "get_state", "pause_queue", "pause_schedule", "result", "resume_queue",
                   "resume_schedule", "retry", "set_queue", "signal", "start",
                   "trigger_schedule"],
    "pgflow.testing": [
        "ReplayCheck", "TimeTravel", "advance_time", "advance_time_async", "check_replay",
        "check_replays", "reset_time", "time_travel",
    ],
    "pgflow.errors": [
        "Cancelled", "ChildFailed", "EncodingError", "KeyConflict", "LeaseLost",
        "NonDeterminismError", "PayloadTooLarge", "PgflowError", "RunNotFound", "RunStateError",
        "ScheduleNotFound", "SchemaNotMigrated", "SchemaTooNew", "SignalTimeout", "StepFailed", "StepTimeout",
        "WorkflowCancelled", "WorkflowFailed", "WorkflowNotFound", "WorkflowTimeout",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_the_public_names_are_exactly_these(module):
    loaded = importlib.import_module(module)
    assert sorted(loaded.__all__) == PUBLIC[module]
    missing = [name for name in loaded.__all__ if not hasattr(loaded, name)]
    assert missing == [], f"{module}.__all__ names what it does not define: {missing}"


def test_every_exception_is_reachable_from_the_top_and_rooted_in_pgflow_error():
    import pgflow
    from pgflow import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert getattr(pgflow, name) is cls
        if name != "Cancelled":  # raised inside a workflow: a BaseException on purpose
            assert issubclass(cls, pgflow.PgflowError), name
