"""Durable time in the engine's SQL, called directly: each test is a state-machine script.

Sleeps (``pgflow.sleep``), recorded values (``pgflow.record_value``), delayed
starts and retry back-offs all become rows of ``pgflow.timers``; a run waiting
on one is ``sleeping`` and no claim sees it until ``pgflow.fire_timers`` (the
scheduler) or ``pgflow.advance_time`` (tests) fires it. ``pgflow.retry``
resumes a failed run. Helpers are in ``tests/support/sqlkit.py``; one fresh database
a test (``conftest.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgflow import schema
from tests.support.sqlkit import (
    BAD_ARGUMENT,
    DUPLICATE_CHECKPOINT,
    ERROR,
    LEASE_LOST,
    SECOND,
    UNKNOWN_RUN,
    WRONG_STATE,
    Conn,
    Worker,
    advance_time,
    assert_plan_uses,
    attempt_rows,
    count,
    engine_now,
    fire_timers,
    listener,
    raises_sqlstate,
    received,
    run_row,
    set_clock,
    start,
    step_rows,
    timer_rows,
    worker_factory,
)

HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


@pytest.fixture
def workers(dsn: str) -> Iterator[Callable[..., Worker]]:
    """``workers()`` registers a new :class:`Worker`; all are closed at teardown."""
    with worker_factory(dsn) as make:
        yield make


def waits(conn: Conn) -> list[dict[str, Any]]:
    return conn.cursor(row_factory=dict_row).execute(
        "select run_id, name, status, kind, seq, step, due_at, due_in from pgflow.waits"
        " order by due_at").fetchall()


def next_timer_in(conn: Conn) -> float | None:
    row = conn.execute("select pgflow.next_timer_in()").fetchone()
    assert row is not None
    return row[0]


def sleeping_runs(conn: Conn, n: int, first_due: timedelta, spacing: timedelta) -> None:
    """``n`` delayed starts in one statement (one transaction), due first_due + i * spacing."""
    conn.execute("""
        select count(pgflow.start('wf', '[]'::jsonb, key => 'bulk-' || g, version => '1',
                                  delay => %s + (g - 1) * %s))
        from generate_series(1, %s) g""", (first_due, spacing, n))


def table_stats(tx: Conn, table: str) -> dict[str, int]:
    """What this transaction has done to ``pgflow.<table>`` so far (pg_stat_xact_user_tables)."""
    row = tx.cursor(row_factory=dict_row).execute(
        "select seq_scan, seq_tup_read, coalesce(idx_scan, 0) as idx_scan,"
        "       coalesce(idx_tup_fetch, 0) as idx_tup_fetch"
        " from pg_stat_xact_user_tables where relid = %s::regclass", (f"pgflow.{table}",)).fetchone()
    assert row is not None
    return row


# ---------------------------------------------------------------------------
# 1. pgflow.sleep
# ---------------------------------------------------------------------------


def test_a_sleep_suspends_the_run_until_fire_timers_wakes_it(dsn, conn, workers):
    worker = workers(queues=("mail",), workflows=(("wf", "1", "mail"),))
    run_id = start(conn, queue="mail")
    claim = worker.claim_one()
    worker.complete_step(run_id, claim.token, 0, "send")
    before = engine_now(conn)

    assert worker.sleep(run_id, claim.token, 1, "cool-off", duration=HOUR) is True
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("sleeping", None, claim.token)
    entry = step_rows(conn, run_id)[1]
    assert (entry["seq"], entry["name"], entry["kind"], entry["status"], entry["attempts"]) == (
        1, "cool-off", "sleep", "sleeping", 1)
    [timer] = timer_rows(conn)
    assert (timer["run_id"], timer["kind"], timer["seq"]) == (run_id, "sleep", 1)
    assert before + HOUR <= timer["due_at"] <= engine_now(conn) + HOUR
    assert timer["due_at"] == entry["started_at"] + HOUR
    until = conn.execute("select (output ->> 'until')::timestamptz from pgflow.steps"
                         " where run_id = %s and seq = 1", (run_id,)).fetchone()[0]
    assert list(entry["output"]) == ["until"] and until == timer["due_at"]

    # While it sleeps: pgflow.waits says what for, the old lease is over, nobody can claim it.
    [wait] = waits(conn)
    assert (wait["run_id"], wait["name"], wait["status"], wait["kind"], wait["seq"], wait["step"],
            wait["due_at"]) == (run_id, "wf", "sleeping", "sleep", 1, "cool-off", timer["due_at"])
    assert timedelta(minutes=59) < wait["due_in"] <= HOUR
    with raises_sqlstate(LEASE_LOST):
        worker.complete_step(run_id, claim.token, 2, "after")
    assert worker.claim() == []
    set_clock(conn, timedelta(minutes=59))
    assert fire_timers(conn) == 0
    assert run_row(conn, run_id)["status"] == "sleeping"

    set_clock(conn, timedelta(minutes=61))
    with listener(dsn) as listen:
        assert fire_timers(conn) == 1
        assert received(listen, conn, "pgflow_ready") == ["mail"]
    run, entry = run_row(conn, run_id), step_rows(conn, run_id)[1]
    assert (run["status"], run["lease_owner"]) == ("pending", None)
    assert entry["status"] == "completed"
    assert entry["finished_at"] - timer["due_at"] >= MINUTE  # the engine clock when it fired
    assert run["available_at"] == timer["due_at"]  # in line from when it was due
    assert timer_rows(conn) == [] and waits(conn) == []

    # The replay meets the sleep again: it is over, the workflow goes on under the new lease.
    claim = worker.claim_one()
    assert [(e["seq"], e["kind"], e["status"]) for e in claim.journal] == [
        (0, "step", "completed"), (1, "sleep", "completed")]
    assert claim.journal[1]["output"] == entry["output"]
    assert worker.sleep(run_id, claim.token, 1, "cool-off", duration=HOUR) is False
    assert run_row(conn, run_id)["status"] == "running" and timer_rows(conn) == []
    worker.complete_step(run_id, claim.token, 2, "after")
    worker.complete_run(run_id, claim.token)
    assert run_row(conn, run_id)["status"] == "completed"


def test_a_sleep_until_a_time_is_woken_by_advance_time(conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    until = engine_now(conn) + 10 * MINUTE
    assert worker.sleep(run_id, claim.token, 0, "nap", until=until) is True
    assert [t["due_at"] for t in timer_rows(conn, run_id)] == [until]

    assert advance_time(conn, 5 * MINUTE) == 0
    assert run_row(conn, run_id)["status"] == "sleeping"
    assert step_rows(conn, run_id)[0]["status"] == "sleeping"
    assert [w["run_id"] for w in waits(conn)] == [run_id]

    assert advance_time(conn, 6 * MINUTE) == 1
    run, entry = run_row(conn, run_id), step_rows(conn, run_id)[0]
    assert (run["status"], entry["status"]) == ("pending", "completed")
    assert entry["finished_at"] >= until and run["available_at"] == until
    assert timer_rows(conn) == [] and waits(conn) == []
    assert advance_time(conn, HOUR) == 0  # nothing left to fire
    assert worker.claim_one().journal[0]["status"] == "completed"


@pytest.mark.parametrize("when", ["past-until", "zero-duration", "negative-duration"])
def test_a_sleep_whose_time_has_come_returns_false_and_suspends_nothing(conn, workers, when):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    now = engine_now(conn)
    at = {"past-until": {"until": now - SECOND}, "zero-duration": {"duration": timedelta(0)},
          "negative-duration": {"duration": -MINUTE}}[when]

    assert worker.sleep(run_id, claim.token, 0, "nap", **at) is False
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("running", worker.id, claim.token)
    [entry] = step_rows(conn, run_id)
    assert (entry["kind"], entry["status"]) == ("sleep", "completed")
    assert entry["finished_at"] >= entry["started_at"] >= now
    assert list(entry["output"]) == ["until"]
    assert timer_rows(conn) == [] and waits(conn) == []
    worker.complete_step(run_id, claim.token, 1, "next")  # the same lease carries on


def test_a_sleep_needs_an_end_time_or_a_duration(conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    with raises_sqlstate(BAD_ARGUMENT):
        worker.sleep(run_id, claim.token, 0, "nap")
    assert step_rows(conn, run_id) == [] and timer_rows(conn) == []
    assert run_row(conn, run_id)["status"] == "running"


def test_a_sleep_is_idempotent_at_its_seq(conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    assert worker.sleep(run_id, claim.token, 0, "nap", duration=HOUR) is True
    [entry] = step_rows(conn, run_id)
    [timer] = timer_rows(conn)

    # The sleeping run comes back to a worker before its timer fired (no procedure does
    # that today: an operator's update stands in for it). Its replay sleeps again at seq 0.
    conn.execute("update pgflow.runs set status = 'pending' where id = %s", (run_id,))
    claim = worker.claim_one()
    assert [(e["kind"], e["status"]) for e in claim.journal] == [("sleep", "sleeping")]
    assert worker.sleep(run_id, claim.token, 0, "nap", duration=3 * HOUR) is True
    assert run_row(conn, run_id)["status"] == "sleeping"
    assert step_rows(conn, run_id) == [entry]  # the first call's end time stands
    assert timer_rows(conn) == [timer]  # no second timer

    # Had its timer been lost, the replay's sleep puts it back, at the recorded end time.
    conn.execute("delete from pgflow.timers")
    conn.execute("update pgflow.runs set status = 'pending' where id = %s", (run_id,))
    claim = worker.claim_one()
    assert worker.sleep(run_id, claim.token, 0, "nap", duration=timedelta(days=9)) is True
    [again] = timer_rows(conn)
    assert (again["run_id"], again["kind"], again["seq"], again["due_at"]) == (
        run_id, "sleep", 0, timer["due_at"])

    # Another call at that seq is not this sleep.
    conn.execute("update pgflow.runs set status = 'pending' where id = %s", (run_id,))
    claim = worker.claim_one()
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        worker.sleep(run_id, claim.token, 0, "other-nap", duration=HOUR)
    worker.complete_step(run_id, claim.token, 1, "step")
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        worker.sleep(run_id, claim.token, 1, "step", duration=HOUR)
    assert len(timer_rows(conn)) == 1 and run_row(conn, run_id)["status"] == "running"


def test_a_sleep_with_a_stale_lease_token_is_refused_and_writes_nothing(conn, workers):
    a, b = workers(), workers()
    run_id = start(conn)
    old = a.claim_one()
    a.release_run(run_id, old.token)
    current = b.claim_one()

    with raises_sqlstate(LEASE_LOST):
        a.sleep(run_id, old.token, 0, "nap", duration=HOUR)
    with raises_sqlstate(LEASE_LOST):  # even when it would not suspend
        a.sleep(run_id, old.token, 0, "nap", duration=timedelta(0))
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("running", b.id, current.token)
    assert step_rows(conn, run_id) == [] and timer_rows(conn) == []

    with raises_sqlstate(UNKNOWN_RUN):
        a.sleep(uuid.uuid4(), 1, 0, "nap", duration=HOUR)
    assert b.sleep(run_id, current.token, 0, "nap", duration=HOUR) is True


# ---------------------------------------------------------------------------
# 2. pgflow.record_value
# ---------------------------------------------------------------------------


def test_record_value_journals_the_engine_clock_and_given_values(conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    set_clock(conn, timedelta(days=3))

    # 'now' is the engine clock (offset included), never the caller's value.
    value, as_time, engine = conn.execute(
        "select v, (v #>> '{}')::timestamptz, n from (select pgflow.record_value(%s, %s, 0, 'now',"
        " '\"1999-01-01T00:00:00+00:00\"'), pgflow.now()) as x(v, n)", (run_id, claim.token)).fetchone()
    assert isinstance(value, str) and as_time == engine
    db_now = conn.execute("select now()").fetchone()[0]
    assert as_time - db_now > timedelta(days=2, hours=23)

    token = str(uuid.uuid4())
    assert worker.record_value(run_id, claim.token, 1, "uuid4", token) == token
    assert worker.record_value(run_id, claim.token, 2, "random", 0.25) == 0.25
    entries = step_rows(conn, run_id)
    assert [(e["seq"], e["name"], e["kind"], e["status"], e["output"]) for e in entries] == [
        (0, "now", "now", "completed", value), (1, "uuid4", "uuid4", "completed", token),
        (2, "random", "random", "completed", 0.25)]
    assert entries[0]["started_at"] == entries[0]["finished_at"] == as_time

    # Recorded once: a second value at a taken seq is refused and changes nothing.
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        worker.record_value(run_id, claim.token, 1, "uuid4", str(uuid.uuid4()))
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        worker.record_value(run_id, claim.token, 0, "now")
    worker.complete_step(run_id, claim.token, 3, "step")
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        worker.record_value(run_id, claim.token, 3, "random", 0.5)
    assert step_rows(conn, run_id)[:3] == entries

    # The replay gets the very same values from its journal.
    worker.release_run(run_id, claim.token)
    replay = worker.claim_one()
    assert [e["output"] for e in replay.journal] == [value, token, 0.25, "ok"]
    with raises_sqlstate(LEASE_LOST):
        worker.record_value(run_id, claim.token, 4, "now")
    assert len(step_rows(conn, run_id)) == 4


# ---------------------------------------------------------------------------
# 3. pgflow.fire_timers, next_timer_in, advance_time
# ---------------------------------------------------------------------------


def test_fire_timers_fires_due_timers_earliest_first_up_to_its_limit(conn):
    minutes = [5, 1, 4, 2, 3, 60]
    runs = {m: start(conn, key=f"r{m}", delay=m * MINUTE) for m in minutes}
    set_clock(conn, 10 * MINUTE)

    def sleeping() -> set[int]:
        return {m for m, r in runs.items() if run_row(conn, r)["status"] == "sleeping"}

    with raises_sqlstate("PF002"):
        fire_timers(conn, 0)
    assert fire_timers(conn, 2) == 2
    assert sleeping() == {3, 4, 5, 60}
    assert fire_timers(conn, 2) == 2
    assert sleeping() == {5, 60}
    assert fire_timers(conn, 2) == 1  # the 60-minute one is not due
    assert sleeping() == {60}
    assert fire_timers(conn, 2) == 0
    assert [t["run_id"] for t in timer_rows(conn)] == [runs[60]]


def test_fire_timers_skips_a_run_locked_by_another_transaction_until_it_ends(dsn, conn, workers):
    worker = workers()
    first = start(conn, key="first", delay=MINUTE)
    second = start(conn, key="second", delay=2 * MINUTE)
    set_clock(conn, 5 * MINUTE)

    with psycopg.connect(dsn) as tx:
        tx.execute("select pgflow._lock_run(%s)", (first,))  # a transition of `first` in progress
        assert fire_timers(conn) == 1
        assert (run_row(conn, first)["status"], run_row(conn, second)["status"]) == ("sleeping", "pending")
        assert [t["run_id"] for t in timer_rows(conn)] == [first]
        assert next_timer_in(conn) < 0  # due, yet still there
        assert fire_timers(conn) == 0
        assert [c.run_id for c in worker.claim()] == [second]
        tx.rollback()

    assert fire_timers(conn) == 1
    assert run_row(conn, first)["status"] == "pending" and timer_rows(conn) == []
    assert worker.claim_one().run_id == first


def test_next_timer_in_counts_seconds_to_the_earliest_timer(conn):
    def real_now() -> datetime:
        return conn.execute("select statement_timestamp()").fetchone()[0]

    def assert_next_timer_in(seconds: float, timer_set_after: datetime) -> None:
        """``seconds`` at the timer's setting, less the real time passed since (measured)."""
        got = next_timer_in(conn)
        passed = (real_now() - timer_set_after).total_seconds()
        assert seconds - passed <= got <= seconds, (got, seconds, passed)

    assert next_timer_in(conn) is None
    later_set = real_now()
    start(conn, key="later", delay=2 * HOUR)
    assert_next_timer_in(2 * 3600, later_set)
    sooner_set = real_now()
    start(conn, key="sooner", delay=HOUR)
    assert_next_timer_in(3600, sooner_set)
    set_clock(conn, timedelta(minutes=90))  # the clock moved, nothing fired
    assert_next_timer_in(-1800, sooner_set)
    assert fire_timers(conn) == 1
    assert_next_timer_in(1800, later_set)
    assert advance_time(conn, HOUR) == 1
    assert next_timer_in(conn) is None


def test_a_new_timer_notifies_pgflow_timer_only_when_it_is_the_earliest(dsn, conn, workers):
    worker = workers()
    with listener(dsn, "pgflow_timer") as listen:
        start(conn, key="1h", delay=HOUR)
        assert received(listen, conn, "pgflow_timer") == [""]  # the first timer
        start(conn, key="2h", delay=2 * HOUR)
        start(conn, key="1h-again", delay=HOUR + SECOND)
        assert received(listen, conn, "pgflow_timer") == []
        start(conn, key="30m", delay=30 * MINUTE)
        assert received(listen, conn, "pgflow_timer") == [""]
        start(conn, key="no-delay")
        assert received(listen, conn, "pgflow_timer") == []

        # Sleeps and retry back-offs add their timers the same way.
        start(conn, key="flaky")
        sleeper, flaky = worker.claim(limit=2)
        assert worker.sleep(sleeper.run_id, sleeper.token, 0, "nap", duration=3 * HOUR) is True
        assert received(listen, conn, "pgflow_timer") == []
        assert worker.fail_step(flaky.run_id, flaky.token, 0, "flaky", initial=MINUTE,
                                max_delay=HOUR)[0] == "retry"
        assert received(listen, conn, "pgflow_timer") == [""]

        # Nothing notifies before its transaction commits.
        with psycopg.connect(dsn) as tx:
            start(tx, key="10s", delay=10 * SECOND)
            assert received(listen, conn, "pgflow_timer") == []
            tx.rollback()
        assert count(conn, "timers") == 6

        # advance_time always wakes the scheduler: the clock moved under it.
        assert advance_time(conn, timedelta(0)) == 0
        assert received(listen, conn, "pgflow_timer") == [""]


def test_advance_time_fires_every_due_timer_past_the_batch_size(dsn, conn):
    sleeping_runs(conn, 2500, MINUTE, timedelta(milliseconds=10))  # due within 1 min 25 s
    start(conn, key="later", delay=HOUR)
    assert count(conn, "timers") == 2501

    with listener(dsn, guards=["default"]) as listen:
        assert advance_time(conn, 2 * MINUTE) == 2500
        assert received(listen, conn, "pgflow_ready") == ["default"]  # once, for the queue
    statuses = dict(conn.execute("select status, count(*) from pgflow.runs group by status").fetchall())
    assert statuses == {"pending": 2500, "sleeping": 1}
    assert [t["kind"] for t in timer_rows(conn)] == ["start"] and len(waits(conn)) == 1
    with raises_sqlstate(BAD_ARGUMENT):
        advance_time(conn, -SECOND)
    assert advance_time(conn, HOUR) == 1


def test_advance_time_fires_all_other_due_timers_when_one_run_is_locked(dsn, conn):
    sleeping_runs(conn, 1500, MINUTE, timedelta(milliseconds=10))
    earliest = timer_rows(conn)[0]["run_id"]
    with psycopg.connect(dsn) as tx:
        tx.execute("select pgflow._lock_run(%s)", (earliest,))
        fired = advance_time(conn, 2 * MINUTE)
        left = conn.execute("select count(*) from pgflow.timers").fetchone()[0]
        tx.rollback()
    assert (fired, left) == (1499, 1)


# ---------------------------------------------------------------------------
# 4. Delayed starts
# ---------------------------------------------------------------------------


def test_a_delayed_start_sleeps_on_a_start_timer_until_it_fires(dsn, conn, workers):
    worker = workers(queues=("q",), workflows=(("wf", "1", "q"),))
    with listener(dsn) as listen:
        run_id = start(conn, queue="q", key="later", delay=HOUR)
        assert start(conn, queue="q", key="later", delay=2 * HOUR) == run_id  # idempotent
        assert received(listen, conn, "pgflow_ready") == []
        run = run_row(conn, run_id)
        assert (run["status"], run["lease_token"], run["started_at"]) == ("sleeping", 0, None)
        [timer] = timer_rows(conn)
        assert (timer["run_id"], timer["kind"], timer["seq"], timer["due_at"], timer["created_at"]) == (
            run_id, "start", None, run["available_at"], run["created_at"])
        assert run["available_at"] - run["created_at"] == HOUR
        [wait] = waits(conn)
        assert (wait["run_id"], wait["status"], wait["kind"], wait["seq"], wait["step"]) == (
            run_id, "sleeping", "start", None, None)

        # Business time passing is not enough: the timer must fire.
        set_clock(conn, 2 * HOUR)
        assert worker.claim() == []
        assert fire_timers(conn) == 1
        assert received(listen, conn, "pgflow_ready") == ["q"]
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_token"]) == ("pending", 0)
    assert timer_rows(conn) == [] and waits(conn) == []

    claim = worker.claim_one()
    assert (claim.run_id, claim.token, claim.journal) == (run_id, 1, [])
    assert run_row(conn, run_id)["started_at"] >= timer["due_at"]


# ---------------------------------------------------------------------------
# 5. pgflow.retry
# ---------------------------------------------------------------------------


def test_retry_resumes_a_failed_run_from_its_last_checkpoint(dsn, conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    worker.complete_step(run_id, claim.token, 0, "reserve", output={"slot": 3})
    # seq 1 failed, the workflow caught it and went on: it is not at the end, so it stays.
    assert worker.fail_step(run_id, claim.token, 1, "notify", retryable=False)[0] == "failed"
    worker.complete_step(run_id, claim.token, 2, "compensate")
    # seq 3 fails after two attempts (one back-off), seq 4 at once; then the workflow raises.
    assert worker.fail_step(run_id, claim.token, 3, "charge", max_attempts=2)[0] == "retry"
    assert advance_time(conn, 2 * SECOND) == 1
    claim = worker.claim_one()
    assert worker.fail_step(run_id, claim.token, 3, "charge", max_attempts=2)[:2] == ("failed", 2)
    assert worker.fail_step(run_id, claim.token, 4, "refund", retryable=False)[0] == "failed"
    worker.fail_run(run_id, claim.token)
    failed = run_row(conn, run_id)
    history = attempt_rows(conn, run_id)
    assert [(a["seq"], a["attempt"]) for a in history] == [(1, 1), (3, 1), (3, 2), (4, 1)]

    with listener(dsn) as listen:
        conn.execute("select pgflow.retry(%s)", (run_id,))
        assert received(listen, conn, "pgflow_ready") == ["default"]
    run = run_row(conn, run_id)
    assert (run["status"], run["error"], run["output"], run["finished_at"], run["lease_owner"]) == (
        "pending", None, None, None, None)
    assert run["lease_token"] == failed["lease_token"] + 1
    assert [(s["seq"], s["status"]) for s in step_rows(conn, run_id)] == [
        (0, "completed"), (1, "failed"), (2, "completed")]
    assert attempt_rows(conn, run_id) == history  # what went wrong stays on record

    with raises_sqlstate(LEASE_LOST):  # the lease of the failed attempt stays dead
        worker.complete_step(run_id, claim.token, 3, "charge")
    claim = worker.claim_one()
    assert claim.token == failed["lease_token"] + 2
    assert [(e["seq"], e["name"], e["status"]) for e in claim.journal] == [
        (0, "reserve", "completed"), (1, "notify", "failed"), (2, "compensate", "completed")]
    assert claim.journal[0]["output"] == {"slot": 3}
    worker.complete_step(run_id, claim.token, 3, "charge", output="paid")
    worker.complete_run(run_id, claim.token, "ok")
    assert run_row(conn, run_id)["status"] == "completed"
    assert step_rows(conn, run_id)[3]["attempts"] == 1

    with raises_sqlstate(WRONG_STATE):  # completed
        conn.execute("select pgflow.retry(%s)", (run_id,))
    assert run_row(conn, run_id)["status"] == "completed"


def test_retry_deletes_nothing_when_the_journal_does_not_end_in_a_failure(conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    worker.complete_step(run_id, claim.token, 0, "a")
    worker.fail_step(run_id, claim.token, 1, "b", retryable=False)
    worker.complete_step(run_id, claim.token, 2, "c")
    worker.fail_run(run_id, claim.token, ERROR)  # the workflow raised outside any step
    before = step_rows(conn, run_id)
    conn.execute("select pgflow.retry(%s)", (run_id,))
    assert step_rows(conn, run_id) == before
    assert run_row(conn, run_id)["status"] == "pending"


@pytest.mark.parametrize("state", ["pending", "running", "sleeping"])
def test_retry_is_only_for_failed_runs(conn, workers, state):
    worker = workers()
    run_id = start(conn, delay=HOUR if state == "sleeping" else None)
    if state == "running":
        worker.claim_one()
    before = run_row(conn, run_id)
    assert before["status"] == state
    with raises_sqlstate(WRONG_STATE):
        conn.execute("select pgflow.retry(%s)", (run_id,))
    assert run_row(conn, run_id) == before
    with raises_sqlstate(UNKNOWN_RUN):
        conn.execute("select pgflow.retry(%s)", (uuid.uuid4(),))


# ---------------------------------------------------------------------------
# 6. The scheduler's plans: independent of how many runs sleep
# ---------------------------------------------------------------------------

def due_timers(conn: Conn, now: str, limit: str) -> str:
    """pgflow.fire_timers' candidate query as installed: the due timers, earliest first."""
    return schema.procedure_query(conn, "pgflow.fire_timers", "due", {"v_now": now, "p_limit": limit})



def assert_uses_timers_due(conn: Conn, explain: str) -> dict[str, Any]:
    return assert_plan_uses(conn, explain, "timers", "timers_due")


@pytest.mark.slow
def test_fire_timers_reads_only_the_due_timers_among_100k_sleeping_runs(dsn, conn):
    conn.execute("""
        with sleeping as (
            insert into pgflow.runs (name, version, queue, status, input, created_at, available_at)
            select 'wf', '1', 'default', 'sleeping', '[]', now(),
                   now() + interval '1 day' + g * interval '1 s'
            from generate_series(1, 100000) g
            returning id, available_at)
        insert into pgflow.timers (run_id, kind, due_at, created_at)
        select id, 'start', available_at, now() from sleeping""")
    due = {start(conn, key=f"due-{i}", delay=(i + 1) * SECOND) for i in range(3)}
    conn.execute("analyze pgflow.timers")
    conn.execute("analyze pgflow.runs")
    set_clock(conn, MINUTE)

    assert_uses_timers_due(
        conn, "explain (format json) " + due_timers(conn, now="pgflow.now()", limit="1000"))
    plan = assert_uses_timers_due(
        conn, "explain (analyze, format json) " + due_timers(conn, now="pgflow.now()", limit="1000"))
    assert plan["Actual Rows"] == 3
    # Inside pgflow.fire_timers, PL/pgSQL may end up with a generic plan: check that one too.
    conn.execute("prepare due(timestamptz, integer) as " + due_timers(conn, now="$1", limit="$2"))
    conn.execute("set plan_cache_mode = force_generic_plan")
    assert_uses_timers_due(conn, "explain (format json) execute due(pgflow.now(), 1000)")
    conn.execute("reset plan_cache_mode")

    with psycopg.connect(dsn) as tx:
        assert fire_timers(tx) == 3
        timers, runs = table_stats(tx, "timers"), table_stats(tx, "runs")
        tx.commit()
    # the work done, counted (not timed): no scan, a few index fetches for 3 of 100,000
    assert (timers["seq_scan"], runs["seq_scan"]) == (0, 0), (timers, runs)
    assert timers["idx_tup_fetch"] + runs["idx_tup_fetch"] < 50, (timers, runs)
    assert {r for (r,) in conn.execute("select id from pgflow.runs where status = 'pending'")} == due
    assert count(conn, "timers") == 100000


@pytest.mark.slow
def test_adding_a_timer_does_not_read_every_timer(dsn, conn):
    conn.execute("""
        insert into pgflow.timers (run_id, kind, seq, due_at, created_at)
        select gen_random_uuid(), 'sleep', 0, now() + interval '1 day' + g * interval '1 s', now()
        from generate_series(1, 100000) g""")
    conn.execute("analyze pgflow.timers")
    with psycopg.connect(dsn) as tx:
        for i in range(10, 0, -1):  # each the new earliest timer
            start(tx, key=f"soon-{i}", delay=i * SECOND)
        for i in range(10):  # none the earliest
            start(tx, key=f"later-{i}", delay=2 * HOUR)
        timers = table_stats(tx, "timers")
        tx.commit()
    assert count(conn, "timers") == 100020
    assert timers["seq_tup_read"] < 1000, timers
