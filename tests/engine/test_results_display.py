"""What a user reads back: result() errors they can catch, a step timeline that tells the truth."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pytest

import pgflow
from tests.support import sqlkit
from tests.support.cli import cli_env, ok
from tests.support.helpers import REPO, wait_status

TWO_WEEKS = timedelta(days=14)


@pgflow.workflow(name="awaits_review")
def awaits_review(ctx: pgflow.Context) -> str:
    return ctx.wait_for_signal("review", timeout=TWO_WEEKS)["by"]


def test_workflow_cancelled_is_an_ordinary_exception():
    assert issubclass(pgflow.WorkflowCancelled, Exception)
    assert issubclass(pgflow.WorkflowCancelled, pgflow.PgflowError)
    assert not issubclass(pgflow.WorkflowCancelled, pgflow.Cancelled)
    # inside a workflow, cancellation still passes `except Exception`
    assert not issubclass(pgflow.Cancelled, Exception)


def test_result_of_a_cancelled_run_is_caught_by_except_exception(conn, inprocess_worker):
    inprocess_worker.start([awaits_review])
    run_id = pgflow.start(conn, awaits_review)
    wait_status(conn, run_id, "waiting")
    pgflow.cancel(conn, run_id)
    try:
        pgflow.result(conn, run_id, timeout=30)
    except Exception as exc:  # the point: no BaseException escapes this
        assert isinstance(exc, pgflow.WorkflowCancelled)
        assert exc.run_id == run_id
    else:
        pytest.fail("result() of a cancelled run returned")


def _show(dsn: str, run_id: object) -> list[str]:
    return ok(subprocess.run([sys.executable, "-m", "pgflow", "show", str(run_id), "--dsn", dsn],
                             cwd=REPO, env=cli_env(), capture_output=True, text=True,
                             timeout=60)).splitlines()


@pytest.mark.slow
def test_a_step_waiting_for_a_signal_shows_its_deadline_not_a_duration(dsn, conn,
                                                                        inprocess_worker):
    inprocess_worker.start([awaits_review])
    run_id = pgflow.start(conn, awaits_review)
    wait_status(conn, run_id, "waiting")
    [step] = pgflow.get(conn, run_id).steps
    assert step.status == "waiting"
    assert step.duration_ms is None
    assert step.waits_until is not None and step.waits_until - step.started_at == TWO_WEEKS
    [row] = [line for line in _show(dsn, run_id) if " review " in line]
    assert "waiting" in row and "until " in row
    assert "1209600000" not in row and " ms" not in row

    # cancelled: the wait ends with the run, at the moment of cancellation
    pgflow.cancel(conn, run_id)
    with pytest.raises(pgflow.WorkflowCancelled):
        pgflow.result(conn, run_id, timeout=30)
    [step] = pgflow.get(conn, run_id).steps
    assert step.status == "cancelled"
    assert step.duration_ms is not None and step.duration_ms < TWO_WEEKS.total_seconds() * 1000
    assert step.finished_at <= sqlkit.engine_now(conn)
    [row] = [line for line in _show(dsn, run_id) if " review " in line]
    assert "cancelled" in row and "until " not in row


def test_list_json_is_one_array_with_payloads(dsn, conn, inprocess_worker):
    inprocess_worker.start([awaits_review])
    run_id = pgflow.start(conn, awaits_review)
    pgflow.signal(conn, run_id, "review", {"by": "ana"})
    assert pgflow.result(conn, run_id, timeout=30) == "ana"
    out = ok(subprocess.run([sys.executable, "-m", "pgflow", "list", "--json", "--dsn", dsn],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60))
    [record] = json.loads(out)
    assert record["id"] == str(run_id)
    assert (record["input"], record["output"], record["error"]) == ([], "ana", None)


@pytest.mark.slow
def test_the_examples_closing_hint_is_a_command_that_works_as_shown(dsn):
    env = cli_env(PGFLOW_DSN=dsn)
    shown = ok(subprocess.run([sys.executable, "examples/order_provisioning.py"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120))
    hint = shown.splitlines()[-1]
    assert hint.startswith("inspect it again with: ")
    command = hint.removeprefix("inspect it again with: ")
    again = ok(subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60))
    run_id = command.split()[-1]
    assert again.splitlines()[0] == f"run      {run_id}"
    assert "status   completed" in again
