"""``pgflow.complete_batch``, called directly: many runs' reports in one transaction.

Each element is fenced on its own: one stale, duplicate or unknown report
writes nothing and leaves the others of its batch intact.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from tests.support.sqlkit import (
    Conn,
    Worker,
    listener,
    load_finished_runs,
    received,
    run_row,
    start,
    step_rows,
    timer_rows,
    worker_factory,
)

BATCH = ("select run_id, outcome from pgflow.complete_batch(%s::uuid[], %s::bigint[],"
         " %s::integer[], %s::text[], %s::text[], %s::jsonb[], %s::float8[], %s::boolean[],"
         " %s::jsonb[], %s::integer[], %s::timestamptz[], %s::float8[])")


@pytest.fixture
def workers(dsn: str) -> Iterator[Any]:
    with worker_factory(dsn) as make:
        yield make


def step(run_id: uuid.UUID, token: int, seq: int | None, output: Any = "ok", name: str = "step",
         finish: bool = False, result: Any = None, sleep_seq: int | None = None,
         sleep_seconds: float | None = None) -> dict[str, Any]:
    return {"run": run_id, "token": token, "seq": seq, "name": name, "output": output,
            "finish": finish, "result": result, "sleep_seq": sleep_seq,
            "sleep_seconds": sleep_seconds}


def finish(run_id: uuid.UUID, token: int, result: Any = "done") -> dict[str, Any]:
    return step(run_id, token, None, None, None, True, result)


def sleep(run_id: uuid.UUID, token: int, seq: int, seconds: float,
          after: int | None = None) -> dict[str, Any]:
    """A sleep at ``seq``, after the checkpoint of step ``after`` if given."""
    return step(run_id, token, after, "before", sleep_seq=seq, sleep_seconds=seconds)


def batch(conn: Conn, *reports: dict[str, Any]) -> dict[uuid.UUID, str]:
    rows = conn.execute(BATCH, (
        [r["run"] for r in reports], [r["token"] for r in reports], [r["seq"] for r in reports],
        [r["name"] for r in reports], ["step" if r["seq"] is not None else None for r in reports],
        [None if r["seq"] is None else Jsonb(r["output"]) for r in reports],
        [0.25 if r["seq"] is not None else None for r in reports],
        [r["finish"] for r in reports],
        [Jsonb(r["result"]) if r["finish"] else None for r in reports],
        [r["sleep_seq"] for r in reports], [None for _ in reports],
        [r["sleep_seconds"] for r in reports])).fetchall()
    assert len(rows) == len(reports), rows
    return dict(rows)


def claimed(conn: Conn, worker: Worker, n: int) -> list[tuple[uuid.UUID, int]]:
    for i in range(n):
        start(conn, input=[i])
    return [(c.run_id, c.token) for c in worker.claim(limit=n)]


def test_a_batch_records_steps_and_completes_runs_in_one_call(conn, workers):
    worker = workers()
    (a, ta), (b, tb), (c, tc) = claimed(conn, worker, 3)
    outcomes = batch(conn, step(a, ta, 0, {"x": 1}), step(b, tb, 0, 7, finish=True, result=8),
                     finish(c, tc, "plain"))
    assert outcomes == {a: "ok", b: "ok", c: "ok"}

    assert run_row(conn, a)["status"] == "running"  # a step only: still leased
    assert [(s["seq"], s["status"], s["output"]) for s in step_rows(conn, a)] == [
        (0, "completed", {"x": 1})]
    done_b = run_row(conn, b)
    assert (done_b["status"], done_b["output"], done_b["lease_owner"]) == ("completed", 8, None)
    assert done_b["finished_at"] is not None
    assert [(s["seq"], s["output"]) for s in step_rows(conn, b)] == [(0, 7)]
    done_c = run_row(conn, c)
    assert (done_c["status"], done_c["output"]) == ("completed", "plain")
    assert step_rows(conn, c) == []
    started = step_rows(conn, a)[0]
    assert (started["finished_at"] - started["started_at"]).total_seconds() == pytest.approx(0.25)


def test_bad_elements_are_refused_alone_and_write_nothing(conn, workers):
    worker = workers()
    (good, tg), (stale, ts), (dup, td) = claimed(conn, worker, 3)
    batch(conn, step(dup, td, 0, "first"))
    ghost = uuid.uuid4()

    outcomes = batch(conn, step(good, tg, 0, "g", finish=True, result="G"),
                     step(stale, ts + 1, 0, "late"), step(dup, td, 0, "again", finish=True),
                     finish(ghost, 1))
    assert outcomes == {good: "ok", stale: "lease_lost", dup: "duplicate", ghost: "unknown"}

    assert run_row(conn, good)["status"] == "completed"
    assert run_row(conn, stale)["status"] == "running" and step_rows(conn, stale) == []
    # The duplicate's completion rode on its step: neither was written.
    assert run_row(conn, dup)["status"] == "running"
    assert [s["output"] for s in step_rows(conn, dup)] == ["first"]


def test_a_cancel_request_comes_back_with_the_checkpoint(conn, workers):
    worker = workers()
    (run, token), = claimed(conn, worker, 1)
    conn.execute("select pgflow.cancel(%s)", (run,))
    assert batch(conn, step(run, token, 0)) == {run: "cancel"}
    assert step_rows(conn, run)[0]["status"] == "completed"


def test_a_step_after_its_retry_back_off_is_recorded_over_the_retrying_entry(conn, workers):
    worker = workers()
    (run, token), = claimed(conn, worker, 1)
    assert worker.fail_step(run, token, 0)[0] == "retry"
    conn.execute("select pgflow.advance_time(interval '1 hour')")
    again = worker.claim_one()
    assert batch(conn, step(run, again.token, 0, "second try")) == {run: "ok"}
    entry = step_rows(conn, run)[0]
    assert (entry["status"], entry["attempts"], entry["output"]) == ("completed", 2, "second try")


def test_completion_drops_timers_and_notifies_only_watched_runs(dsn, conn, workers):
    worker = workers()
    watched = start(conn, input=[1], timeout=timedelta(hours=1))
    quiet = start(conn, input=[2])
    claims = {c.run_id: c.token for c in worker.claim(limit=2)}
    conn.execute("select pgflow.watch(%s)", (watched,))
    assert len(timer_rows(conn, watched)) == 1  # its deadline

    listen = listener(dsn, "pgflow_done")
    try:
        batch(conn, finish(watched, claims[watched]), finish(quiet, claims[quiet]))
        assert received(listen, conn, "pgflow_done") == [str(watched)]
    finally:
        listen.close()
    assert timer_rows(conn) == []


def test_a_child_completed_in_a_batch_wakes_its_waiting_parent(conn, workers):
    worker = workers(workflows=(("wf", "1", "default"), ("child", "1", "default")))
    parent = start(conn)
    p = worker.claim_one()
    child_id = conn.execute("select pgflow.start_child(%s, %s, 0, 'child', '[]'::jsonb,"
                            " null, null, '1', null)", (parent, p.token)).fetchone()[0]
    assert conn.execute("select pgflow.wait_child(%s, %s, 1, %s)",
                        (parent, p.token, child_id)).fetchone()[0] is None
    assert run_row(conn, parent)["status"] == "waiting"

    c = worker.claim_one()
    assert c.run_id == child_id
    assert batch(conn, step(child_id, c.token, 0, 41, finish=True, result=42)) == {child_id: "ok"}
    assert run_row(conn, parent)["status"] == "pending"
    wait = step_rows(conn, parent)[1]
    assert (wait["status"], wait["output"]["output"]) == ("completed", 42)


def test_sleeps_follow_their_checkpoints_in_the_same_batch(conn, workers):
    worker = workers()
    (after_step, t1), (alone, t2), (due, t3) = claimed(conn, worker, 3)
    outcomes = batch(conn, sleep(after_step, t1, 1, 3600, after=0), sleep(alone, t2, 0, 60),
                     sleep(due, t3, 0, 0))
    assert outcomes == {after_step: "sleeping", alone: "sleeping", due: "ok"}

    entries = step_rows(conn, after_step)
    assert [(e["seq"], e["kind"], e["status"]) for e in entries] == [
        (0, "step", "completed"), (1, "sleep", "sleeping")]
    row = run_row(conn, after_step)
    assert (row["status"], row["lease_owner"]) == ("sleeping", None)
    assert [(t["kind"], t["seq"]) for t in timer_rows(conn, after_step)] == [("sleep", 1)]
    assert [(t["kind"], t["seq"]) for t in timer_rows(conn, alone)] == [("sleep", 0)]
    # A sleep whose time has come is recorded as over, and the run stays with its worker.
    assert run_row(conn, due)["status"] == "running"
    assert [(e["kind"], e["status"]) for e in step_rows(conn, due)] == [("sleep", "completed")]
    assert timer_rows(conn, due) == []


def test_a_cancelled_run_records_its_checkpoint_but_does_not_go_to_sleep(conn, workers):
    worker = workers()
    (run, token), = claimed(conn, worker, 1)
    conn.execute("select pgflow.cancel(%s)", (run,))
    assert batch(conn, sleep(run, token, 1, 60, after=0)) == {run: "cancel"}
    assert [(e["seq"], e["kind"]) for e in step_rows(conn, run)] == [(0, "step")]
    assert run_row(conn, run)["status"] == "running"  # the workflow raises Cancelled next
    assert timer_rows(conn, run) == []


def test_a_stale_sleep_writes_nothing(conn, workers):
    worker = workers()
    (run, token), = claimed(conn, worker, 1)
    assert batch(conn, sleep(run, token + 1, 1, 60, after=0)) == {run: "lease_lost"}
    assert step_rows(conn, run) == [] and timer_rows(conn, run) == []
    assert run_row(conn, run)["status"] == "running"


def test_a_step_is_dated_back_by_the_time_its_report_waited(conn, workers):
    worker = workers()
    (run, token), = claimed(conn, worker, 1)
    now = conn.execute(
        "select pgflow.now() from pgflow.complete_batch(%s::uuid[], %s::bigint[], %s::integer[],"
        " %s::text[], %s::text[], %s::jsonb[], %s::float8[], %s::boolean[], %s::jsonb[],"
        " p_ages => %s::float8[])",
        ([run], [token], [0], ["step"], ["step"], [Jsonb(1)], [0.5], [False], [None], [2.0])
    ).fetchone()[0]
    entry = step_rows(conn, run)[0]
    assert (now - entry["finished_at"]).total_seconds() == pytest.approx(2.0)
    assert (entry["finished_at"] - entry["started_at"]).total_seconds() == pytest.approx(0.5)


@pytest.mark.parametrize("history, analyzed", [
    pytest.param(100_000, True, id="large-analyzed", marks=pytest.mark.slow),
    pytest.param(300, False, id="small-never-analyzed")])
def test_the_batch_statement_probes_indexes_whatever_the_history(conn, workers, history, analyzed):
    """complete_batch keeps one generic plan per connection: it must not scan history.

    (The first call of a connection makes that plan, so this is the plan every call uses.)
    A table never analyzed when that plan is made (a fresh install) must not get a plan
    that scans it: the connection keeps it, as the table grows, until the next ANALYZE.
    """
    worker = workers()
    load_finished_runs(conn, history)
    if analyzed:
        conn.execute("analyze pgflow.runs")
    (run, token), = claimed(conn, worker, 1)

    # The backend's unreported statistics: this transaction's scans, and on PostgreSQL 15 any
    # earlier ones of the connection not yet flushed (the setup's, which scan nothing here).
    with conn.transaction():
        assert batch(conn, step(run, token, 0, finish=True)) == {run: "ok"}
        seq_scans, index_scans = conn.execute(
            "select seq_scan, idx_scan from pg_stat_xact_user_tables"
            " where relid = 'pgflow.runs'::regclass").fetchone()
    assert seq_scans == 0, f"complete_batch scanned all {history} finished runs"
    assert index_scans >= 2  # the fence's probe and the completion's update
