"""Bad arguments inside a running workflow end as the workflow's own error.

Each of these once left a run unreportable (abandoned, recovered, replayed and
abandoned again, forever) or waiting for something that could never come.
"""

from __future__ import annotations

import pytest

import pgflow
from tests.support.helpers import wait_for


@pgflow.step
def raise_with_nul() -> None:
    raise RuntimeError("bad \x00 byte and a lone \ud800 surrogate")


@pgflow.workflow(name="nul_error", retry=pgflow.Retry(max_attempts=1))
def nul_error(ctx: pgflow.Context) -> None:
    raise_with_nul()


@pgflow.workflow(name="long_state_key")
def long_state_key(ctx: pgflow.Context) -> None:
    ctx.set_state("k" * 2000, 1)


@pgflow.workflow(name="long_signal_name")
def long_signal_name(ctx: pgflow.Context) -> None:
    ctx.wait_for_signal("s" * 300)


@pgflow.workflow(name="long_step_name")
def long_step_name(ctx: pgflow.Context) -> int:
    return ctx.step("n" * 300, lambda: 1)


@pgflow.workflow(name="unknown_child")
def unknown_child(ctx: pgflow.Context) -> str:
    try:
        ctx.start_child("no_such_workflow")
    except pgflow.errors.WorkflowNotFound as exc:
        return f"caught: {exc}"
    return "started"


WORKFLOWS = [nul_error, long_state_key, long_signal_name, long_step_name, unknown_child]


def _finished(conn, run_id):
    return wait_for(lambda: conn.execute(
        "select status, output, error from pgflow.runs where id = %s"
        " and status in ('completed', 'failed')", (run_id,)).fetchone(),
        timeout=60, what=f"run {run_id} finished")


def test_an_error_message_with_a_nul_byte_is_recorded_mended(conn, inprocess_worker):
    inprocess_worker.start(WORKFLOWS)
    run_id = pgflow.start(conn, nul_error)
    status, _, error = _finished(conn, run_id)
    assert status == "failed"
    assert "bad \\x00 byte and a lone ? surrogate" in error["message"], error
    step = conn.execute("select status, error from pgflow.steps where run_id = %s",
                        (run_id,)).fetchone()
    assert step[0] == "failed" and "\\x00" in step[1]["message"]


@pytest.mark.parametrize(("workflow", "message"), [
    (long_state_key, "state key must be at most 1024 bytes"),
    (long_signal_name, "signal name must be at most 200 characters"),
    (long_step_name, "step name must be at most 200 characters"),
])
def test_a_bad_name_or_key_fails_the_run_with_a_clear_error(conn, inprocess_worker, workflow,
                                                              message):
    inprocess_worker.start(WORKFLOWS)
    run_id = pgflow.start(conn, workflow)
    status, _, error = _finished(conn, run_id)
    assert (status, error["type"]) == ("failed", "ValueError")
    assert message in error["message"], error


def test_a_database_refusal_reaches_the_workflow_which_may_catch_it(conn, inprocess_worker):
    inprocess_worker.start(WORKFLOWS)
    run_id = pgflow.start(conn, unknown_child)
    status, output, _ = _finished(conn, run_id)
    assert status == "completed"
    assert output.startswith("caught: ") and "no_such_workflow" in output, output
