"""The engine's SQL procedures, called directly: each test is a state-machine script.

No Python worker: a :class:`~tests.support.sqlkit.Worker` is only a registered row,
its liveness lock (held on its own ``listener`` connection) and thin wrappers
around ``pgflow.claim`` and the fenced reports (see ``tests/support/sqlkit.py``).
Everything runs on the real PostgreSQL of ``conftest.py``, one fresh database
a test. Durable timers (sleep, delayed starts, retry back-offs) have their own
scripts in ``test_sql_timers.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from pgflow import schema
from tests.support.helpers import wait_for
from tests.support.sqlkit import (
    BAD_ARGUMENT,
    CHECK_VIOLATION,
    DUPLICATE_CHECKPOINT,
    ERROR,
    KEY_CONFLICT,
    LEASE_LOST,
    SECOND,
    STEP_DURATION,
    UNKNOWN_RUN,
    WORKER_UNKNOWN,
    Conn,
    Worker,
    advance_time,
    assert_plan_uses,
    attempt_rows,
    count,
    engine_now,
    fire_timers,
    listener,
    load_finished_runs,
    plan_nodes,
    raises_sqlstate,
    received,
    recover,
    run_row,
    set_clock,
    start,
    step_rows,
    timer_rows,
    worker_factory,
)


@pytest.fixture
def workers(dsn: str) -> Iterator[Callable[..., Worker]]:
    """``workers()`` registers a new :class:`Worker`; all are closed at teardown."""
    with worker_factory(dsn) as make:
        yield make


# ---------------------------------------------------------------------------
# 1. pgflow.start
# ---------------------------------------------------------------------------


def test_start_returns_a_uuid_and_a_pending_run_stamped_by_the_engine_clock(conn):
    set_clock(conn, timedelta(days=3))
    row = conn.execute("select pgflow.start('wf', '[1, 2]'::jsonb, version => '1'), pgflow.now()"
                       ).fetchone()
    run_id, engine_time = row
    assert isinstance(run_id, uuid.UUID)

    run = run_row(conn, run_id)
    assert run["status"] == "pending"
    assert run["created_at"] == run["available_at"] == engine_time
    assert (run["name"], run["version"], run["queue"], run["input"]) == ("wf", "1", "default", [1, 2])
    assert (run["priority"], run["lease_token"], run["lease_owner"]) == (0, 0, None)
    assert run["started_at"] is None and run["finished_at"] is None

    db_time = conn.execute("select now()").fetchone()[0]
    assert run["created_at"] - db_time > timedelta(days=2, hours=23)


def test_start_with_the_same_key_twice_returns_the_same_run(conn):
    first = start(conn, key="order-1", input=[1])
    second = start(conn, key="order-1", input=[2])
    assert first == second
    assert count(conn, "runs") == 1
    assert run_row(conn, first)["input"] == [1]


def test_start_with_a_key_taken_by_another_workflow_is_a_key_conflict(conn):
    start(conn, "wf", key="order-1")
    with raises_sqlstate(KEY_CONFLICT):
        start(conn, "other", key="order-1")
    assert count(conn, "runs") == 1


@pytest.mark.parametrize(("name", "input", "named"), [
    pytest.param("", [], {}, id="empty-name"),
    pytest.param("   ", [], {}, id="blank-name"),
    pytest.param(None, [], {}, id="null-name"),
    pytest.param("wf", Jsonb(5), {}, id="number-input"),
    pytest.param("wf", Jsonb("text"), {}, id="string-input"),
    pytest.param("wf", None, {}, id="null-input"),
    pytest.param("wf", [], {"delay": -SECOND}, id="negative-delay"),
])
def test_start_rejects_bad_arguments(conn, name, input, named):
    with raises_sqlstate(BAD_ARGUMENT):
        start(conn, name, input, **named)
    assert count(conn, "runs") == 0


def test_start_of_an_unknown_workflow_without_version_is_refused(conn):
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        start(conn, "nobody-runs-this", version=None)
    assert exc.value.diag.message_primary.startswith("unknown workflow")
    assert count(conn, "runs") == 0


def test_start_without_version_picks_the_newest_registered_version_and_its_queue(conn, workers):
    workers(queues=("q1",), workflows=(("wf", "1", "q1"),))
    workers(queues=("q2",), workflows=(("wf", "2", "q2"), ("other", "7", "q2")))

    newest = run_row(conn, start(conn, "wf", version=None))
    assert (newest["version"], newest["queue"]) == ("2", "q2")
    pinned = run_row(conn, start(conn, "wf", version="1"))
    assert (pinned["version"], pinned["queue"]) == ("1", "q1")
    overridden = run_row(conn, start(conn, "wf", version=None, queue="urgent"))
    assert (overridden["version"], overridden["queue"]) == ("2", "urgent")
    unregistered_version = run_row(conn, start(conn, "wf", version="9"))
    assert (unregistered_version["version"], unregistered_version["queue"]) == ("9", "default")

    # A worker still running version 1 announces it again: version 2 stays the newest.
    workers(queues=("q1",), workflows=(("wf", "1", "q1"),))
    again = run_row(conn, start(conn, "wf", version=None))
    assert (again["version"], again["queue"]) == ("2", "q2")


def test_start_without_version_prefers_a_version_that_a_live_worker_serves(conn, workers):
    workers(workflows=(("wf", "1", "default"),))
    rolled_back = workers(workflows=(("wf", "2", "default"),))
    assert run_row(conn, start(conn, "wf", version=None))["version"] == "2"
    # Version 2 was rolled back: its last worker is gone. New runs go to version 1 again.
    rolled_back.lose_liveness_lock()
    conn.execute("select pgflow.recover()")
    assert run_row(conn, start(conn, "wf", version=None))["version"] == "1"


def test_start_accepts_the_named_argument_call_form(conn):
    run_id = conn.execute("select pgflow.start('x', '[\"a\"]'::jsonb, key => 'k', version => '1')"
                          ).fetchone()[0]
    again = conn.execute("select pgflow.start('x', '[\"b\"]'::jsonb, key => 'k', version => '1')"
                         ).fetchone()[0]
    assert again == run_id
    run = run_row(conn, run_id)
    assert (run["name"], run["version"], run["key"], run["input"]) == ("x", "1", "k", ["a"])
    prioritized = conn.execute(
        "select pgflow.start('x', version => '1', priority => 7, queue => 'q')").fetchone()[0]
    run = run_row(conn, prioritized)
    assert (run["priority"], run["queue"], run["input"]) == (7, "q", [])


def test_start_notifies_pgflow_ready_with_the_queue_only_after_commit(dsn, conn):
    listen = listener(dsn, guards=["emails"])
    with listen, psycopg.connect(dsn) as tx:
        start(tx, queue="emails")
        assert received(listen, conn, "pgflow_ready") == [], "notified before commit"
        tx.commit()
        assert received(listen, conn, "pgflow_ready") == ["emails"]

        start(tx, queue="emails")
        tx.rollback()
        assert received(listen, conn, "pgflow_ready") == [], "a rolled back start notified"

        start(conn, queue="emails", delay=timedelta(hours=1))
        assert received(listen, conn, "pgflow_ready") == [], "a delayed run notified"
        start(conn, queue="emails", delay=timedelta(0))
        assert received(listen, conn, "pgflow_ready") == ["emails"]


# ---------------------------------------------------------------------------
# 2. pgflow.claim
# ---------------------------------------------------------------------------


def test_claim_by_an_unregistered_worker_is_refused(conn):
    start(conn)
    with raises_sqlstate(WORKER_UNKNOWN):
        conn.execute("select * from pgflow.claim(%s, array['default'], array['wf'], array['1'], 10)",
                     (uuid.uuid4(),))
    assert conn.execute("select count(*) from pgflow.runs where status <> 'pending'").fetchone()[0] == 0


def test_claim_takes_only_its_queues_and_its_name_version_pairs(conn, workers):
    worker = workers(workflows=(("wf", "1", "default"), ("other", "2", "default")))
    wanted = {start(conn, "wf", version="1"), start(conn, "other", version="2")}
    unwanted = [
        start(conn, "wf", version="2"),                  # known name, unknown version
        start(conn, "other", version="1"),               # the crossed pair
        start(conn, "stranger", version="1"),            # unknown name
        start(conn, "wf", version="1", queue="elsewhere"),  # another queue
    ]

    claimed = worker.claim()
    assert {c.run_id for c in claimed} == wanted
    assert all(run_row(conn, r)["status"] == "pending" for r in unwanted)
    assert worker.claim() == []

    elsewhere = worker.claim_one(queues=["elsewhere"])
    assert elsewhere.run_id == unwanted[3]


def test_claim_orders_by_priority_then_availability_and_respects_the_limit(conn, workers):
    worker = workers()
    set_clock(conn, -3 * timedelta(minutes=1))
    low_oldest = start(conn, priority=0)
    set_clock(conn, -2 * timedelta(minutes=1))
    high_older = start(conn, priority=10)
    set_clock(conn, -timedelta(minutes=1))
    low_newest = start(conn, priority=0)
    high_newest = start(conn, priority=10)
    negative = start(conn, priority=-5)
    set_clock(conn, timedelta(0))

    assert {c.run_id for c in worker.claim(limit=2)} == {high_older, high_newest}
    assert [c.run_id for c in worker.claim(limit=1)] == [low_oldest]
    assert [c.run_id for c in worker.claim(limit=1)] == [low_newest]
    assert [c.run_id for c in worker.claim(limit=5)] == [negative]
    assert worker.claim(limit=5) == []


def test_claim_one_at_a_time_follows_priority_then_availability(conn, workers):
    worker = workers()
    expected = []
    for minutes_ago, priority in [(1, 0), (5, 3), (2, 3), (9, 0), (3, 1)]:
        set_clock(conn, -minutes_ago * timedelta(minutes=1))
        expected.append((priority, -minutes_ago, start(conn, priority=priority)))
    set_clock(conn, timedelta(0))
    expected.sort(key=lambda e: (-e[0], e[1]))
    assert [worker.claim_one(limit=1).run_id for _ in expected] == [e[2] for e in expected]


def test_a_delayed_run_is_claimed_only_once_its_start_timer_fires(conn, workers):
    worker = workers()
    run_id = start(conn, delay=timedelta(hours=1))
    run = run_row(conn, run_id)
    assert run["status"] == "sleeping"
    assert run["available_at"] - run["created_at"] == timedelta(hours=1)
    [timer] = timer_rows(conn)
    assert (timer["run_id"], timer["kind"], timer["seq"], timer["due_at"]) == (
        run_id, "start", None, run["available_at"])

    assert worker.claim() == []
    assert advance_time(conn, timedelta(minutes=59)) == 0
    assert worker.claim() == []
    assert run_row(conn, run_id)["status"] == "sleeping"
    # Moving the clock alone wakes nothing: only a fired timer makes the run claimable.
    set_clock(conn, timedelta(hours=2))
    assert worker.claim() == []
    assert fire_timers(conn) == 1
    assert timer_rows(conn) == []
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_token"]) == ("pending", 0)
    # in line from when it was due (not when it fired late), behind nobody started after it
    assert run["available_at"] - run["created_at"] == timedelta(hours=1)
    assert worker.claim_one().run_id == run_id
    assert run_row(conn, run_id)["status"] == "running"


def test_claim_returns_the_journal_ordered_by_seq(conn, workers):
    worker = workers()
    run_id = start(conn, input={"order": 7})
    first = worker.claim_one()
    assert (first.run_id, first.name, first.version, first.input, first.journal) == (
        run_id, "wf", "1", {"order": 7}, [])

    worker.complete_step(run_id, first.token, 1, "reserve", output={"slot": 3})
    worker.complete_step(run_id, first.token, 0, "charge", output={"charge": "ch_1"})
    worker.complete_step(run_id, first.token, 2, "nap", output=None, kind="sleep")
    outcome, _, _ = worker.fail_step(run_id, first.token, 3, "email")
    assert outcome == "retry"

    assert advance_time(conn, 5 * SECOND) == 1
    second = worker.claim_one()
    assert second.run_id == run_id
    assert second.journal == [
        {"seq": 0, "name": "charge", "kind": "step", "status": "completed", "attempts": 1,
         "output": {"charge": "ch_1"}, "error": None},
        {"seq": 1, "name": "reserve", "kind": "step", "status": "completed", "attempts": 1,
         "output": {"slot": 3}, "error": None},
        {"seq": 2, "name": "nap", "kind": "sleep", "status": "completed", "attempts": 1,
         "output": None, "error": None},
        {"seq": 3, "name": "email", "kind": "step", "status": "retrying", "attempts": 1,
         "output": None, "error": ERROR},
    ]


def test_lease_token_increments_on_each_claim(conn, workers):
    worker = workers()
    run_id = start(conn)
    assert run_row(conn, run_id)["lease_token"] == 0

    tokens = []
    for _ in range(3):
        claim = worker.claim_one()
        tokens.append(claim.token)
        assert run_row(conn, run_id)["lease_token"] == claim.token
        worker.release_run(run_id, claim.token)
        # release gives the run back without bumping the token: the next claim does.
        assert run_row(conn, run_id)["lease_token"] == claim.token
    assert tokens == [1, 2, 3]

    claim = worker.claim_one()
    assert worker.fail_step(run_id, claim.token, 0, "flaky")[0] == "retry"
    assert run_row(conn, run_id)["lease_token"] == 4  # sleeping on the back-off: no bump
    assert advance_time(conn, 2 * SECOND) == 1
    assert run_row(conn, run_id)["lease_token"] == 4  # nor when its timer fires
    assert worker.claim_one().token == 5

    other = start(conn, key="other")  # each run has its own counter
    assert worker.claim_one().run_id == other
    assert run_row(conn, other)["lease_token"] == 1


def test_release_run_puts_the_run_back_at_once_and_wakes_its_queue(dsn, conn, workers):
    worker = workers(queues=("mail",), workflows=(("wf", "1", "mail"),))
    run_id = start(conn, queue="mail")
    claim = worker.claim_one()
    worker.complete_step(run_id, claim.token, 0, "first")
    set_clock(conn, timedelta(minutes=5))
    with listener(dsn) as listen:
        worker.release_run(run_id, claim.token)
        assert received(listen, conn, "pgflow_ready") == ["mail"]
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("pending", None, claim.token)
    assert run["available_at"] - run["created_at"] >= timedelta(minutes=5)
    again = worker.claim_one()
    assert (again.token, [e["name"] for e in again.journal]) == (claim.token + 1, ["first"])


def test_concurrent_claims_in_open_transactions_never_share_a_run(dsn, conn, workers):
    a, b = workers(), workers()
    runs = {start(conn, key=f"r{i}") for i in range(6)}
    with psycopg.connect(dsn) as tx_a, psycopg.connect(dsn) as tx_b:
        tx_b.execute("set lock_timeout = '5s'")
        tx_b.commit()
        claimed_a = {c.run_id for c in a.claim(limit=3, via=tx_a)}  # tx A stays open
        claimed_b = {c.run_id for c in b.claim(limit=10, via=tx_b)}  # skips A's locked rows
        assert len(claimed_a) == 3
        assert claimed_a.isdisjoint(claimed_b)
        assert claimed_a | claimed_b == runs
        tx_b.commit()
        tx_a.commit()

    owners = dict(conn.execute("select id, lease_owner from pgflow.runs").fetchall())
    assert {owners[r] for r in claimed_a} == {a.id}
    assert {owners[r] for r in claimed_b} == {b.id}


# ---------------------------------------------------------------------------
# 3. Fencing
# ---------------------------------------------------------------------------

REPORTS: dict[str, Callable[[Worker, uuid.UUID, int], None]] = {
    "complete_step": lambda w, run, token: w.complete_step(run, token, 1, "second"),
    "fail_step": lambda w, run, token: w.fail_step(run, token, 1, "second"),
    "complete_run": lambda w, run, token: w.complete_run(run, token),
    "fail_run": lambda w, run, token: w.fail_run(run, token),
    "release_run": lambda w, run, token: w.release_run(run, token),
}


@pytest.mark.parametrize("report", list(REPORTS))
def test_a_report_with_a_stale_lease_token_is_refused_and_writes_nothing(conn, workers, report):
    a, b = workers(), workers()
    run_id = start(conn)
    old = a.claim_one()
    a.complete_step(run_id, old.token, 0, "first")
    a.release_run(run_id, old.token)
    current = b.claim_one()
    assert current.token == old.token + 1

    before_run, before_steps = run_row(conn, run_id), step_rows(conn, run_id)
    with raises_sqlstate(LEASE_LOST):
        REPORTS[report](a, run_id, old.token)
    assert run_row(conn, run_id) == before_run
    assert step_rows(conn, run_id) == before_steps
    assert before_run["status"] == "running" and before_run["lease_owner"] == b.id

    REPORTS[report](b, run_id, current.token)  # the current holder's report goes through
    assert (run_row(conn, run_id), step_rows(conn, run_id)) != (before_run, before_steps)


@pytest.mark.parametrize("report", list(REPORTS))
def test_a_report_on_a_run_that_is_not_running_is_refused(conn, workers, report):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    worker.release_run(run_id, claim.token)
    before = run_row(conn, run_id)
    with raises_sqlstate(LEASE_LOST):
        REPORTS[report](worker, run_id, claim.token)  # token current, but the run is pending
    assert run_row(conn, run_id) == before
    assert count(conn, "steps") == 0

    with raises_sqlstate(UNKNOWN_RUN):
        REPORTS[report](worker, uuid.uuid4(), 1)


def test_a_recovered_run_fences_out_the_worker_that_lost_its_connection(conn, workers):
    a = workers()
    run_id = start(conn)
    claim_a = a.claim_one()
    a.complete_step(run_id, claim_a.token, 0, "first")

    a.lose_liveness_lock()  # ca closed: A's session advisory lock vanishes with it
    assert recover(conn) == 1
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("pending", None, claim_a.token + 1)
    assert count(conn, "workers") == 0

    b = workers()
    claim_b = b.claim_one()
    assert claim_b.token == claim_a.token + 2
    assert [e["name"] for e in claim_b.journal] == ["first"]

    with raises_sqlstate(LEASE_LOST):
        a.complete_step(run_id, claim_a.token, 1, "second")  # A still has its other connection
    assert [s["seq"] for s in step_rows(conn, run_id)] == [0]
    with raises_sqlstate(WORKER_UNKNOWN):
        a.claim()

    b.complete_step(run_id, claim_b.token, 1, "second")
    b.complete_run(run_id, claim_b.token, {"ok": True})
    run = run_row(conn, run_id)
    assert (run["status"], run["output"], run["lease_owner"]) == ("completed", {"ok": True}, None)
    assert [s["seq"] for s in step_rows(conn, run_id)] == [0, 1]


# ---------------------------------------------------------------------------
# 4. Checkpoints and back-off
# ---------------------------------------------------------------------------


def test_a_step_is_checkpointed_once(conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    worker.complete_step(run_id, claim.token, 0, "charge", output={"id": 1})
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        worker.complete_step(run_id, claim.token, 0, "charge", output={"id": 2})
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        worker.fail_step(run_id, claim.token, 0, "charge")

    steps = step_rows(conn, run_id)
    assert [(s["status"], s["attempts"], s["output"]) for s in steps] == [("completed", 1, {"id": 1})]
    assert steps[0]["finished_at"] - steps[0]["started_at"] == timedelta(milliseconds=250)


def test_fail_step_backs_off_exponentially_then_gives_up(conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    created_at = run_row(conn, run_id)["created_at"]

    # attempt 1: the run sleeps on a retry timer due after p_initial (1 s)
    outcome, attempts, retry_at = worker.fail_step(run_id, claim.token, 0, "flaky")
    assert (outcome, attempts) == ("retry", 1)
    step, run = step_rows(conn, run_id)[0], run_row(conn, run_id)
    assert (step["status"], step["attempts"], step["error"]) == ("retrying", 1, ERROR)
    assert (run["status"], run["lease_owner"], run["available_at"]) == ("sleeping", None, created_at)
    assert retry_at == step["finished_at"] + SECOND
    assert [(t["run_id"], t["kind"], t["seq"], t["due_at"]) for t in timer_rows(conn)] == [
        (run_id, "retry", 0, retry_at)]
    assert worker.claim() == [], "claimed while sleeping on its back-off"
    assert fire_timers(conn) == 0, "the retry timer fired before its back-off elapsed"
    assert worker.claim() == []

    # attempt 2: retry after 1 s * 2
    assert advance_time(conn, 2 * SECOND) == 1
    assert timer_rows(conn) == []
    run = run_row(conn, run_id)
    assert run["status"] == "pending" and run["available_at"] >= retry_at
    assert step_rows(conn, run_id)[0]["status"] == "retrying"  # until the next attempt reports
    claim = worker.claim_one()
    assert claim.journal[0]["status"] == "retrying"
    outcome, attempts, retry_at = worker.fail_step(run_id, claim.token, 0, "flaky")
    assert (outcome, attempts) == ("retry", 2)
    step, run = step_rows(conn, run_id)[0], run_row(conn, run_id)
    assert (step["status"], step["attempts"]) == ("retrying", 2)
    assert run["status"] == "sleeping"
    assert retry_at == step["finished_at"] + 2 * SECOND
    assert [(t["kind"], t["seq"], t["due_at"]) for t in timer_rows(conn, run_id)] == [
        ("retry", 0, retry_at)]

    # attempt 3 of 3: failed; the run stays leased so the workflow can handle it
    assert advance_time(conn, 3 * SECOND) == 1
    claim = worker.claim_one()
    outcome, attempts, retry_at = worker.fail_step(run_id, claim.token, 0, "flaky")
    assert (outcome, attempts, retry_at) == ("failed", 3, None)
    step, run = step_rows(conn, run_id)[0], run_row(conn, run_id)
    assert (step["status"], step["attempts"], step["error"]) == ("failed", 3, ERROR)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("running", worker.id, claim.token)
    assert timer_rows(conn) == []

    # Every failed attempt is kept, with its own error and timings.
    history = attempt_rows(conn, run_id)
    assert [(a["seq"], a["attempt"], a["error"]) for a in history] == [(0, n, ERROR) for n in (1, 2, 3)]
    assert all(a["finished_at"] - a["started_at"] == STEP_DURATION for a in history)
    assert history[0]["finished_at"] < history[1]["finished_at"] < history[2]["finished_at"]
    assert history[2]["finished_at"] == step["finished_at"]

    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        worker.fail_step(run_id, claim.token, 0, "flaky")
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        worker.complete_step(run_id, claim.token, 0, "flaky")
    worker.complete_step(run_id, claim.token, 1, "compensate")  # the workflow carries on
    worker.fail_run(run_id, claim.token)
    assert run_row(conn, run_id)["status"] == "failed"


def test_fail_step_back_off_is_capped_at_p_max(conn, workers):
    worker = workers()
    run_id = start(conn)
    delays = []
    for _ in range(4):
        claim = worker.claim_one()
        outcome, _, retry_at = worker.fail_step(run_id, claim.token, 0, "flaky", max_attempts=5)
        assert outcome == "retry"
        delays.append(retry_at - step_rows(conn, run_id)[0]["finished_at"])
        assert [t["due_at"] for t in timer_rows(conn, run_id)] == [retry_at]
        assert advance_time(conn, 5 * SECOND) == 1
    assert delays == [SECOND, 2 * SECOND, 3 * SECOND, 3 * SECOND]
    claim = worker.claim_one()
    assert worker.fail_step(run_id, claim.token, 0, "flaky", max_attempts=5)[:2] == ("failed", 5)
    assert [a["attempt"] for a in attempt_rows(conn, run_id)] == [1, 2, 3, 4, 5]


def test_a_non_retryable_failure_fails_the_step_at_the_first_attempt(conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    outcome, attempts, retry_at = worker.fail_step(run_id, claim.token, 0, "charge", retryable=False)
    assert (outcome, attempts, retry_at) == ("failed", 1, None)
    assert step_rows(conn, run_id)[0]["status"] == "failed"
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("running", worker.id, claim.token)


def test_a_retrying_step_can_then_complete(conn, workers):
    worker = workers()
    run_id = start(conn)
    claim = worker.claim_one()
    assert worker.fail_step(run_id, claim.token, 0, "flaky")[0] == "retry"
    with raises_sqlstate(LEASE_LOST):  # the run sleeps on its back-off: the old lease is over
        worker.complete_step(run_id, claim.token, 0, "flaky")
    assert step_rows(conn, run_id)[0]["status"] == "retrying"

    assert advance_time(conn, 2 * SECOND) == 1
    claim = worker.claim_one()
    with raises_sqlstate(DUPLICATE_CHECKPOINT):  # same seq, another name: not the same call
        worker.complete_step(run_id, claim.token, 0, "not-flaky")
    worker.complete_step(run_id, claim.token, 0, "flaky", output={"took": 2})
    step = step_rows(conn, run_id)[0]
    assert (step["status"], step["attempts"], step["output"], step["error"]) == (
        "completed", 2, {"took": 2}, None)
    # Only the failed attempt is in the history; the successful one is the step row itself.
    assert [(a["attempt"], a["error"]) for a in attempt_rows(conn, run_id)] == [(1, ERROR)]
    worker.complete_run(run_id, claim.token, "ok")
    run = run_row(conn, run_id)
    assert (run["status"], run["output"], run["lease_owner"]) == ("completed", "ok", None)
    assert run["finished_at"] is not None


# ---------------------------------------------------------------------------
# 5. Liveness and recovery
# ---------------------------------------------------------------------------


def test_recover_deletes_a_worker_with_a_stale_heartbeat_and_puts_back_its_runs(dsn, conn, workers):
    live, frozen = workers(), workers()
    live_run, frozen_run = start(conn, key="live"), start(conn, key="frozen")
    live_claim = live.claim_one(limit=1)  # the older run
    frozen_claim = frozen.claim_one(limit=1)
    assert (live_claim.run_id, frozen_claim.run_id) == (live_run, frozen_run)

    set_clock(conn, timedelta(hours=2))  # business time never kills a worker
    assert recover(conn) == 0
    assert live.heartbeat() is True and frozen.heartbeat() is True
    assert count(conn, "workers") == 2

    conn.execute("update pgflow.workers set heartbeat_at = now() - interval '1 hour' where id = %s",
                 (frozen.id,))
    with listener(dsn) as listen:
        assert recover(conn, timedelta(seconds=30)) == 1
        assert received(listen, conn, "pgflow_ready") == ["default"]

    # The frozen worker still holds its liveness lock, yet it is declared dead.
    # pg_locks is cluster-wide: other databases' workers hold the same lock keys.
    assert conn.execute("select count(*) from pg_locks l join pg_database d on d.oid = l.database"
                        " where d.datname = current_database() and l.locktype = 'advisory'"
                        " and l.classid = 7366502 and l.objid = %s and l.granted",
                        (frozen.lock_key,)).fetchone()[0] == 1
    assert [r[0] for r in conn.execute("select id from pgflow.workers")] == [live.id]
    assert frozen.heartbeat() is False
    assert live.heartbeat() is True

    run = run_row(conn, frozen_run)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == (
        "pending", None, frozen_claim.token + 1)
    assert run["available_at"] <= engine_now(conn)
    run = run_row(conn, live_run)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("running", live.id, live_claim.token)

    with raises_sqlstate(WORKER_UNKNOWN):
        frozen.claim()
    with raises_sqlstate(LEASE_LOST):
        frozen.complete_run(frozen_run, frozen_claim.token)
    assert live.claim_one().run_id == frozen_run


def test_recover_notifies_every_queue_of_the_runs_it_puts_back(dsn, conn, workers):
    doomed = workers(queues=("q1", "q2"), workflows=(("wf", "1", "q1"),))
    for queue in ("q1", "q1", "q2"):
        start(conn, queue=queue)
    assert len(doomed.claim(queues=["q1", "q2"])) == 3
    doomed.lose_liveness_lock()
    with listener(dsn, guards=["q1", "q2"]) as listen:
        assert recover(conn) == 3
        assert sorted(received(listen, conn, "pgflow_ready")) == ["q1", "q2"]  # once each
    assert recover(conn) == 0


# ---------------------------------------------------------------------------
# 6. CHECK constraints: the state machine holds even against direct writes
# ---------------------------------------------------------------------------

VALID_RUN = {"name": "'wf'", "version": "'1'", "queue": "'default'", "input": "'[]'",
             "created_at": "now()", "available_at": "now()"}


def insert_row(conn: Conn, table: str, base: dict[str, str], **columns: str) -> None:
    """Insert one row directly; values are SQL expressions."""
    values = {**base, **columns}
    conn.execute(sql.SQL("insert into pgflow.{} ({}) values ({})").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(sql.SQL(v) for v in values.values())))


@pytest.mark.parametrize(("columns", "constraint"), [
    ({"status": "'completed'", "output": "'1'"}, "runs_finished_iff_final"),
    ({"status": "'failed'", "error": "'{}'"}, "runs_finished_iff_final"),
    ({"finished_at": "now()"}, "runs_finished_iff_final"),
    ({"status": "'running'"}, "runs_leased_iff_running"),
    ({"lease_owner": "gen_random_uuid()"}, "runs_leased_iff_running"),
    ({"status": "'completed'", "finished_at": "now()"}, "runs_completed_has_output"),
    ({"status": "'failed'", "finished_at": "now()"}, "runs_failed_has_error"),
    ({"status": "'done'"}, "runs_status_known"),
    ({"input": "'5'"}, "runs_input_shape"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_run_rows_that_break_the_state_machine_are_rejected(conn, columns, constraint):
    insert_row(conn, "runs", VALID_RUN)  # the base row is valid
    with raises_sqlstate(CHECK_VIOLATION) as exc:
        insert_row(conn, "runs", VALID_RUN, **columns)
    assert exc.value.diag.constraint_name == constraint
    assert count(conn, "runs") == 1


def test_updates_that_break_the_state_machine_are_rejected(conn, workers):
    worker = workers()
    run_id = start(conn)
    for assignment, constraint in [
        ("status = 'running'", "runs_leased_iff_running"),
        ("status = 'completed', output = '1'", "runs_finished_iff_final"),
        ("status = 'cancelled'", "runs_finished_iff_final"),
        ("input = '\"x\"'", "runs_input_shape"),
    ]:
        with raises_sqlstate(CHECK_VIOLATION) as exc:
            conn.execute(f"update pgflow.runs set {assignment} where id = %s", (run_id,))
        assert exc.value.diag.constraint_name == constraint
    assert run_row(conn, run_id)["status"] == "pending"

    claim = worker.claim_one()
    with raises_sqlstate(CHECK_VIOLATION) as exc:
        conn.execute("update pgflow.runs set lease_owner = null where id = %s", (run_id,))
    assert exc.value.diag.constraint_name == "runs_leased_iff_running"
    with raises_sqlstate(CHECK_VIOLATION) as exc:
        conn.execute("update pgflow.runs set status = 'failed', finished_at = now(), lease_owner = null"
                     " where id = %s", (run_id,))
    assert exc.value.diag.constraint_name == "runs_failed_has_error"
    worker.complete_run(run_id, claim.token)
    with raises_sqlstate(CHECK_VIOLATION) as exc:
        conn.execute("update pgflow.runs set status = 'pending' where id = %s", (run_id,))
    assert exc.value.diag.constraint_name == "runs_finished_iff_final"


VALID_STEP = {"run_id": "gen_random_uuid()", "seq": "0", "name": "'s'", "status": "'completed'",
              "started_at": "now()", "finished_at": "now()"}


@pytest.mark.parametrize(("columns", "constraint"), [
    ({"status": "'failed'"}, "steps_failure_has_error"),
    ({"status": "'retrying'"}, "steps_failure_has_error"),
    ({"status": "'skipped'", "error": "'{}'"}, "steps_status_known"),
    ({"seq": "-1"}, "steps_seq_positive"),
    ({"attempts": "0"}, "steps_attempts_positive"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_step_rows_that_break_the_state_machine_are_rejected(conn, columns, constraint):
    insert_row(conn, "steps", VALID_STEP)  # the base row is valid
    with raises_sqlstate(CHECK_VIOLATION) as exc:
        insert_row(conn, "steps", VALID_STEP, **columns)
    assert exc.value.diag.constraint_name == constraint
    assert count(conn, "steps") == 1


# ---------------------------------------------------------------------------
# 7. The claim's plan: independent of finished history
# ---------------------------------------------------------------------------

def candidates(conn: Conn, queues: str, now: str, names: str, versions: str, limit: str) -> str:
    """pgflow.claim's candidate query as installed: one ordered walk of runs_claimable per queue."""
    return schema.procedure_query(conn, "pgflow.claim_runs", "candidates", {
        "p_queues": queues, "v_now": now, "p_names": names, "p_versions": versions, "p_limit": limit})


def assert_uses_runs_claimable(conn: Conn, explain: str) -> dict[str, Any]:
    return assert_plan_uses(conn, explain, "runs", "runs_claimable")


@pytest.mark.slow
def test_the_claim_uses_the_claimable_index_whatever_the_history_and_sleepers(conn, workers):
    worker = workers()
    load_finished_runs(conn, 200_000)
    conn.execute("""
        insert into pgflow.runs (name, version, queue, status, input, created_at, available_at)
        select 'wf', '1', 'default', 'sleeping', '[]', now(), now() + interval '1 hour'
        from generate_series(1, 50000) g""")
    ready = {start(conn, key=f"ready-{i}") for i in range(3)}
    conn.execute("analyze pgflow.runs")

    one_queue = candidates(conn, queues="array['default']", now="pgflow.now()", names="array['wf']",
                           versions="array['1']", limit="10")
    assert_uses_runs_claimable(conn, "explain (format json) " + one_queue)
    # several queues: still one index walk each, no sort of the backlog
    two_queues = candidates(conn, queues="array['default', 'other']", now="pgflow.now()",
                                   names="array['wf']", versions="array['1']", limit="10")
    plan = assert_uses_runs_claimable(conn, "explain (format json) " + two_queues)
    assert not any(n["Node Type"] == "Seq Scan" for n in plan_nodes(plan))
    # Executed, it reads a small fraction of the table: none of the finished history.
    plan = assert_uses_runs_claimable(conn, "explain (analyze, buffers, format json) " + one_queue)
    assert plan["Actual Rows"] == 3
    pages = conn.execute("select relpages from pg_class where oid = 'pgflow.runs'::regclass").fetchone()[0]
    touched = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    assert touched < pages / 10, f"the candidate query read {touched} blocks; runs has {pages} pages"

    # Inside pgflow.claim, PL/pgSQL ends up with a generic plan: check that one too.
    conn.execute("prepare candidates(text[], timestamptz, text[], text[], integer) as " + candidates(
        conn, queues="$1", now="$2", names="$3", versions="$4", limit="$5"))
    conn.execute("set plan_cache_mode = force_generic_plan")
    assert_uses_runs_claimable(conn, "explain (format json) execute candidates("
                                     "array['default'], pgflow.now(), array['wf'], array['1'], 10)")
    conn.execute("reset plan_cache_mode")

    claimed = worker.claim(limit=10)
    assert {c.run_id for c in claimed} == ready
    assert all(c.token == 1 and c.journal == [] for c in claimed)
    assert worker.claim(limit=10) == []


# ---------------------------------------------------------------------------
# Regressions: a recover() racing a late report, and back-off overflow
# ---------------------------------------------------------------------------


def test_recover_racing_a_late_report_of_a_frozen_worker_does_not_deadlock(dsn, conn, workers):
    frozen = workers()
    run_id = start(conn)
    claim = frozen.claim_one()
    conn.execute("update pgflow.workers set heartbeat_at = now() - interval '1 hour'")

    with psycopg.connect(dsn) as report, psycopg.connect(dsn, autocommit=True) as recoverer, \
            ThreadPoolExecutor(1) as pool:
        # The frozen worker wakes up and reports: complete_run has taken the run's advisory lock
        # (its first statement) when recover() comes by ...
        report.execute("select pgflow._lock_run(%s)", (run_id,))
        recovering = pool.submit(recover, recoverer)
        pid = recoverer.info.backend_pid
        # ... and must neither deadlock nor wait: it skips the run for now.
        wait_for(lambda: recovering.done() or conn.execute(
            "select 1 from pg_locks where pid = %s and locktype = 'advisory' and not granted",
            (pid,)).fetchone(), timeout=60, what="recover() waiting for the run's lock")
        frozen.complete_run(run_id, claim.token, "late", via=report)  # updates the run row
        report.commit()
        assert recovering.result(timeout=60) == 0
    run = run_row(conn, run_id)
    assert (run["status"], run["output"]) == ("completed", "late")


def test_fail_step_back_off_stays_capped_after_many_attempts(conn, workers):
    worker = workers()
    run_id = start(conn)
    for attempt in range(1, 51):
        claim = worker.claim_one()
        outcome, attempts, retry_at = worker.fail_step(run_id, claim.token, 0, "flaky", max_attempts=100)
        assert (outcome, attempts) == ("retry", attempt)
        assert retry_at - step_rows(conn, run_id)[0]["finished_at"] == min(2 ** (attempt - 1), 3) * SECOND
        assert advance_time(conn, 5 * SECOND) == 1
    assert [a["attempt"] for a in attempt_rows(conn, run_id)] == list(range(1, 51))
