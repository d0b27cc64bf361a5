"""Flow control in SQL (sql/schema/13_flow_control.sql), the procedures called directly.

Workers are rows and connections (``tests/support/sqlkit.py``); each test
drives claims and reports by hand and checks slots, parked runs and the
``pgflow.queues`` view. The same limits with real worker processes:
``tests/processes/test_flow_control.py``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.support.sqlkit import (
    BAD_ARGUMENT,
    Conn,
    Worker,
    assert_plan_uses,
    count,
    fire_timers,
    listener,
    load_finished_runs,
    raises_sqlstate,
    received,
    recover,
    run_row,
    set_clock,
    start,
    worker_factory,
)

PARAMS = [{"name": "c", "kind": "positional", "required": True},
          {"name": "n", "kind": "positional", "required": False}]


@pytest.fixture
def workers(dsn: str) -> Iterator[Callable[..., Worker]]:
    with worker_factory(dsn) as make:
        yield make


def limited(make: Callable[..., Worker], limit: int, key: str | None = "c") -> Worker:
    """A worker of 'wf' announcing Concurrency(limit, key)."""
    return make(announce={"wf": {"params": PARAMS,
                                 "concurrency": {"limit": limit, "key": key}}})


def held(conn: Conn) -> list[tuple[uuid.UUID, str]]:
    return conn.execute("select id, held_by from pgflow.runs where held_by is not null"
                        " order by created_at").fetchall()


def holders(conn: Conn) -> dict[str, int]:
    """Slots held now, by scope."""
    return dict(conn.execute("select scope, count(*) from pgflow.slots"
                             " where run_id is not null group by scope").fetchall())


def queue_row(conn: Conn, name: str = "default") -> dict[str, Any]:
    cur = conn.execute("select * from pgflow.queues where name = %s", (name,))
    assert cur.description is not None
    row = cur.fetchone()
    assert row is not None
    return dict(zip([d.name for d in cur.description], row, strict=True))


# ---------------------------------------------------------------------------
# Workflow and key limits
# ---------------------------------------------------------------------------


def test_a_workflow_limit_claims_up_to_it_and_parks_the_rest(conn, workers):
    w = limited(workers, 2, key=None)
    runs = [start(conn, input=["a"]) for _ in range(5)]
    claimed = w.claim(10)
    assert {c.run_id for c in claimed} == set(runs[:2])  # oldest first
    assert held(conn) == [(r, "workflow:wf") for r in runs[2:]]
    assert holders(conn) == {"workflow:wf": 2}
    assert all(run_row(conn, r)["status"] == "pending" for r in runs[2:])  # never failed
    assert queue_row(conn)["held"] == 3 and queue_row(conn)["running"] == 2
    assert w.claim(10) == []  # parked runs are out of the claim's index

    # A completion gives its slot back and unparks the oldest parked run.
    w.complete_run(claimed[0].run_id, claimed[0].token)
    assert [r for r, _ in held(conn)] == runs[3:]
    assert [c.run_id for c in w.claim(10)] == [runs[2]]
    assert holders(conn) == {"workflow:wf": 2}


def test_a_key_limit_counts_each_key_apart_and_reads_the_key_from_either_input_form(conn, workers):
    w = limited(workers, 1)
    a1 = start(conn, input=["a", 1])
    a2 = start(conn, input=Jsonb({"c": "a", "n": 2}))
    b1 = start(conn, input=Jsonb({"c": "b"}))
    n7 = start(conn, input=[7])  # a number: its JSON text
    assert [run_row(conn, r)["concurrency_key"] for r in (a1, a2, b1, n7)] == ["a", "a", "b", "7"]

    assert {c.run_id for c in w.claim(10)} == {a1, b1, n7}
    assert held(conn) == [(a2, 'key:["wf", "a"]')]
    assert holders(conn) == {'key:["wf", "a"]': 1, 'key:["wf", "b"]': 1, 'key:["wf", "7"]': 1}


def test_start_run_sets_the_concurrency_key_over_the_input(conn, workers):
    limited(workers, 1)
    run = conn.execute("select pgflow.start_run('wf', '[\"a\"]', version => '1',"
                       " concurrency_key => 'tenant-9')").fetchone()[0]
    assert run_row(conn, run)["concurrency_key"] == "tenant-9"
    with raises_sqlstate(BAD_ARGUMENT):
        conn.execute("select pgflow.start_run('wf', '[\"a\"]', version => '1',"
                     " concurrency_key => '')")
    with raises_sqlstate(BAD_ARGUMENT):  # a key names a scope: it must fit in a btree
        start(conn, input=["x" * 2000])
    assert count(conn, "runs") == 1


def test_one_keys_backlog_is_parked_at_once_and_another_key_goes_next(conn, workers):
    """Fairness: a claim that finds a key full parks that key's whole ready backlog."""
    w = limited(workers, 1)
    conn.execute("""
        insert into pgflow.runs (name, version, queue, status, input, created_at, available_at,
                                 concurrency_key)
        select 'wf', '1', 'default', 'pending', '["big"]', now() - interval '1 hour' + g * interval '1 ms',
               now() - interval '1 hour' + g * interval '1 ms', 'big'
        from generate_series(1, 5000) g""")
    newcomer = start(conn, input=["small"])
    claimed = {c.run_id for c in w.claim(8)}
    assert newcomer in claimed and len(claimed) == 2  # one of each key, in the first claim
    assert len(held(conn)) == 4999
    assert_plan_uses(conn, """explain (format json)
        select k.id from pgflow.runs k
        where k.name = 'wf' and k.concurrency_key = 'big'
          and k.status = 'pending' and k.held_by is null""", "runs", "runs_keyed_ready")


def test_a_priority_run_is_unparked_first(conn, workers):
    w = limited(workers, 1)
    first = start(conn, input=["a"])
    low = start(conn, input=["a"])
    high = start(conn, input=["a"], priority=5)
    [claim] = w.claim(1)
    assert claim.run_id == high  # priority order holds under a limit
    assert w.claim(10) == []
    w.complete_run(claim.run_id, claim.token)
    assert [c.run_id for c in w.claim(10)] == [first]
    assert held(conn) == [(low, 'key:["wf", "a"]')]


def test_a_sleeping_run_gives_its_slot_back_and_takes_one_again_when_it_wakes(conn, workers):
    w = limited(workers, 1)
    sleeper = start(conn, input=["a"])
    other = start(conn, input=["a"])
    c = w.claim_one(limit=1)
    assert c.run_id == sleeper
    assert w.claim(10) == []  # other is parked
    assert w.sleep(sleeper, c.token, 0, duration=timedelta(hours=1))
    assert holders(conn) == {}
    assert held(conn) == []  # the freed slot unparked other
    d = w.claim_one()
    assert d.run_id == other
    set_clock(conn, timedelta(hours=2))
    assert fire_timers(conn) == 1
    assert w.claim(10) == []  # awake, but other holds the key's slot: parked again
    assert held(conn) == [(sleeper, 'key:["wf", "a"]')]
    w.complete_run(other, d.token)
    assert w.claim_one().run_id == sleeper


@pytest.mark.parametrize("suspend", ["wait_signal", "retry", "release", "fail", "cancel"])
def test_every_way_out_of_running_gives_the_slots_back(conn, workers, suspend):
    w = limited(workers, 1)
    run = start(conn, input=["a"])
    waiting = start(conn, input=["a"])
    c = w.claim_one(limit=1)
    if suspend == "wait_signal":
        w.db.execute("select pgflow.wait_signal(%s, %s, 0, 'go', null)", (run, c.token))
    elif suspend == "retry":
        assert w.fail_step(run, c.token, 0)[0] == "retry"
    elif suspend == "release":
        w.release_run(run, c.token)
    elif suspend == "fail":
        w.fail_run(run, c.token)
    else:
        conn.execute("select pgflow.cancel(%s)", (run,))
        w.db.execute("select pgflow.cancel_run(%s, %s)", (run, c.token))
    assert holders(conn) == {}
    assert run_row(conn, run)["holds_slots"] is False
    assert run_row(conn, waiting)["held_by"] is None


def test_recovery_gives_a_dead_workers_slots_back(conn, workers):
    dead = limited(workers, 1)
    run = start(conn, input=["a"])
    parked = start(conn, input=["a"])
    dead.claim(10)
    assert held(conn) == [(parked, 'key:["wf", "a"]')]
    dead.lose_liveness_lock()
    assert recover(conn) == 1
    assert holders(conn) == {}
    assert held(conn) == []
    alive = limited(workers, 1)
    assert len(alive.claim(10)) == 1  # one of the two, the other parked again
    assert len(held(conn)) == 1
    assert run_row(conn, run)["status"] in ("pending", "running")


def test_a_cancelled_parked_run_is_parked_no_more(conn, workers):
    w = limited(workers, 1)
    start(conn, input=["a"])
    parked = start(conn, input=["a"])
    w.claim(10)
    conn.execute("select pgflow.cancel(%s)", (parked,))
    row = run_row(conn, parked)
    assert (row["status"], row["held_by"]) == ("cancelled", None)


def test_a_changed_limit_unparks_the_workflows_runs(conn, workers):
    w = limited(workers, 1)
    for _ in range(3):
        start(conn, input=["a"])
    w.claim(10)
    assert len(held(conn)) == 2
    w2 = limited(workers, 3)  # a deploy raises the limit
    assert held(conn) == []
    assert len(w2.claim(10)) == 2
    assert holders(conn) == {'key:["wf", "a"]': 3}


def test_a_worker_that_announces_no_limit_leaves_the_known_one(conn, workers):
    limited(workers, 1)
    workers()  # like a worker of revision 0007: no "concurrency" in its announcement
    assert conn.execute("select concurrency_limit, concurrency_param from pgflow.workflows"
                        ).fetchone() == (1, "c")


# ---------------------------------------------------------------------------
# Queue caps, rates and pauses
# ---------------------------------------------------------------------------


def test_a_queue_cap_gates_the_queue_without_parking(dsn, conn, workers):
    w = workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 2)")
    runs = [start(conn) for _ in range(5)]
    claimed = w.claim(10)
    assert len(claimed) == 2 and held(conn) == []
    assert w.claim(10) == []
    listen = listener(dsn)
    try:
        w.complete_run(claimed[0].run_id, claimed[0].token)
        assert received(listen, conn, "pgflow_ready") == ["default"]  # idle workers claim again
    finally:
        listen.close()
    assert len(w.claim(10)) == 1
    assert queue_row(conn) | {"rate_per": None} == {
        "name": "default", "concurrency": 2, "rate_limit": None, "rate_per": None,
        "paused": False, "pending": 2, "held": 0, "running": 2, "sleeping": 0, "waiting": 0}
    assert len(runs) == 5


def test_a_batch_of_completions_gives_back_its_slots_and_unparks_one_run_each(conn, workers):
    """complete_batch (group commit) gives its runs' slots back in one go, not run by run."""
    w = limited(workers, 2, key=None)
    conn.execute("select pgflow.set_queue('default', concurrency => 5)")
    runs = [start(conn, input=["a"]) for _ in range(5)]
    claimed = w.claim(10)
    assert len(claimed) == 2 and len(held(conn)) == 3
    k = len(claimed)
    outcomes = w.db.execute(
        "select outcome from pgflow.complete_batch(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        ([c.run_id for c in claimed], [c.token for c in claimed], [None] * k, [None] * k,
         [None] * k, [None] * k, [None] * k, [True] * k, [Jsonb(1)] * k)).fetchall()
    assert outcomes == [("ok",), ("ok",)]
    assert holders(conn) == {}
    assert [r for r, _ in held(conn)] == runs[4:]  # two freed slots: the two oldest unparked
    assert {c.run_id for c in w.claim(10)} == set(runs[2:4])
    assert holders(conn) == {"workflow:wf": 2, "queue:default": 2}


def test_lowering_a_queue_cap_keeps_running_runs_and_holds_new_ones(conn, workers):
    w = workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 3)")
    for _ in range(6):
        start(conn)
    claimed = w.claim(10)
    assert len(claimed) == 3
    conn.execute("select pgflow.set_queue('default', concurrency => 1)")
    for c in claimed[:2]:
        w.complete_run(c.run_id, c.token)
    assert w.claim(10) == []  # one still runs: the new cap is full
    w.complete_run(claimed[2].run_id, claimed[2].token)
    assert len(w.claim(10)) == 1


def test_a_rate_limit_admits_n_claims_a_window_and_the_leader_wakes_the_queue(conn, workers):
    w = workers()
    conn.execute("select pgflow.set_queue('default', rate_limit => 3, rate_per => interval '1 hour')")
    for _ in range(5):
        start(conn)
    assert len(w.claim(10)) == 3
    assert w.claim(10) == []
    blocked, now = conn.execute("select rate_blocked_until, pgflow.now()"
                                " from pgflow.queue_settings").fetchone()
    assert timedelta(minutes=59) < blocked - now <= timedelta(hours=1)
    wake_in = conn.execute("select pgflow.next_wake_in()").fetchone()[0]
    assert 3500 < wake_in <= 3600
    assert conn.execute("select pgflow.wake_queues()").fetchone()[0] == 0  # not yet
    set_clock(conn, timedelta(hours=1, seconds=1))
    assert conn.execute("select pgflow.wake_queues()").fetchone()[0] == 1
    assert len(w.claim(10)) == 2


def test_a_rate_counts_every_claim_a_resumption_included(conn, workers):
    w = workers()
    conn.execute("select pgflow.set_queue('default', rate_limit => 2, rate_per => interval '1 hour')")
    run = start(conn)
    c = w.claim_one()
    w.release_run(run, c.token)
    assert w.claim_one().run_id == run
    w.db.execute("select pgflow.release_run(%s, %s)", (run, c.token + 1))
    assert w.claim(10) == []


def test_a_paused_queue_claims_nothing_until_resumed(dsn, conn, workers):
    w = workers()
    for _ in range(3):
        start(conn)
    conn.execute("select pgflow.pause_queue('default')")
    assert w.claim(10) == []
    assert queue_row(conn)["paused"] is True
    listen = listener(dsn)
    try:
        conn.execute("select pgflow.resume_queue('default')")
        assert received(listen, conn, "pgflow_ready") == ["default"]
    finally:
        listen.close()
    assert len(w.claim(10)) == 3


def test_an_other_queue_of_the_worker_is_claimed_while_one_is_paused(conn, workers):
    w = workers(queues=("default", "other"), workflows=(("wf", "1", "default"),))
    start(conn)
    start(conn, queue="other")
    conn.execute("select pgflow.pause_queue('default')")
    [c] = w.claim(10)
    assert run_row(conn, c.run_id)["queue"] == "other"


@pytest.mark.parametrize("call", [
    "pgflow.set_queue('q', concurrency => 0)",
    "pgflow.set_queue('q', concurrency => 100001)",
    "pgflow.set_queue('q', rate_limit => 5)",
    "pgflow.set_queue('q', rate_per => interval '1 second')",
    "pgflow.set_queue('q', rate_limit => 0, rate_per => interval '1 second')",
    "pgflow.set_queue('q', rate_limit => 5, rate_per => interval '-1 second')",
    "pgflow.set_queue('', concurrency => 1)",
    "pgflow.pause_queue('')",
    "pgflow.resume_queue('')",
])
def test_bad_queue_settings_are_refused_and_write_nothing(conn, call):
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        conn.execute(f"select {call}")
    assert exc.value.diag.message_primary and "\n" not in exc.value.diag.message_primary
    assert count(conn, "queue_settings") == 0 and count(conn, "slots") == 0


def test_set_queue_with_no_caps_removes_them(conn, workers):
    w = workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 1, rate_limit => 1,"
                 " rate_per => interval '1 hour')")
    conn.execute("select pgflow.set_queue('default')")
    assert count(conn, "slots") == 0
    for _ in range(3):
        start(conn)
    assert len(w.claim(10)) == 3


# ---------------------------------------------------------------------------
# Racing claimers, and the plans on large tables
# ---------------------------------------------------------------------------


def test_racing_claimers_never_exceed_a_key_limit_or_a_queue_cap(dsn, conn, workers):
    """Eight connections claim and complete as fast as they can; a checker samples the slots.

    Per key at most 2 running, in the queue at most 5, and the slots agree with the runs.
    A racer that claims nothing does the scheduler leader's part (pgflow.wake_queues):
    a release that found its scope's lock taken leaves the scope to the leader.
    """
    conn.execute("select pgflow.set_queue('default', concurrency => 5)")
    for i in range(400):
        start(conn, input=[f"k{i % 4}"])
    racers = [limited(workers, 2) for _ in range(8)]
    stop = threading.Event()
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def race(w: Worker) -> None:
        try:
            while not stop.is_set():
                claims = w.claim(3)
                if not claims:
                    w.db.execute("select pgflow.wake_queues()")
                if not claims and not w.db.execute(
                        "select 1 from pgflow.runs where status <> 'completed' limit 1").fetchone():
                    return
                for c in claims:
                    w.complete_run(c.run_id, c.token)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def check() -> None:
        with psycopg.connect(dsn, autocommit=True) as db:
            while not stop.is_set():
                per_key, total = db.execute(
                    "select coalesce(max(n), 0), coalesce(sum(n), 0)::int from (select count(*) n"
                    " from pgflow.runs where status = 'running' group by concurrency_key) x"
                    ).fetchone()
                seen.append((per_key, total))

    threads = [threading.Thread(target=race, args=(w,)) for w in racers]
    checker = threading.Thread(target=check)
    checker.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    checker.join()
    assert errors == []
    assert conn.execute("select count(*) from pgflow.runs where status = 'completed'"
                        ).fetchone()[0] == 400
    assert seen and max(p for p, _ in seen) <= 2 and max(t for _, t in seen) <= 5
    assert holders(conn) == {}
    # The last releases may have found a scope locked by a racer's claim and left it
    # to the leader after every racer had stopped; one leader pass clears them.
    conn.execute("select pgflow.wake_queues()")
    assert count(conn, "scope_rechecks") == 0


def test_a_release_that_finds_its_scope_locked_leaves_it_to_the_leader(dsn, conn, workers):
    """A claimer holds the scope's lock (it may be parking a run there): the release does
    not wait; the leader unparks the scope's best run once the lock is free."""
    w = limited(workers, 1)
    first = start(conn, input=["a"])
    parked = start(conn, input=["a"])
    c = w.claim_one(limit=1)
    assert c.run_id == first and w.claim(10) == []
    assert held(conn) == [(parked, 'key:["wf", "a"]')]
    with psycopg.connect(dsn) as claimer:  # a transaction holding the scope's lock
        claimer.execute("select pg_advisory_xact_lock(7366505, hashtext(%s))",
                        ('key:["wf", "a"]',))
        w.complete_run(first, c.token)  # does not block
        assert held(conn) == [(parked, 'key:["wf", "a"]')]
        assert count(conn, "scope_rechecks") == 1
        assert conn.execute("select pgflow.next_wake_in() <= 0").fetchone()[0] is True
        assert conn.execute("select pgflow.wake_queues()").fetchone()[0] == 0  # still locked
        assert count(conn, "scope_rechecks") == 1
    assert conn.execute("select pgflow.wake_queues()").fetchone()[0] == 1
    assert held(conn) == [] and count(conn, "scope_rechecks") == 0
    assert w.claim_one().run_id == parked


def test_the_limited_claim_and_the_release_use_indexes_on_large_tables(conn, workers):
    w = limited(workers, 1)
    load_finished_runs(conn, 20_000)
    conn.execute("""
        insert into pgflow.runs (name, version, queue, status, input, created_at, available_at,
                                 concurrency_key, held_by)
        select 'wf', '1', 'default', 'pending', '["a"]', now(), now(), 'a', 'key:["wf", "a"]'
        from generate_series(1, 2000)""")
    conn.execute("analyze pgflow.runs")
    run = start(conn, input=["b"])
    c = w.claim_one()
    assert c.run_id == run
    assert_plan_uses(conn, """explain (format json)
        select r.id from pgflow.runs r
        where r.status = 'pending' and r.held_by is null and r.queue = 'default'
          and r.available_at <= now()
        order by r.priority desc, r.available_at limit 128""", "runs", "runs_claimable")
    assert_plan_uses(conn, """explain (format json)
        select p.id from pgflow.runs p
        where p.held_by = 'key:["wf", "a"]' and p.status = 'pending'
        order by p.priority desc, p.available_at limit 1""", "runs", "runs_held")
    w.complete_run(run, c.token)
    assert len(held(conn)) == 2000  # b's release unparks nothing of a's
