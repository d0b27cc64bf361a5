"""The payload size limit (2 MiB as stored), end to end.

A payload over the limit is refused with one clear error naming it, its size
and the limit: by SQL (PF002) at every public entry point, by Python before
anything is sent, and inside a worker as a clear, final failure (the step
fails without retries, a too-large workflow result fails the run), never a
crash, an endless retry or a run stuck in ``running``. A failure report whose
error is too large is cut down, never refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

import pgflow
from pgflow import cli, codec, connections
from tests.support.sqlkit import BAD_ARGUMENT, Worker, raises_sqlstate, run_row, step_rows, worker_factory

LIMIT = codec.MAX_PAYLOAD_BYTES
BIG = "x" * (LIMIT + 1024)          # just over
HUGE = "y" * (10 * 1024 * 1024)     # 10 MB: refused as quickly
RAN: list[str] = []                 # step bodies that ran (in-process workers)


def test_python_and_sql_agree_on_the_limit(conn):
    assert conn.execute("select pgflow.max_payload_bytes()").fetchone()[0] == LIMIT == 2 * 1024 * 1024


# ---------------------------------------------------------------------------
# SQL entry points
# ---------------------------------------------------------------------------


@pytest.fixture
def workers(dsn: str) -> Iterator[Callable[..., Worker]]:
    with worker_factory(dsn) as make:
        yield make


def _leased(conn, workers):
    worker = workers()
    conn.execute("select pgflow.start('wf', '[]', version => '1')")
    return worker, worker.claim_one()


def _too_large(exc: pytest.ExceptionInfo[psycopg.Error], what: str) -> None:
    message = exc.value.diag.message_primary or ""
    assert what in message and "too large" in message and str(LIMIT) in message, message


def test_sql_start_refuses_an_input_over_the_limit_and_writes_nothing(conn):
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        conn.execute("select pgflow.start('wf', %s, version => '1')", (Jsonb([BIG]),))
    _too_large(exc, "the input of workflow 'wf'")
    assert conn.execute("select count(*) from pgflow.runs").fetchone()[0] == 0
    # just under the limit is fine
    conn.execute("select pgflow.start('wf', %s, version => '1')", (Jsonb(["x" * (LIMIT - 100)]),))


def test_sql_signal_and_set_state_refuse_payloads_over_the_limit(conn, workers):
    worker, claim = _leased(conn, workers)
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        conn.execute("select pgflow.signal(%s, 'go', %s)", (claim.run_id, Jsonb(BIG)))
    _too_large(exc, "the payload of signal 'go'")
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        worker.db.execute("select pgflow.set_state(%s, %s, 'k', %s)",
                          (claim.run_id, claim.token, Jsonb(BIG)))
    _too_large(exc, "state 'k'")
    assert conn.execute("select count(*) from pgflow.signals").fetchone()[0] == 0
    assert conn.execute("select count(*) from pgflow.run_state").fetchone()[0] == 0


def test_sql_worker_entry_points_refuse_payloads_over_the_limit(conn, workers):
    worker, claim = _leased(conn, workers)
    calls = {
        "the recorded random value": ("select pgflow.record_value(%s, %s, 0, 'random', %s)",
                                      Jsonb(BIG)),
        "item 0 of map 'pgflow.map:s'": (
            "select pgflow.map(%s, %s, 0, 'pgflow.map:s', %s, 'default', 'map')", Jsonb([[BIG]])),
        "the new input of continue_as_new": ("select pgflow.continue_as_new(%s, %s, %s)",
                                             Jsonb([BIG])),
        "the input of workflow 'child'": (
            "select pgflow.start_child(%s, %s, 0, 'child', %s, null, null, '1', null)",
            Jsonb([BIG])),
    }
    for what, (query, payload) in calls.items():
        with raises_sqlstate(BAD_ARGUMENT) as exc:
            worker.db.execute(query, (claim.run_id, claim.token, payload))
        _too_large(exc, what)
    assert step_rows(conn, claim.run_id) == []
    assert run_row(conn, claim.run_id)["status"] == "running"  # nothing moved
    assert conn.execute("select count(*) from pgflow.runs").fetchone()[0] == 1


def test_sql_failure_reports_with_huge_errors_are_cut_down_not_refused(conn, workers):
    worker, claim = _leased(conn, workers)
    error = {"type": "RuntimeError", "message": "m" * LIMIT, "traceback": "t" * LIMIT}
    outcome, attempts, _ = worker.fail_step(claim.run_id, claim.token, 0, error=error,
                                            retryable=False)
    assert (outcome, attempts) == ("failed", 1)
    recorded = step_rows(conn, claim.run_id)[0]["error"]
    assert recorded["type"] == "RuntimeError"
    assert recorded["message"].endswith("[truncated]") and len(recorded["message"]) < 70000
    assert len(recorded["traceback"]) == 65536
    assert recorded["truncated_from_bytes"] > LIMIT
    worker.fail_run(claim.run_id, claim.token, error=error)
    run = run_row(conn, claim.run_id)
    assert run["status"] == "failed" and run["error"]["message"].endswith("[truncated]")


# ---------------------------------------------------------------------------
# The client: refused before anything is sent
# ---------------------------------------------------------------------------


@pgflow.step
def big_result() -> str:
    RAN.append("big_result")
    return BIG


@pgflow.step
def nul_result() -> str:
    RAN.append("nul_result")
    return "a\x00b"


@pgflow.workflow(name="limits_big_step")
def big_step(ctx: pgflow.Context) -> dict:
    outcomes = {}
    for step in (big_result, nul_result):
        try:
            step()
        except pgflow.StepFailed as exc:
            outcomes[step.name] = {"type": exc.error_type, "message": exc.message,
                                   "attempts": exc.attempts}
    return outcomes


@pgflow.workflow(name="limits_big_result")
def big_workflow_result(ctx: pgflow.Context) -> str:
    return HUGE


@pgflow.workflow(name="limits_big_state")
def big_state(ctx: pgflow.Context) -> str:
    try:
        ctx.set_state("report", BIG)
    except pgflow.PayloadTooLarge as exc:
        return str(exc)
    return "published"


@pgflow.step(retry=pgflow.Retry(max_attempts=2, initial_interval=0))
def loud_failure() -> None:
    RAN.append("loud_failure")
    raise RuntimeError("m" * (3 * 1024 * 1024))


@pgflow.workflow(name="limits_big_error")
def big_error(ctx: pgflow.Context) -> None:
    loud_failure()


@pgflow.workflow(name="limits_big_continue")
def big_continue(ctx: pgflow.Context, payload: str) -> str:
    if payload == "small":
        ctx.continue_as_new(BIG)
    return "continued"


def test_client_start_and_signal_refuse_payloads_over_the_limit_before_sending(dsn, conn):
    # Before sending: on a closed connection the refusal is still PayloadTooLarge, so
    # the connection was never used (nothing is timed).
    closed = psycopg.connect(dsn)
    closed.close()
    for payload in (BIG, HUGE):
        with pytest.raises(pgflow.PayloadTooLarge) as exc:
            pgflow.start(closed, big_continue, payload)
        assert "limits_big_continue" in str(exc.value) and "too large" in str(exc.value)
        assert str(LIMIT) in str(exc.value) and str(LIMIT) in str(exc.value)
    run_id = pgflow.start(conn, big_state, key="k")
    with pytest.raises(pgflow.PayloadTooLarge) as exc:
        pgflow.signal(conn, run_id, "go", HUGE)
    assert "the payload of signal 'go'" in str(exc.value)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, pgflow.EncodingError)
    assert conn.execute("select count(*) from pgflow.runs").fetchone()[0] == 1
    assert conn.execute("select count(*) from pgflow.signals").fetchone()[0] == 0


def test_a_too_large_sql_error_reaches_python_as_payload_too_large(conn):
    conn.execute("select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'],"
                 """ '[{"name": "wf", "version": "1", "queue": "default"}]')""")
    # Many small numbers: small as text, over the limit as jsonb; Python's estimate
    # refuses it first, so send it through SQL to see the database's own refusal.
    numbers = [0] * (LIMIT // 6)
    with pytest.raises(pgflow.PayloadTooLarge):
        pgflow.start(conn, "wf", numbers)
    with pytest.raises(pgflow.PayloadTooLarge) as exc:
        connections.fetch(conn, "select pgflow.start('wf', %s::jsonb)", (json.dumps(numbers),))
    assert "as jsonb" in str(exc.value)


# ---------------------------------------------------------------------------
# Inside a worker
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_in_a_worker_oversized_values_fail_clearly_and_nothing_is_stuck(conn, inprocess_worker):
    RAN.clear()
    inprocess_worker.start([big_step, big_workflow_result, big_state, big_error, big_continue])
    step_run = pgflow.start(conn, big_step)
    result_run = pgflow.start(conn, big_workflow_result)
    state_run = pgflow.start(conn, big_state)
    error_run = pgflow.start(conn, big_error)
    continue_run = pgflow.start(conn, big_continue, "small")

    # A step result over the limit (or holding a NUL) fails the step at once: the
    # workflow catches StepFailed; the step body ran once, not once per attempt.
    outcomes = pgflow.result(conn, step_run, timeout=60)
    assert outcomes["big_result"]["type"] == "pgflow.errors.PayloadTooLarge"
    assert "too large" in outcomes["big_result"]["message"]
    assert outcomes["big_result"]["attempts"] == 1
    assert outcomes["nul_result"]["type"] == "pgflow.errors.EncodingError"
    assert "NUL" in outcomes["nul_result"]["message"]
    assert RAN.count("big_result") == 1 and RAN.count("nul_result") == 1

    # A workflow result over the limit fails the run, with the reason.
    with pytest.raises(pgflow.WorkflowFailed) as failed:
        pgflow.result(conn, result_run, timeout=60)
    assert failed.value.error_type == "pgflow.errors.PayloadTooLarge"
    assert "the result of workflow 'limits_big_result' is too large" in failed.value.message

    # ctx.set_state refuses at the call, catchably.
    assert "state 'report' is too large" in pgflow.result(conn, state_run, timeout=60)

    # A huge exception message: the failure is recorded (cut down), the run fails.
    with pytest.raises(pgflow.WorkflowFailed):
        pgflow.result(conn, error_run, timeout=60)
    steps = pgflow.get(conn, error_run).steps
    assert steps[0].status == "failed" and steps[0].attempts == 2
    assert steps[0].error["message"].endswith("[truncated]")

    # continue_as_new with input over the limit fails the run instead of moving on.
    with pytest.raises(pgflow.WorkflowFailed) as failed:
        pgflow.result(conn, continue_run, timeout=60)
    assert failed.value.error_type == "pgflow.errors.PayloadTooLarge"

    for run_id in (step_run, result_run, state_run, error_run, continue_run):
        assert pgflow.get(conn, run_id).status in ("completed", "failed")
    assert conn.execute("select count(*) from pgflow.runs where status = 'running'").fetchone()[0] == 0


def test_cli_refuses_a_10_mb_input_with_one_line(dsn, conn):
    """In process (typer's runner): a 10 MB argv is beyond some systems' limits."""
    conn.execute("select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'],"
                 """ '[{"name": "wf", "version": "1", "queue": "default"}]')""")
    outcome = CliRunner().invoke(cli.app, ["start", "wf", "--input", json.dumps([HUGE]),
                                           "--dsn", dsn])
    assert outcome.exit_code == 1
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgflow: error: "), outcome.stderr
    assert "too large" in lines[0] and str(LIMIT) in lines[0]
    assert conn.execute("select count(*) from pgflow.runs").fetchone()[0] == 0
