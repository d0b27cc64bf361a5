"""Interaction and composition in the engine's SQL, called directly: each test is a state-machine script.

Signals (``pgflow.signal``, ``pgflow.wait_signal``), published state
(``pgflow.set_state``), cancellation (``pgflow.cancel``, ``pgflow.cancel_run``),
children (``pgflow.start_child``, ``pgflow.wait_child``), parallel map
(``pgflow.map``) and ``pgflow.continue_as_new``. No Python worker: a
:class:`~tests.support.sqlkit.Worker` is a registered row plus thin wrappers, and the
procedures below are called as the worker would call them. The last section
races two connections against each other to check the lock rule (a finishing
child locks its parent's row, cancel cascades to children before it touches
the parent) against deadlocks and lost wake-ups. Helpers are in
``tests/support/sqlkit.py``; one fresh database a test (``conftest.py``).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.support.helpers import wait_for
from tests.support.sqlkit import (
    BAD_ARGUMENT,
    DUPLICATE_CHECKPOINT,
    ERROR,
    LEASE_LOST,
    STEP_DURATION,
    UNKNOWN_RUN,
    WRONG_STATE,
    Conn,
    Worker,
    advance_time,
    count,
    engine_now,
    is_blocked,
    listener,
    raises_sqlstate,
    received,
    run_row,
    set_clock,
    start,
    step_rows,
    timer_rows,
    wait_until_blocked,
    worker_factory,
)

HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
# The workflows every worker of this module announces: the parent, its children, map items.
WORKFLOWS = (("wf", "1", "default"), ("child", "1", "default"), ("item", "1", "items"))


@pytest.fixture
def workers(dsn: str) -> Iterator[Callable[..., Worker]]:
    """``workers()`` registers a new :class:`Worker` serving :data:`WORKFLOWS`."""
    with worker_factory(dsn) as make:
        def make_worker(**kw: Any) -> Worker:
            kw.setdefault("queues", ("default", "items"))
            kw.setdefault("workflows", WORKFLOWS)
            return make(**kw)
        yield make_worker


# --- thin wrappers around the procedures under test ------------------------------------


def call(conn: Conn, query: str, *params: Any) -> Any:
    """The single value ``query`` returns."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def lease(worker: Worker, run_id: uuid.UUID, via: Conn | None = None) -> int:
    """Claim exactly ``run_id`` (its workflow only, one run); return its lease token."""
    conn = via or worker.db
    name, version, queue = conn.execute(
        "select name, version, queue from pgflow.runs where id = %s", (run_id,)).fetchone()
    claim = worker.claim_one(limit=1, queues=[queue], pairs=[(name, version)], via=via)
    assert claim.run_id == run_id, f"claimed {claim.run_id}, not {run_id}"
    return claim.token


def claim_flags(worker: Worker, name: str = "wf",
                queue: str = "default") -> list[tuple[uuid.UUID, int, bool, int | None]]:
    """``pgflow.claim`` with its cancellation columns: [(run_id, token, cancel_requested, cancel_seq)]."""
    return worker.db.execute(
        "select run_id, lease_token, cancel_requested, cancel_seq"
        " from pgflow.claim(%s, array[%s], array[%s], array['1'], 10)",
        (worker.id, queue, name)).fetchall()


def checkpoint(worker: Worker, run_id: uuid.UUID, token: int, seq: int) -> bool:
    """``pgflow.complete_step``: its answer is whether cancellation was requested."""
    return call(worker.db, "select pgflow.complete_step(%s, %s, %s, 'step', 'step', %s, %s)",
                run_id, token, seq, Jsonb("ok"), STEP_DURATION)


def signal(conn: Conn, run_id: uuid.UUID, name: str | None, payload: Any = None) -> None:
    conn.execute("select pgflow.signal(%s, %s, %s)", (run_id, name, Jsonb(payload)))


def wait_signal(worker: Worker, run_id: uuid.UUID, token: int, seq: int, name: str,
                timeout: timedelta | None = None, via: Conn | None = None) -> tuple[str, Any]:
    """``pgflow.wait_signal`` -> (outcome, payload)."""
    row = (via or worker.db).execute(
        "select outcome, payload from pgflow.wait_signal(%s, %s, %s, %s, %s)",
        (run_id, token, seq, name, timeout)).fetchone()
    assert row is not None
    return row[0], row[1]


def set_state(worker: Worker, run_id: uuid.UUID, token: int, key: str | None, value: Any) -> bool:
    return call(worker.db, "select pgflow.set_state(%s, %s, %s, %s)", run_id, token, key,
                value if value is None else Jsonb(value))


def cancel(conn: Conn, run_id: uuid.UUID) -> bool:
    return call(conn, "select pgflow.cancel(%s)", run_id)


def cancel_run(worker: Worker, run_id: uuid.UUID, token: int) -> None:
    worker.db.execute("select pgflow.cancel_run(%s, %s)", (run_id, token))


def start_child(worker: Worker, run_id: uuid.UUID, token: int, seq: int, name: str = "child",
                input: Any = (), key: str | None = None, queue: str | None = "default",
                version: str | None = "1", timeout: timedelta | None = None) -> uuid.UUID:
    return call(worker.db, "select pgflow.start_child(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                run_id, token, seq, name, Jsonb(list(input) if isinstance(input, tuple) else input),
                key, queue, version, timeout)


def wait_child(worker: Worker, run_id: uuid.UUID, token: int, seq: int, child: uuid.UUID,
               via: Conn | None = None) -> Any:
    return call(via or worker.db, "select pgflow.wait_child(%s, %s, %s, %s)",
                run_id, token, seq, child)


def map_items(worker: Worker, run_id: uuid.UUID, token: int, seq: int, inputs: list[Any],
              name: str = "item", queue: str = "items") -> Any:
    """``pgflow.map``: null while the run waits, else the entry's outcome."""
    return call(worker.db, "select pgflow.map(%s, %s, %s, %s, %s, %s, '1')",
                run_id, token, seq, name, Jsonb(inputs), queue)


def continue_as_new(worker: Worker, run_id: uuid.UUID, token: int, input: Any,
                    via: Conn | None = None) -> uuid.UUID:
    return call(via or worker.db, "select pgflow.continue_as_new(%s, %s, %s)",
                run_id, token, Jsonb(input))


def signal_rows(conn: Conn, run_id: uuid.UUID) -> list[tuple[str, Any, int | None]]:
    """The run's mailbox, in sending order: [(name, payload, consumed_seq)]."""
    return conn.execute("select name, payload, consumed_seq from pgflow.signals"
                        " where run_id = %s order by id", (run_id,)).fetchall()


def entry(conn: Conn, run_id: uuid.UUID, seq: int) -> dict[str, Any]:
    row = conn.cursor(row_factory=dict_row).execute(
        "select * from pgflow.steps where run_id = %s and seq = %s", (run_id, seq)).fetchone()
    assert row is not None, f"run {run_id} has no journal entry {seq}"
    return row


def children(conn: Conn, parent: uuid.UUID) -> list[dict[str, Any]]:
    """The parent's child runs, map items in index order, others by creation."""
    return conn.cursor(row_factory=dict_row).execute(
        "select * from pgflow.runs where parent_id = %s"
        " order by parent_seq nulls first, parent_index, created_at, id", (parent,)).fetchall()


def outcome(run_id: uuid.UUID, status: str, output: Any = None, error: Any = None) -> dict[str, Any]:
    """A child's outcome as the parent's journal records it."""
    return {"run_id": str(run_id), "status": status, "output": output, "error": error}


def kinds(timers: list[dict[str, Any]]) -> list[str]:
    return sorted(t["kind"] for t in timers)


def started_parent(conn: Conn, worker: Worker, **kw: Any) -> tuple[uuid.UUID, int]:
    """A new 'wf' run, claimed by ``worker``: (run_id, token)."""
    run_id = start(conn, **kw)
    return run_id, lease(worker, run_id)


# ---------------------------------------------------------------------------
# 1. Signals
# ---------------------------------------------------------------------------


def test_signal_to_an_unknown_or_finished_run_or_without_a_name_is_refused(conn, workers):
    worker = workers()
    with raises_sqlstate(UNKNOWN_RUN) as exc:
        signal(conn, uuid.uuid4(), "go")
    assert "unknown run" in str(exc.value)

    run_id = start(conn)
    for bad in ("", "   ", None):
        with raises_sqlstate(BAD_ARGUMENT):
            signal(conn, run_id, bad)

    token = lease(worker, run_id)
    worker.complete_run(run_id, token)
    failed, failed_token = started_parent(conn, worker)
    worker.fail_run(failed, failed_token)
    cancelled = start(conn)
    assert cancel(conn, cancelled) is True
    for finished, status in ((run_id, "completed"), (failed, "failed"), (cancelled, "cancelled")):
        with raises_sqlstate(WRONG_STATE) as exc:
            signal(conn, finished, "go")
        assert status in str(exc.value)
    assert count(conn, "signals") == 0


def test_signals_sent_before_any_wait_stay_in_the_mailbox(dsn, conn, workers):
    worker = workers()
    # In the transaction that starts the run: the run and its signals commit together.
    with psycopg.connect(dsn) as tx:
        run_id = start(tx)
        signal(tx, run_id, "approve", {"by": "ann"})
        signal(tx, run_id, "approve", None)
        signal(tx, run_id, "note", [1, 2])
    assert signal_rows(conn, run_id) == [("approve", {"by": "ann"}, None), ("approve", None, None),
                                         ("note", [1, 2], None)]
    assert run_row(conn, run_id)["status"] == "pending"
    assert step_rows(conn, run_id) == []

    # A running run that waits for nothing keeps its signals queued and keeps running.
    token = lease(worker, run_id)
    signal(conn, run_id, "approve", 3)
    assert run_row(conn, run_id)["status"] == "running"
    assert [consumed for _, _, consumed in signal_rows(conn, run_id)] == [None] * 4
    assert step_rows(conn, run_id) == []
    assert checkpoint(worker, run_id, token, 0) is False


def test_wait_signal_takes_the_oldest_of_its_name_each_once(conn, workers):
    worker = workers()
    run_id = start(conn)
    for i in range(5):
        signal(conn, run_id, "a", {"n": i})
        if i == 2:
            signal(conn, run_id, "b", "other")
    token = lease(worker, run_id)

    assert [wait_signal(worker, run_id, token, seq, "a") for seq in range(5)] == [
        ("received", {"n": i}) for i in range(5)]
    assert signal_rows(conn, run_id) == [
        ("a", {"n": 0}, 0), ("a", {"n": 1}, 1), ("a", {"n": 2}, 2), ("b", "other", None),
        ("a", {"n": 3}, 3), ("a", {"n": 4}, 4)]
    assert [(s["seq"], s["name"], s["kind"], s["status"], s["output"])
            for s in step_rows(conn, run_id)] == [
        (i, "a", "signal", "completed", {"payload": {"n": i}}) for i in range(5)]
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"]) == ("running", worker.id)

    # The mailbox of 'a' is empty now: the next wait suspends; 'b' is untouched.
    assert wait_signal(worker, run_id, token, 5, "a") == ("waiting", None)
    assert signal_rows(conn, run_id)[3] == ("b", "other", None)


def test_a_wait_with_nothing_queued_suspends_until_a_signal_delivers_and_wakes(dsn, conn, workers):
    worker = workers()
    run_id, token = started_parent(conn, worker)
    worker.complete_step(run_id, token, 0)

    assert wait_signal(worker, run_id, token, 1, "approve") == ("waiting", None)
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("waiting", None, token)
    wait = entry(conn, run_id, 1)
    assert (wait["name"], wait["kind"], wait["status"], wait["output"]) == (
        "approve", "signal", "waiting", {"timeout": None})
    assert timer_rows(conn, run_id) == []
    with raises_sqlstate(LEASE_LOST):
        worker.complete_step(run_id, token, 2)
    assert worker.claim() == []

    with listener(dsn) as listen:
        signal(conn, run_id, "other", 1)  # not what it waits for: queued, no wake-up
        assert run_row(conn, run_id)["status"] == "waiting"
        assert entry(conn, run_id, 1)["status"] == "waiting"
        assert received(listen, conn, "pgflow_ready") == []

        signal(conn, run_id, "approve", {"ok": True})
        assert received(listen, conn, "pgflow_ready") == ["default"]
    wait = entry(conn, run_id, 1)
    assert (wait["status"], wait["output"]) == ("completed", {"payload": {"ok": True}})
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"]) == ("pending", None)
    assert signal_rows(conn, run_id) == [("other", 1, None), ("approve", {"ok": True}, 1)]

    # Replay meets the wait again and gets the same signal.
    [claim] = worker.claim()
    assert (claim.run_id, claim.token) == (run_id, token + 1)
    assert [(e["seq"], e["kind"], e["status"]) for e in claim.journal] == [
        (0, "step", "completed"), (1, "signal", "completed")]
    assert wait_signal(worker, run_id, claim.token, 1, "approve") == ("received", {"ok": True})
    assert run_row(conn, run_id)["status"] == "running"


def test_a_wait_with_a_timeout_times_out_when_the_clock_passes_it(dsn, conn, workers):
    worker = workers()
    run_id, token = started_parent(conn, worker)
    before = engine_now(conn)
    assert wait_signal(worker, run_id, token, 0, "approve", timeout=HOUR) == ("waiting", None)
    [timer] = timer_rows(conn, run_id)
    assert (timer["kind"], timer["seq"]) == ("signal", 0)
    assert before + HOUR <= timer["due_at"] <= engine_now(conn) + HOUR
    assert entry(conn, run_id, 0)["output"] == {"timeout": "01:00:00"}

    assert advance_time(conn, 59 * MINUTE) == 0
    assert run_row(conn, run_id)["status"] == "waiting"
    with listener(dsn) as listen:
        assert advance_time(conn, 2 * MINUTE) == 1
        assert received(listen, conn, "pgflow_ready") == ["default"]
    wait = entry(conn, run_id, 0)
    assert (wait["status"], wait["output"]) == ("completed", {"timed_out": True})
    run = run_row(conn, run_id)
    assert (run["status"], run["available_at"]) == ("pending", timer["due_at"])
    assert timer_rows(conn, run_id) == []

    token = lease(worker, run_id)
    assert wait_signal(worker, run_id, token, 0, "approve", timeout=HOUR) == ("timed_out", None)
    # A late signal is not lost: it waits for the next wait of its name.
    signal(conn, run_id, "approve", "late")
    assert signal_rows(conn, run_id) == [("approve", "late", None)]
    assert run_row(conn, run_id)["status"] == "running"
    assert wait_signal(worker, run_id, token, 1, "approve") == ("received", "late")


def test_a_signal_before_the_timeout_deletes_the_wait_timer_only(conn, workers):
    worker = workers()
    run_id, token = started_parent(conn, worker, timeout=DAY)
    assert wait_signal(worker, run_id, token, 0, "approve", timeout=HOUR) == ("waiting", None)
    assert kinds(timer_rows(conn, run_id)) == ["deadline", "signal"]

    signal(conn, run_id, "approve", 42)
    assert kinds(timer_rows(conn, run_id)) == ["deadline"]
    wait = entry(conn, run_id, 0)
    assert (wait["status"], wait["output"]) == ("completed", {"payload": 42})
    assert run_row(conn, run_id)["status"] == "pending"
    assert advance_time(conn, 2 * HOUR) == 0
    assert entry(conn, run_id, 0)["output"] == {"payload": 42}
    assert run_row(conn, run_id)["status"] == "pending"


def test_wait_signal_is_idempotent_at_its_seq_and_fenced(conn, workers):
    worker = workers()
    run_id = start(conn)
    signal(conn, run_id, "a", "x")
    token = lease(worker, run_id)
    assert wait_signal(worker, run_id, token, 0, "a") == ("received", "x")
    signal(conn, run_id, "a", "y")
    # Met again (a replay): the recorded signal, and the newer one stays queued.
    assert wait_signal(worker, run_id, token, 0, "a") == ("received", "x")
    assert wait_signal(worker, run_id, token, 0, "a", timeout=HOUR) == ("received", "x")
    assert signal_rows(conn, run_id) == [("a", "x", 0), ("a", "y", None)]
    assert timer_rows(conn, run_id) == []
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        wait_signal(worker, run_id, token, 0, "b")

    for stale in (token - 1, token + 1):
        with raises_sqlstate(LEASE_LOST):
            wait_signal(worker, run_id, stale, 1, "a")
    worker.release_run(run_id, token)
    with raises_sqlstate(LEASE_LOST):
        wait_signal(worker, run_id, token, 1, "a")
    with raises_sqlstate(UNKNOWN_RUN):
        wait_signal(worker, uuid.uuid4(), token, 0, "a")
    assert signal_rows(conn, run_id) == [("a", "x", 0), ("a", "y", None)]
    assert [s["seq"] for s in step_rows(conn, run_id)] == [0]


# ---------------------------------------------------------------------------
# 2. Published state
# ---------------------------------------------------------------------------


def state_rows(conn: Conn, run_id: uuid.UUID) -> list[tuple[str, Any, Any]]:
    return conn.execute("select key, value, updated_at from pgflow.run_state where run_id = %s"
                        " order by key", (run_id,)).fetchall()


def test_set_state_upserts_on_the_engine_clock_and_answers_the_cancel_flag(conn, workers):
    worker = workers()
    run_id, token = started_parent(conn, worker)
    set_clock(conn, HOUR)
    first = engine_now(conn)
    assert set_state(worker, run_id, token, "progress", {"done": 1}) is False
    [(key, value, updated_at)] = state_rows(conn, run_id)
    assert (key, value) == ("progress", {"done": 1})
    assert first <= updated_at <= engine_now(conn)

    set_clock(conn, 3 * HOUR)
    assert set_state(worker, run_id, token, "progress", {"done": 2}) is False
    assert set_state(worker, run_id, token, "phase", None) is False  # SQL null is JSON null
    rows = state_rows(conn, run_id)
    assert [(k, v) for k, v, _ in rows] == [("phase", None), ("progress", {"done": 2})]
    # the clock's two hours, plus the real time between the two writes (at most the
    # time from `first` to now, measured on the moved clock)
    assert 2 * HOUR <= rows[1][2] - updated_at <= engine_now(conn) - first

    assert cancel(conn, run_id) is True
    assert set_state(worker, run_id, token, "progress", {"done": 3}) is True
    for bad in ("", None):
        with raises_sqlstate(BAD_ARGUMENT):
            set_state(worker, run_id, token, bad, 1)
    with raises_sqlstate(LEASE_LOST):
        set_state(worker, run_id, token - 1, "progress", "stale")
    assert [(k, v) for k, v, _ in state_rows(conn, run_id)] == [
        ("phase", None), ("progress", {"done": 3})]


# ---------------------------------------------------------------------------
# 3. Cancellation
# ---------------------------------------------------------------------------


def test_cancel_an_unknown_run_or_a_finished_one(conn, workers):
    worker = workers()
    with raises_sqlstate(UNKNOWN_RUN):
        cancel(conn, uuid.uuid4())
    done, token = started_parent(conn, worker)
    worker.complete_run(done, token, 7)
    failed, token = started_parent(conn, worker)
    worker.fail_run(failed, token)
    for run_id, status in ((done, "completed"), (failed, "failed")):
        before = run_row(conn, run_id)
        assert cancel(conn, run_id) is False
        after = run_row(conn, run_id)
        assert after == before and (after["status"], after["cancel_requested"]) == (status, False)


def test_cancel_ends_a_run_that_never_started_at_once(dsn, conn, workers):
    worker = workers()
    run_id = start(conn, timeout=DAY)
    delayed = start(conn, delay=HOUR)
    assert kinds(timer_rows(conn, run_id)) == ["deadline"]
    assert kinds(timer_rows(conn, delayed)) == ["start"]
    conn.execute("select pgflow.watch(%s)", (run_id,))

    with listener(dsn, "pgflow_done") as listen:
        for rid in (run_id, delayed):
            before = run_row(conn, rid)
            cancelled_after = engine_now(conn)
            assert cancel(conn, rid) is True
            run = run_row(conn, rid)
            assert (run["status"], run["cancel_requested"], run["lease_owner"]) == (
                "cancelled", True, None)
            assert run["finished_at"] is not None
            assert cancelled_after <= run["finished_at"] <= engine_now(conn)  # at the cancel
            assert run["lease_token"] == before["lease_token"] + 1
            assert timer_rows(conn, rid) == []
        assert received(listen, conn, "pgflow_done") == [str(run_id)]  # only the watched one
    assert worker.claim() == []
    assert advance_time(conn, 2 * DAY) == 0
    assert cancel(conn, run_id) is False


def test_cancel_wakes_a_sleeping_run_and_keeps_its_deadline(dsn, conn, workers):
    worker = workers()
    run_id, token = started_parent(conn, worker, timeout=DAY)
    worker.complete_step(run_id, token, 0)
    assert worker.sleep(run_id, token, 1, duration=HOUR) is True
    assert kinds(timer_rows(conn, run_id)) == ["deadline", "sleep"]

    with listener(dsn) as listen:
        assert cancel(conn, run_id) is True
        assert received(listen, conn, "pgflow_ready") == ["default"]
    run = run_row(conn, run_id)
    assert (run["status"], run["cancel_requested"], run["finished_at"]) == ("pending", True, None)
    assert kinds(timer_rows(conn, run_id)) == ["deadline"]
    assert entry(conn, run_id, 1)["status"] == "sleeping"

    [(claimed, token, requested, at)] = claim_flags(worker)
    assert (claimed, requested, at) == (run_id, True, 1)  # cancelled at the sleep it was in
    cancel_run(worker, run_id, token)
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"]) == ("cancelled", None)
    assert run["finished_at"] is not None
    assert timer_rows(conn, run_id) == []


def test_cancel_only_flags_a_running_run(conn, workers):
    worker = workers()
    run_id, token = started_parent(conn, worker)
    assert checkpoint(worker, run_id, token, 0) is False
    assert cancel(conn, run_id) is True
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"], run["lease_token"], run["cancel_requested"],
            run["cancel_seq"]) == ("running", worker.id, token, True, None)
    assert checkpoint(worker, run_id, token, 1) is True
    assert cancel(conn, run_id) is True  # asking twice is harmless

    # A draining worker gives it back; the next claim hands over the flag.
    worker.release_run(run_id, token)
    [(claimed, new_token, requested, at)] = claim_flags(worker)
    assert (claimed, new_token, requested, at) == (run_id, token + 1, True, None)
    for stale in (token, new_token + 1):
        with raises_sqlstate(LEASE_LOST):
            cancel_run(worker, run_id, stale)
    assert run_row(conn, run_id)["status"] == "running"
    cancel_run(worker, run_id, new_token)
    run = run_row(conn, run_id)
    assert (run["status"], run["lease_owner"]) == ("cancelled", None)
    assert run["finished_at"] is not None
    with raises_sqlstate(LEASE_LOST):
        cancel_run(worker, run_id, new_token)
    assert cancel(conn, run_id) is False


def test_cancel_cascades_to_children_and_grandchildren_first(conn, workers):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    done = start_child(parent_worker, parent, ptoken, 0)
    dtoken = lease(child_worker, done)
    child_worker.complete_run(done, dtoken, "early")
    busy = start_child(parent_worker, parent, ptoken, 1)
    idle = start_child(parent_worker, parent, ptoken, 2, "idle")  # no worker serves it
    assert wait_child(parent_worker, parent, ptoken, 3, busy) is None

    # busy runs and waits for a grandchild that never started
    btoken = lease(child_worker, busy)
    grandchild = start_child(child_worker, busy, btoken, 0, timeout=HOUR)
    assert wait_child(child_worker, busy, btoken, 1, grandchild) is None
    assert [run_row(conn, r)["status"] for r in (parent, busy, idle, grandchild)] == [
        "waiting", "waiting", "pending", "pending"]

    assert cancel(conn, parent) is True
    status = {r: (run_row(conn, r)["status"], run_row(conn, r)["cancel_requested"])
              for r in (parent, done, busy, idle, grandchild)}
    assert status == {parent: ("pending", True), done: ("completed", False),
                      busy: ("pending", True), idle: ("cancelled", True),
                      grandchild: ("cancelled", True)}
    assert timer_rows(conn) == []
    # the grandchild's end reached busy's journal (and woke it); the parent still waits on busy
    assert entry(conn, busy, 1)["output"] == outcome(grandchild, "cancelled")
    assert entry(conn, parent, 3)["status"] == "waiting"

    [(claimed, btoken, requested, _)] = claim_flags(child_worker, "child")
    assert (claimed, requested) == (busy, True)
    cancel_run(child_worker, busy, btoken)
    wait = entry(conn, parent, 3)
    assert (wait["status"], wait["output"]) == ("completed", outcome(busy, "cancelled"))


def test_cancel_records_the_entry_a_suspended_run_waits_on(conn, workers):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    child = start_child(parent_worker, parent, ptoken, 0)
    assert wait_child(parent_worker, parent, ptoken, 1, child) is None
    ctoken = lease(child_worker, child)  # the child runs: the cascade only flags it
    assert wait_signal(child_worker, child, ctoken, 0, "go") == ("waiting", None)
    assert cancel(conn, parent) is True
    assert [(run_row(conn, r)["status"], run_row(conn, r)["cancel_seq"]) for r in (parent, child)] == [
        ("pending", 1), ("pending", 0)]
    [(claimed, _, requested, at)] = claim_flags(parent_worker)
    assert (claimed, requested, at) == (parent, True, 1)


def test_cancel_records_the_wait_even_when_the_cascade_completes_it(conn, workers):
    worker = workers()
    parent, token = started_parent(conn, worker)
    child = start_child(worker, parent, token, 0)  # never started: the cascade ends it at once
    assert wait_child(worker, parent, token, 1, child) is None
    assert cancel(conn, parent) is True
    assert entry(conn, parent, 1)["output"] == outcome(child, "cancelled")
    run = run_row(conn, parent)
    assert (run["status"], run["cancel_requested"], run["cancel_seq"]) == ("pending", True, 1)


# ---------------------------------------------------------------------------
# 4. Children
# ---------------------------------------------------------------------------


def test_start_child_records_the_child_and_is_idempotent_at_its_seq(conn, workers):
    worker = workers()
    parent, token = started_parent(conn, worker, priority=3)
    before = engine_now(conn)
    child = start_child(worker, parent, token, 0, "child", [1, 2], key="c-1", timeout=HOUR)
    row = run_row(conn, child)
    assert {k: row[k] for k in ("name", "version", "queue", "key", "status", "input", "parent_id",
                                 "parent_seq", "parent_index", "timeout")} == {
        "name": "child", "version": "1", "queue": "default", "key": "c-1", "status": "pending",
        "input": [1, 2], "parent_id": parent, "parent_seq": None, "parent_index": None,
        "timeout": HOUR}
    [deadline] = timer_rows(conn, child)
    assert deadline["kind"] == "deadline" and before + HOUR <= deadline["due_at"] <= engine_now(conn) + HOUR
    started = entry(conn, parent, 0)
    assert (started["name"], started["kind"], started["status"], started["output"]) == (
        "child", "start_child", "completed", {"run_id": str(child)})

    # Replay: same seq, same child, no second run.
    assert start_child(worker, parent, token, 0, "child", [1, 2], key="c-1", timeout=HOUR) == child
    assert count(conn, "runs") == 2
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        start_child(worker, parent, token, 0, "other")
    with raises_sqlstate(LEASE_LOST):
        start_child(worker, parent, token + 1, 1)
    # Without version or queue, the registered workflow decides.
    other = start_child(worker, parent, token, 1, "item", queue=None, version=None)
    assert (run_row(conn, other)["queue"], run_row(conn, other)["version"]) == ("items", "1")
    assert count(conn, "runs") == 3
    assert run_row(conn, parent)["status"] == "running"


def test_wait_child_suspends_the_parent_until_the_child_completes(dsn, conn, workers):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    child = start_child(parent_worker, parent, ptoken, 0, input=[5])
    assert wait_child(parent_worker, parent, ptoken, 1, child) is None
    run = run_row(conn, parent)
    assert (run["status"], run["lease_owner"]) == ("waiting", None)
    wait = entry(conn, parent, 1)
    assert (wait["kind"], wait["status"], wait["output"]) == ("child", "waiting", {"run_id": str(child)})
    with raises_sqlstate(LEASE_LOST):
        wait_child(parent_worker, parent, ptoken, 1, child)

    ctoken = lease(child_worker, child)
    child_worker.complete_step(child, ctoken, 0)
    assert run_row(conn, parent)["status"] == "waiting"
    with listener(dsn) as listen:
        child_worker.complete_run(child, ctoken, {"sum": 5})
        assert received(listen, conn, "pgflow_ready") == ["default"]
    wait = entry(conn, parent, 1)
    assert (wait["status"], wait["output"]) == ("completed", outcome(child, "completed", {"sum": 5}))
    assert run_row(conn, parent)["status"] == "pending"

    ptoken = lease(parent_worker, parent)
    assert wait_child(parent_worker, parent, ptoken, 1, child) == outcome(child, "completed", {"sum": 5})
    assert run_row(conn, parent)["status"] == "running"
    with raises_sqlstate(UNKNOWN_RUN):
        wait_child(parent_worker, parent, ptoken, 2, uuid.uuid4())


def test_wait_child_on_a_finished_child_returns_at_once(conn, workers):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    completed = start_child(parent_worker, parent, ptoken, 0)
    child_worker.complete_run(completed, lease(child_worker, completed), [1, 2])
    failed = start_child(parent_worker, parent, ptoken, 1)
    child_worker.fail_run(failed, lease(child_worker, failed))
    cancelled = start_child(parent_worker, parent, ptoken, 2)
    assert cancel(conn, cancelled) is True

    assert wait_child(parent_worker, parent, ptoken, 3, completed) == outcome(
        completed, "completed", [1, 2])
    assert wait_child(parent_worker, parent, ptoken, 4, failed) == outcome(failed, "failed", error=ERROR)
    assert wait_child(parent_worker, parent, ptoken, 5, cancelled) == outcome(cancelled, "cancelled")
    run = run_row(conn, parent)
    assert (run["status"], run["lease_owner"], run["lease_token"]) == ("running", parent_worker.id, ptoken)
    assert [(s["seq"], s["kind"], s["status"]) for s in step_rows(conn, parent)][3:] == [
        (3, "child", "completed"), (4, "child", "completed"), (5, "child", "completed")]


@pytest.mark.parametrize("ending", ["fail_run", "cancel", "cancel_run"])
def test_a_failed_or_cancelled_child_is_reported_to_its_waiting_parent(conn, workers, ending):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    child = start_child(parent_worker, parent, ptoken, 0)
    assert wait_child(parent_worker, parent, ptoken, 1, child) is None
    if ending == "fail_run":
        child_worker.fail_run(child, lease(child_worker, child))
        expected = outcome(child, "failed", error=ERROR)
    elif ending == "cancel":  # never started: cancelled at once
        assert cancel(conn, child) is True
        expected = outcome(child, "cancelled")
    else:  # the child let pgflow.Cancelled through
        cancel_run(child_worker, child, lease(child_worker, child))
        expected = outcome(child, "cancelled")
    wait = entry(conn, parent, 1)
    assert (wait["status"], wait["output"]) == ("completed", expected)
    assert run_row(conn, parent)["status"] == "pending"


def test_a_child_that_continues_as_new_is_followed_to_its_successor(conn, workers):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    child = start_child(parent_worker, parent, ptoken, 0, input=[0])
    assert wait_child(parent_worker, parent, ptoken, 1, child) is None

    second = continue_as_new(child_worker, child, lease(child_worker, child), [1])
    assert run_row(conn, second)["parent_id"] == parent
    wait = entry(conn, parent, 1)
    assert (wait["status"], wait["output"]) == ("waiting", {"run_id": str(second)})
    assert run_row(conn, parent)["status"] == "waiting"

    third = continue_as_new(child_worker, second, lease(child_worker, second), [2])
    assert entry(conn, parent, 1)["output"] == {"run_id": str(third)}
    assert run_row(conn, parent)["status"] == "waiting"

    child_worker.complete_run(third, lease(child_worker, third), "last")
    wait = entry(conn, parent, 1)
    assert (wait["status"], wait["output"]) == ("completed", outcome(third, "completed", "last"))
    assert run_row(conn, parent)["status"] == "pending"


def test_wait_child_given_a_continued_child_follows_the_chain(conn, workers):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    child = start_child(parent_worker, parent, ptoken, 0)
    second = continue_as_new(child_worker, child, lease(child_worker, child), [1])
    third = continue_as_new(child_worker, second, lease(child_worker, second), [2])

    # Waiting on the handle of the first run waits on the last one.
    assert wait_child(parent_worker, parent, ptoken, 1, child) is None
    assert entry(conn, parent, 1)["output"] == {"run_id": str(third)}
    child_worker.complete_run(third, lease(child_worker, third), "end")
    assert run_row(conn, parent)["status"] == "pending"
    ptoken = lease(parent_worker, parent)
    assert wait_child(parent_worker, parent, ptoken, 1, child) == outcome(third, "completed", "end")

    # ... and when the chain has already ended, returns at once.
    other = start_child(parent_worker, parent, ptoken, 2)
    successor = continue_as_new(child_worker, other, lease(child_worker, other), [1])
    child_worker.complete_run(successor, lease(child_worker, successor), "end2")
    assert wait_child(parent_worker, parent, ptoken, 3, other) == outcome(successor, "completed", "end2")
    assert run_row(conn, parent)["status"] == "running"


# ---------------------------------------------------------------------------
# 5. Parallel map
# ---------------------------------------------------------------------------


def claim_items(worker: Worker) -> dict[int, tuple[uuid.UUID, int]]:
    """Claim every pending map item: {parent_index: (run_id, token)}."""
    claims = worker.claim(limit=100, queues=["items"], pairs=[("item", "1")])
    index = {c.run_id: i for c in claims
             for i in [run_row(worker.db, c.run_id)["parent_index"]]}
    return {index[c.run_id]: (c.run_id, c.token) for c in claims}


def test_map_starts_one_child_per_input_and_collects_them_in_index_order(dsn, conn, workers):
    parent_worker, item_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker, priority=4)
    parent_worker.complete_step(parent, ptoken, 0)
    with listener(dsn) as listen:
        assert map_items(parent_worker, parent, ptoken, 1, [[1], [2], {"x": 3}]) is None
        assert received(listen, conn, "pgflow_ready") == ["items"]
    kids = children(conn, parent)
    assert [(c["name"], c["version"], c["queue"], c["parent_seq"], c["parent_index"], c["input"],
             c["status"], c["priority"]) for c in kids] == [
        ("item", "1", "items", 1, 0, [1], "pending", 4),
        ("item", "1", "items", 1, 1, [2], "pending", 4),
        ("item", "1", "items", 1, 2, {"x": 3}, "pending", 4)]
    wait = entry(conn, parent, 1)
    assert (wait["name"], wait["kind"], wait["status"], wait["output"]) == (
        "item", "map", "waiting", {"children": 3, "remaining": 3})
    run = run_row(conn, parent)
    assert (run["status"], run["lease_owner"]) == ("waiting", None)

    items = claim_items(item_worker)
    assert sorted(items) == [0, 1, 2]
    # They finish out of order; the entry keeps the inputs' order.
    item_worker.complete_run(*items[2], output=30)
    assert entry(conn, parent, 1)["output"] == {"children": 3, "remaining": 2}
    item_worker.fail_run(*items[0])
    assert entry(conn, parent, 1)["output"] == {"children": 3, "remaining": 1}
    assert run_row(conn, parent)["status"] == "waiting"
    with listener(dsn) as listen:
        item_worker.complete_run(*items[1], output=20)
        assert received(listen, conn, "pgflow_ready") == ["default"]
    expected = {"items": [outcome(items[0][0], "failed", error=ERROR),
                          outcome(items[1][0], "completed", 20),
                          outcome(items[2][0], "completed", 30)]}
    wait = entry(conn, parent, 1)
    assert (wait["status"], wait["output"]) == ("completed", expected)
    assert run_row(conn, parent)["status"] == "pending"

    # Replay meets the map again: its outcome, no new children.
    ptoken = lease(parent_worker, parent)
    assert map_items(parent_worker, parent, ptoken, 1, [[1], [2], {"x": 3}]) == expected
    assert len(children(conn, parent)) == 3
    assert run_row(conn, parent)["status"] == "running"


def test_map_of_nothing_returns_at_once(conn, workers):
    worker = workers()
    parent, token = started_parent(conn, worker)
    assert map_items(worker, parent, token, 0, []) == {"items": []}
    done = entry(conn, parent, 0)
    assert (done["kind"], done["status"], done["output"]) == ("map", "completed", {"items": []})
    assert children(conn, parent) == []
    assert run_row(conn, parent)["status"] == "running"
    assert map_items(worker, parent, token, 0, []) == {"items": []}


def test_map_met_again_while_waiting_keeps_waiting(conn, workers):
    parent_worker, item_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    assert map_items(parent_worker, parent, ptoken, 0, [[1], [2]]) is None
    items = claim_items(item_worker)  # running items are only flagged by the cancel below
    with raises_sqlstate(LEASE_LOST):  # a waiting run holds no lease
        map_items(parent_worker, parent, ptoken, 0, [[1], [2]])

    # Something wakes the parent (here a cancel request) before its items are done.
    assert cancel(conn, parent) is True
    assert run_row(conn, parent)["status"] == "pending"
    ptoken = lease(parent_worker, parent)
    with raises_sqlstate(DUPLICATE_CHECKPOINT):
        map_items(parent_worker, parent, ptoken, 0, [[1]], name="other")
    assert map_items(parent_worker, parent, ptoken, 0, [[1], [2]]) is None
    assert run_row(conn, parent)["status"] == "waiting"
    assert len(children(conn, parent)) == 2
    assert entry(conn, parent, 0)["output"] == {"children": 2, "remaining": 2}

    for index in (0, 1):
        item_worker.complete_run(*items[index], output=index)
    assert run_row(conn, parent)["status"] == "pending"
    ptoken = lease(parent_worker, parent)
    assert map_items(parent_worker, parent, ptoken, 0, [[1], [2]]) == {
        "items": [outcome(items[0][0], "completed", 0), outcome(items[1][0], "completed", 1)]}


# ---------------------------------------------------------------------------
# 6. Continue-as-new
# ---------------------------------------------------------------------------


def test_continue_as_new_completes_the_run_and_starts_its_successor(conn, workers):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    child = start_child(parent_worker, parent, ptoken, 0, input=[0], key="loop", timeout=DAY)
    conn.execute("update pgflow.runs set priority = 5 where id = %s", (child,))
    ctoken = lease(child_worker, child)
    child_worker.complete_step(child, ctoken, 0)
    conn.execute("select pgflow.record_value(%s, %s, 1, 'now', null)", (child, ctoken))
    before = engine_now(conn)

    successor = continue_as_new(child_worker, child, ctoken, {"n": 1})
    old = run_row(conn, child)
    assert (old["status"], old["output"], old["continued_as"], old["key"], old["lease_owner"]) == (
        "completed", None, successor, None, None)
    assert old["finished_at"] is not None
    assert timer_rows(conn, child) == []
    assert len(step_rows(conn, child)) == 2

    new = run_row(conn, successor)
    assert {k: new[k] for k in ("name", "version", "queue", "key", "priority", "input", "parent_id",
                                 "timeout", "status", "started_at", "continued_as")} == {
        "name": "child", "version": "1", "queue": "default", "key": "loop", "priority": 5,
        "input": {"n": 1}, "parent_id": parent, "timeout": DAY, "status": "pending",
        "started_at": None, "continued_as": None}
    assert step_rows(conn, successor) == []
    [deadline] = timer_rows(conn, successor)
    assert deadline["kind"] == "deadline" and before + DAY <= deadline["due_at"] <= engine_now(conn) + DAY
    # The key moved with it: starting by key finds the successor.
    assert start(conn, "child", key="loop") == successor

    with raises_sqlstate(LEASE_LOST):
        continue_as_new(child_worker, child, ctoken, [2])
    [claim] = child_worker.claim(queues=["default"], pairs=[("child", "1")])
    assert (claim.run_id, claim.input, claim.journal) == (successor, {"n": 1}, [])
    with raises_sqlstate(LEASE_LOST):
        continue_as_new(child_worker, successor, claim.token - 1, [2])


def test_continue_as_new_without_a_timeout_sets_no_deadline(conn, workers):
    worker = workers()
    run_id, token = started_parent(conn, worker)
    successor = continue_as_new(worker, run_id, token, [1])
    assert run_row(conn, successor)["timeout"] is None
    assert run_row(conn, successor)["parent_id"] is None
    assert timer_rows(conn) == []
    assert [c.run_id for c in worker.claim()] == [successor]


# ---------------------------------------------------------------------------
# 7. The lock rule, raced: no deadlock, no lost wake-up
# ---------------------------------------------------------------------------


JITTER = random.Random(7366503)  # the races' small random delays, reproducible


def race(*actions: Callable[[], Any]) -> list[Any]:
    """Run ``actions`` in threads released together; return their results or exceptions."""
    barrier = threading.Barrier(len(actions))
    results: list[Any] = [None] * len(actions)

    def run(i: int, action: Callable[[], Any]) -> None:
        barrier.wait()
        time.sleep(JITTER.uniform(0, 0.004))
        try:
            results[i] = action()
        except Exception as exc:  # reported by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(actions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a racing call hung"
    return results


def assert_no_errors(results: list[Any]) -> None:
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == [], [f"{getattr(e, 'sqlstate', None)}: {e}" for e in errors]


def test_a_child_finishing_while_its_parent_is_cancelled_never_deadlocks(dsn, conn, workers):
    parent_worker, child_worker = workers(), workers()
    with psycopg.connect(dsn, autocommit=True) as operator:
        for i in range(20):
            parent, ptoken = started_parent(conn, parent_worker)
            child = start_child(parent_worker, parent, ptoken, 0)
            assert wait_child(parent_worker, parent, ptoken, 1, child) is None
            ctoken = lease(child_worker, child)

            results = race(lambda: child_worker.complete_run(child, ctoken, i),  # noqa: B023
                           lambda: cancel(operator, parent))  # noqa: B023
            assert_no_errors(results)
            assert results[1] is True
            kid = run_row(conn, child)
            assert (kid["status"], kid["output"]) == ("completed", i)
            wait = entry(conn, parent, 1)
            assert (wait["status"], wait["output"]) == (
                "completed", outcome(child, "completed", i))
            run = run_row(conn, parent)
            assert (run["status"], run["cancel_requested"]) == ("pending", True)
            # the parent's worker ends it as the workflow would: cancelled
            [(claimed, ptoken, requested, _)] = claim_flags(parent_worker)
            assert (claimed, requested) == (parent, True)
            cancel_run(parent_worker, parent, ptoken)
    assert count(conn, "timers") == 0


def test_a_parent_waiting_while_its_child_completes_is_never_left_waiting(dsn, conn, workers):
    parent_worker, child_worker = workers(), workers()
    with psycopg.connect(dsn, autocommit=True) as parent_conn:
        for i in range(30):
            parent, ptoken = started_parent(conn, parent_worker)
            child = start_child(parent_worker, parent, ptoken, 0)
            ctoken = lease(child_worker, child)

            results = race(
                lambda: wait_child(parent_worker, parent, ptoken, 1, child,  # noqa: B023
                                   via=parent_conn),
                lambda: child_worker.complete_run(child, ctoken, i))  # noqa: B023
            assert_no_errors(results)
            wait = entry(conn, parent, 1)
            assert (wait["status"], wait["output"]) == ("completed", outcome(child, "completed", i))
            run = run_row(conn, parent)
            if results[0] is None:  # it suspended first: the child's end must have woken it
                assert run["status"] == "pending", f"lost wake-up in race {i}"
                ptoken = lease(parent_worker, parent)
            else:  # the child was done first: the outcome came back at once
                assert results[0] == outcome(child, "completed", i)
                assert run["status"] == "running"
            parent_worker.complete_run(parent, ptoken)


# ---------------------------------------------------------------------------
# 8. Regressions: races and edge cases found in review
# ---------------------------------------------------------------------------


def test_cancel_cascade_with_a_never_started_child_does_not_deadlock(dsn, conn, workers):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    idle = start_child(parent_worker, parent, ptoken, 0, "idle")  # no worker serves it: never starts
    time.sleep(0.005)  # uuid_v7 ids: the cascade (in id order) meets idle first
    busy = start_child(parent_worker, parent, ptoken, 1)
    assert idle < busy
    assert wait_child(parent_worker, parent, ptoken, 2, busy) is None
    btoken = lease(child_worker, busy)

    errors: list[psycopg.Error] = []
    with psycopg.connect(dsn) as child_tx, psycopg.connect(dsn, autocommit=True) as operator:
        # busy's worker, inside the transaction that ends busy: the run's lock is taken first
        child_tx.execute("select pgflow._lock_run(%s)", (busy,))
        canceller = threading.Thread(target=lambda: _collect(errors, lambda: cancel(operator, parent)))
        canceller.start()
        wait_until_blocked(conn, operator.info.backend_pid, "busy's run lock")
        try:
            child_worker.complete_run(busy, btoken, "done", via=child_tx)
            child_tx.commit()
        except psycopg.Error as exc:
            errors.append(exc)
            child_tx.rollback()
        canceller.join(30)
    assert [e.sqlstate for e in errors] == [], [str(e) for e in errors]
    assert run_row(conn, idle)["status"] == "cancelled"
    assert run_row(conn, busy)["status"] == "completed"
    assert run_row(conn, parent)["cancel_requested"] is True


def _collect(errors: list[psycopg.Error], action: Callable[[], Any]) -> None:
    try:
        action()
    except psycopg.Error as exc:
        errors.append(exc)


def test_continue_as_new_racing_wait_child_does_not_lose_the_wake_up(dsn, conn, workers):
    parent_worker, child_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    child = start_child(parent_worker, parent, ptoken, 0)
    ctoken = lease(child_worker, child)
    errors: list[psycopg.Error] = []
    with psycopg.connect(dsn) as child_tx, psycopg.connect(dsn) as parent_tx:
        # the child's worker continues it as new; before that commits, the parent waits for it
        successor = continue_as_new(child_worker, child, ctoken, [1], via=child_tx)

        def wait_for_child() -> None:
            wait_child(parent_worker, parent, ptoken, 1, child, via=parent_tx)
            parent_tx.commit()

        waiter = threading.Thread(target=lambda: _collect(errors, wait_for_child))
        waiter.start()
        wait_for(lambda: not waiter.is_alive() or is_blocked(conn, parent_tx.info.backend_pid),
                 timeout=60, what="wait_child to finish or to wait for a lock")
        child_tx.commit()
        waiter.join(30)
    assert [e.sqlstate for e in errors] == [], [str(e) for e in errors]
    child_worker.complete_run(successor, lease(child_worker, successor), "end")
    wait = entry(conn, parent, 1)
    assert (wait["status"], run_row(conn, parent)["status"]) == ("completed", "pending"), (
        f"parent left {run_row(conn, parent)['status']} with entry {wait['output']}")


def test_map_items_hold_one_outcome_per_input_when_an_item_continues_as_new(conn, workers):
    parent_worker, item_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    assert map_items(parent_worker, parent, ptoken, 0, [[1], [2]]) is None
    items = claim_items(item_worker)
    successor = continue_as_new(item_worker, *items[0], [10])
    [(claimed, stoken)] = claim_items(item_worker).values()
    assert claimed == successor
    item_worker.complete_run(successor, stoken, output="a")
    item_worker.complete_run(*items[1], output="b")
    assert run_row(conn, parent)["status"] == "pending"
    assert entry(conn, parent, 0)["output"] == {
        "items": [outcome(successor, "completed", "a"), outcome(items[1][0], "completed", "b")]}


def test_a_retried_map_item_is_not_counted_twice(conn, workers):
    parent_worker, item_worker = workers(), workers()
    parent, ptoken = started_parent(conn, parent_worker)
    assert map_items(parent_worker, parent, ptoken, 0, [[1], [2]]) is None
    items = claim_items(item_worker)
    item_worker.fail_run(*items[0])
    assert entry(conn, parent, 0)["output"] == {"children": 2, "remaining": 1}
    conn.execute("select pgflow.retry(%s)", (items[0][0],))  # an operator resumes the failed item
    [(retried, token)] = claim_items(item_worker).values()
    assert retried == items[0][0]
    item_worker.complete_run(retried, token, output="again")
    assert run_row(conn, items[1][0])["status"] == "running"
    assert (entry(conn, parent, 0)["status"], run_row(conn, parent)["status"]) == (
        "waiting", "waiting"), f"map ended early: {entry(conn, parent, 0)['output']}"


def test_cancel_racing_a_claim_of_a_never_started_run(dsn, conn, workers):
    worker = workers()
    run_id = start(conn)
    errors: list[psycopg.Error] = []
    answers: list[bool] = []
    with psycopg.connect(dsn) as claim_tx, psycopg.connect(dsn, autocommit=True) as operator:
        assert lease(worker, run_id, via=claim_tx) == 1
        canceller = threading.Thread(
            target=lambda: _collect(errors, lambda: answers.append(cancel(operator, run_id))))
        canceller.start()
        wait_until_blocked(conn, operator.info.backend_pid, "the claimed run's row")
        claim_tx.commit()
        canceller.join(30)
    assert [e.sqlstate for e in errors] == [], [str(e) for e in errors]
    run = run_row(conn, run_id)
    assert (answers, run["status"], run["cancel_requested"]) == ([True], "running", True)
