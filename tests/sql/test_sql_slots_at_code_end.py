"""A capped run's slots go back when its code returns (revision 0014), the claim called directly.

The worker names the runs whose code returned in its next claim (``claim_runs``'
``p_ended`` and ``p_ended_tokens``); the claim gives their slots back first, fenced as a
report is, and may take them in the same call. Their completions then give nothing back.
A worker waiting for the queue's slots is woken only for those the claim leaves free
(revision 0015).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.sql.test_sql_flow_control import PARAMS, held, holders
from tests.support.sqlkit import Claim, Worker, listener, received, run_row, start, worker_factory


@pytest.fixture
def workers(dsn: str) -> Iterator[Callable[..., Worker]]:
    with worker_factory(dsn) as make:
        yield make


def claim_after(worker: Worker, ended: list[Claim], tokens: list[int] | None = None,
                limit: int = 10) -> list[uuid.UUID]:
    """The runs a claim takes after giving back the slots of ``ended`` (at ``tokens``)."""
    rows = worker.db.execute(
        "select run_id from pgflow.claim_runs(%s, %s::text[], %s::text[], %s::text[], %s, %s, %s)",
        (worker.id, worker.queues, [n for n, _ in worker.pairs], [v for _, v in worker.pairs],
         limit, [c.run_id for c in ended], tokens or [c.token for c in ended])).fetchall()
    return [r[0] for r in rows]


def test_a_claim_gives_back_the_slots_of_runs_whose_code_ended_and_takes_them(conn, workers):
    w = workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 2)")
    runs = [start(conn) for _ in range(4)]
    first = w.claim(10)
    assert [c.run_id for c in first] == runs[:2]
    assert w.claim(10) == []  # the cap is full
    assert claim_after(w, first[:1]) == [runs[2]]
    assert holders(conn) == {"queue:default": 2}
    ended = run_row(conn, runs[0])
    assert (ended["status"], ended["holds_slots"]) == ("running", False)
    w.complete_run(first[0].run_id, first[0].token)  # gives nothing back now
    assert holders(conn) == {"queue:default": 2}
    assert w.claim(10) == []


def test_only_the_workers_own_runs_at_their_tokens_give_their_slots_back(conn, workers):
    owner, other = workers(), workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 1)")
    runs = [start(conn) for _ in range(2)]
    [claimed] = owner.claim(10)
    assert claim_after(other, [claimed]) == []  # not its run
    assert claim_after(owner, [claimed], tokens=[claimed.token + 1]) == []  # a stale token
    assert run_row(conn, runs[0])["holds_slots"] is True
    assert claim_after(owner, [claimed]) == [runs[1]]
    assert claim_after(owner, [claimed]) == []  # given back once: the slot is runs[1]'s now


def test_a_key_slot_given_back_at_code_end_unparks_a_run_the_same_claim_takes(conn, workers):
    w = workers(announce={"wf": {"params": PARAMS, "concurrency": {"limit": 1, "key": "c"}}})
    runs = [start(conn, input=["a"]) for _ in range(2)]
    [claimed] = w.claim(10)
    assert [r for r, _ in held(conn)] == runs[1:]
    assert claim_after(w, [claimed]) == [runs[1]]
    assert held(conn) == []
    assert holders(conn) == {'key:["wf", "a"]': 1}


def test_slots_the_claim_takes_again_wake_nobody(dsn, conn, workers):
    """An idle worker found the cap full (the queue is starved); the next claim that gives
    slots back takes them all: no NOTIFY, which would wake a worker (this one, often) for a
    claim that finds the cap full again."""
    w = workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 2)")
    runs = [start(conn) for _ in range(4)]
    with listener(dsn, guards=["default"]) as listen:
        first = w.claim(10)
        assert w.claim(10) == []  # the cap is full: the queue is starved
        assert received(listen, conn, "pgflow_ready") == []
        assert claim_after(w, first) == runs[2:]
        assert received(listen, conn, "pgflow_ready") == []
    assert holders(conn) == {"queue:default": 2}


@pytest.mark.parametrize("pending", [0, 1])
def test_slots_the_claim_leaves_free_wake_the_waiting_workers(dsn, conn, workers, pending):
    """Given back with nothing left to take, or more than the claim takes: the queue's
    waiting workers are woken, once."""
    w = workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 2)")
    runs = [start(conn) for _ in range(2 + pending)]
    with listener(dsn, guards=["default"]) as listen:
        first = w.claim(10)
        assert w.claim(10) == []  # the cap is full: the queue is starved
        assert claim_after(w, first, limit=1) == runs[2:]
        assert received(listen, conn, "pgflow_ready") == ["default"]
        assert claim_after(w, []) == []  # no slot given back: nobody woken again
        assert received(listen, conn, "pgflow_ready") == []
    assert holders(conn) == ({"queue:default": 1} if pending else {})


def test_under_a_lowered_cap_a_slot_given_back_goes_to_a_run_above_it_first(conn, workers):
    """The claim hands an ended run's queue slot to the next run it takes, except where the
    cap was lowered below a slot still held: there the slot goes to that run (hand-down),
    and the queue stays at its new cap."""
    w = workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 3)")
    runs = [start(conn) for _ in range(4)]
    first = w.claim(10)
    assert [c.run_id for c in first] == runs[:3]
    conn.execute("select pgflow.set_queue('default', concurrency => 2)")
    assert claim_after(w, first[:1]) == []  # runs[3] waits: two still execute
    slots = dict(conn.execute("select run_id, slot from pgflow.slots"
                              " where scope = 'queue:default' and run_id is not null").fetchall())
    assert slots == {runs[1]: 2, runs[2]: 1}  # runs[2] moved down from slot 3
    assert claim_after(w, first[1:2]) == [runs[3]]  # now handed on
    assert holders(conn) == {"queue:default": 2}


def test_a_run_whose_completion_holds_its_row_is_left_to_that_completion(dsn, conn, workers):
    w = workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 1)")
    runs = [start(conn) for _ in range(2)]
    [claimed] = w.claim(10)
    with psycopg.connect(dsn) as reporter:
        reporter.execute("select pgflow.complete_run(%s, %s, '\"done\"')",
                         (claimed.run_id, claimed.token))
        assert claim_after(w, [claimed]) == []  # row and slot locked: skipped, never waited for
    assert claim_after(w, [claimed]) == [runs[1]]  # the completion gave the slot back
    assert run_row(conn, runs[0])["status"] == "completed"


def test_an_older_worker_claims_with_five_arguments_as_before(conn, workers):
    w = workers()
    conn.execute("select pgflow.set_queue('default', concurrency => 1)")
    runs = [start(conn) for _ in range(2)]
    [claimed] = w.claim(10)  # five arguments
    w.complete_run(claimed.run_id, claimed.token)  # its completion gives the slot back
    assert [c.run_id for c in w.claim(10)] == runs[1:]
