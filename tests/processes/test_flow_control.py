"""Flow control with real worker processes: concurrency per key, rate limits, pauses, fairness.

Every assertion is an invariant read back from the database (recorded
intervals, ``runs.started_at``, ``pgflow.slots``), never a speed: the
``wait_for`` deadlines only bound a hang. Figures (overlaps, throughput,
delays) are printed for the record (``pytest -s``).

The workflows are in ``tests/support/workflows/limited.py``.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgflow
import pgflow.testing
from pgflow.flow import list_queues
from tests.support.helpers import wait_for, wait_registered
from tests.support.workflows.limited import (
    create_intervals,
    limited_sleeper,
    pausable,
    per_customer,
    rated,
)

MODULE = "tests.support.workflows.limited"
CUSTOMERS = [f"cust-{i}" for i in range(5)]
RUNS = 300
LIMIT = 2  # per_customer's Concurrency(limit=2, key="customer")
pytestmark = pytest.mark.slow


def _start_customers(conn: psycopg.Connection[Any], count: int) -> set[str]:
    """``count`` runs of per_customer, round-robin over CUSTOMERS, in one transaction."""
    with conn.transaction():
        return {str(pgflow.start(conn, per_customer, CUSTOMERS[n % len(CUSTOMERS)], n))
                for n in range(count)}


def _count(conn: psycopg.Connection[Any], name: str, status: str) -> int:
    return conn.execute("select count(*) from pgflow.runs where name = %s and status = %s",
                        (name, status)).fetchone()[0]


def _taken_slots(conn: psycopg.Connection[Any]) -> int:
    return conn.execute("select count(*) from pgflow.slots where run_id is not null").fetchone()[0]


def _max_overlap(spans: Iterable[tuple[datetime, datetime]]) -> int:
    """The most intervals ``[start, end]`` that share an instant (an end counts before a start
    at the same instant: a slot is given back after its body ended and taken before the next
    body starts)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans],
                    key=lambda e: (e[0], e[1]))
    most = current = 0
    for _, delta in events:
        current += delta
        most = max(most, current)
    return most


def _overlaps_by_key(rows: Iterable[tuple[str, datetime, datetime]]) -> dict[str, int]:
    spans: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for key, start, end in rows:
        assert start <= end, (key, start, end)
        spans[key].append((start, end))
    return {key: _max_overlap(s) for key, s in sorted(spans.items())}


def test_three_workers_run_at_most_two_per_customer(dsn, conn, processes):
    """300 runs over 5 customers, Concurrency(limit=2, key="customer"), 3 workers of 8.

    The workers could run 24 at once: the limit (2 per customer, 10 in all) is
    what bounds. Each step body logs its interval on the database clock; a
    body runs inside its run's claim (slot taken before, given back after), so
    overlapping bodies mean overlapping slot holders. No worker dies here, so
    each run's step executes exactly once.
    """
    create_intervals(conn)
    for _ in range(3):
        processes.worker(dsn, MODULE, concurrency=8)
    wait_registered(conn, 3)
    began = time.monotonic()
    run_ids = _start_customers(conn, RUNS)

    wait_for(lambda: _count(conn, "per_customer", "completed") == RUNS, timeout=240,
             what=f"{RUNS} completed runs")
    elapsed = time.monotonic() - began

    rows = conn.execute("select run_id, key, started_at, ended_at from public.intervals"
                        ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(run_ids)  # one execution a run
    assert all(r[3] is not None for r in rows)
    overlaps = _overlaps_by_key((key, start, end) for _, key, start, end in rows)
    print(f"\n{RUNS} runs in {elapsed:.1f}s; most overlapping runs per customer: {overlaps}")
    assert set(overlaps) == set(CUSTOMERS)
    assert max(overlaps.values()) == LIMIT  # reached (the test bites), never exceeded
    assert _taken_slots(conn) == 0
    assert conn.execute("select count(*) from pgflow.runs where held_by is not null"
                        ).fetchone()[0] == 0


def test_a_killed_worker_breaks_no_limit_and_its_slots_come_back(dsn, conn, processes):
    """As above, with one of the three workers SIGKILLed after a third of the runs completed.

    What is counted: every execution of a step body, the killed ones included.
    An execution the kill cut short has a logged start and no end; its body
    really ran until the process died, which was before the test read the
    database clock after ``wait()`` returned (``killed_at``). So it is counted
    as the interval ``[start, killed_at]``: an upper bound of the truth, which
    makes the check stricter, not looser. The interrupted run keeps its slot
    until the engine recovers it (after the kill), and its step executes
    again, after that, on a survivor: a limit that let the re-execution start
    while the killed body might still run would show here as a third overlap.
    """
    create_intervals(conn)
    workers = [processes.worker(dsn, MODULE, concurrency=8) for _ in range(3)]
    wait_registered(conn, 3)
    run_ids = _start_customers(conn, RUNS)

    wait_for(lambda: _count(conn, "per_customer", "completed") >= RUNS // 3, timeout=240,
             what="a third of the runs completed")
    pids = [w.pid for w in workers]
    busy_pid = wait_for(lambda: conn.execute(
        "select pid from public.intervals where ended_at is null and pid = any(%s)"
        " order by started_at desc limit 1", (pids,)).fetchone(),
        timeout=60, what="a worker in a step body")[0]
    victim = next(w for w in workers if w.pid == busy_pid)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    killed_at = conn.execute("select clock_timestamp()").fetchone()[0]

    wait_for(lambda: _count(conn, "per_customer", "completed") == RUNS, timeout=240,
             what=f"all {RUNS} runs completed after the kill")
    assert all(w.poll() is None for w in workers if w is not victim)

    rows = conn.execute("select run_id, key, pid, started_at, ended_at from public.intervals"
                        ).fetchall()
    cut_short = [r for r in rows if r[4] is None]
    assert {r[2] for r in cut_short} <= {victim.pid}
    assert all(r[3] <= killed_at for r in cut_short)
    finished = {r[0] for r in rows if r[4] is not None}
    assert finished == run_ids  # every run's step ran to its end at least once
    assert {r[0] for r in cut_short} <= run_ids
    overlaps = _overlaps_by_key((key, start, end or killed_at)
                                for _, key, _, start, end in rows)
    print(f"\n{len(cut_short)} step execution(s) cut short by the kill, "
          f"{len(rows) - RUNS} re-execution(s); most overlapping executions per customer "
          f"(cut-short ones counted until the kill): {overlaps}")
    assert max(overlaps.values()) <= LIMIT
    # The dead worker's runs gave their slots back; nothing is left taken or parked.
    assert _taken_slots(conn) == 0
    assert conn.execute("select count(*) from pgflow.runs"
                        " where status <> 'completed' or held_by is not null").fetchone()[0] == 0


def test_a_sleeping_run_holds_no_slot(dsn, conn, effects, processes):
    """Concurrency(limit=1, key="k"): A sleeps an hour of engine time (the clock stays put),
    B of the same key runs to its end meanwhile; the clock moved, A wakes and completes."""
    processes.worker(dsn, MODULE, concurrency=4)
    wait_registered(conn, 1)
    a = pgflow.start(conn, limited_sleeper, "k1", 1)
    wait_for(lambda: pgflow.get(conn, a).status == "sleeping", timeout=60, what="A asleep")
    assert conn.execute("select count(*) from pgflow.slots where run_id = %s",
                        (a,)).fetchone()[0] == 0

    b = pgflow.start(conn, limited_sleeper, "k1", 0)
    assert pgflow.result(conn, b, timeout=60) == "awake"
    assert pgflow.get(conn, a).status == "sleeping"
    assert effects.count(a) == 0 and effects.count(b) == 1

    pgflow.testing.advance_time(conn, timedelta(hours=1))
    assert pgflow.result(conn, a, timeout=60) == "awake"
    assert effects.count(a) == 1
    assert _taken_slots(conn) == 0


def test_a_rate_limit_caps_starts_in_every_one_second_window(dsn, conn, processes):
    """RateLimit(10, per=1 s) on the queue; 100 runs ready at once (started while it is paused).

    ``runs.started_at`` is the engine time of the claim that first took the run,
    the time the rate slot was taken at: no half-open window ``[t, t + 1 s)``
    holds more than 10 of them. It follows that the 100 starts span at least
    9 s (nine windows hold at most 90): the only time bound asserted.
    """
    pgflow.set_queue(conn, "fc_rated", rate_limit=pgflow.RateLimit(10, per=timedelta(seconds=1)))
    pgflow.pause_queue(conn, "fc_rated")
    with conn.transaction():
        run_ids = [pgflow.start(conn, rated, n) for n in range(100)]
    processes.worker(dsn, MODULE, concurrency=16)
    wait_registered(conn, 1)
    pgflow.resume_queue(conn, "fc_rated")

    wait_for(lambda: _count(conn, "rated", "completed") == 100, timeout=120,
             what="100 rate-limited runs completed")
    starts = [r[0] for r in conn.execute(
        "select started_at from pgflow.runs where id = any(%s) order by started_at",
        (run_ids,))]
    window = timedelta(seconds=1)
    most = max(sum(1 for s in starts[i:] if s < t + window) for i, t in enumerate(starts))
    span = (starts[-1] - starts[0]).total_seconds()
    print(f"\n100 starts over {span:.2f}s: {99 / span:.1f} starts/s after the first"
          f" (limit 10/s); most starts in a 1 s window: {most}")
    assert most <= 10
    assert span >= 9


def test_a_paused_queue_claims_nothing_until_resumed(dsn, conn, processes):
    """Five runs pend on a paused queue for 5 s while the worker serves another queue."""
    pgflow.pause_queue(conn, "fc_paused")
    with conn.transaction():
        held = [pgflow.start(conn, pausable, n) for n in range(5)]
    processes.worker(dsn, MODULE, concurrency=4)
    wait_registered(conn, 1)
    # The worker claims: a run of an open queue completes meanwhile.
    assert pgflow.result(conn, pgflow.start(conn, rated, 7), timeout=60) == 7

    time.sleep(5)
    rows = conn.execute("select status, started_at, held_by from pgflow.runs where id = any(%s)",
                        (held,)).fetchall()
    assert rows == [("pending", None, None)] * 5
    [queue] = [q for q in list_queues(conn) if q.name == "fc_paused"]
    assert (queue.paused, queue.pending, queue.running) == (True, 5, 0)

    resumed_at = conn.execute("select pgflow.now()").fetchone()[0]
    pgflow.resume_queue(conn, "fc_paused")
    assert [pgflow.result(conn, r, timeout=60) for r in held] == list(range(5))
    assert all(r[0] >= resumed_at for r in conn.execute(
        "select started_at from pgflow.runs where id = any(%s)", (held,)))


BACKLOG = 10_000


def test_one_customers_backlog_does_not_hold_up_the_others(dsn, conn, processes):
    """Concurrency(limit=1, key="customer"): 10,000 runs of one customer, then one run each
    for five new customers while that backlog drains (one at a time, by the limit).

    The newcomers sit behind the whole backlog in claim order; each must begin
    while the big customer still has pending runs. Pending only decreases
    here, so pending runs left when the last newcomer has started mean every
    newcomer started before the backlog drained. The backlog is started in
    one SQL statement (a second or two); the claim parks a full scope's runs
    at most 512 a call, so a newcomer waits behind some twenty parking walks,
    and the big customer, at one run at a time, drains far slower than that.
    The delay is printed, never asserted.
    """
    processes.worker(dsn, MODULE, concurrency=8)
    processes.worker(dsn, MODULE, concurrency=8)
    wait_registered(conn, 2)
    conn.execute(
        "select pgflow.start_run(name => 'fair_share', input => jsonb_build_array('big', g),"
        " queue => 'fc_fair', version => '1') from generate_series(1, %s) g", (BACKLOG,))
    wait_for(lambda: _count(conn, "fair_share", "completed") >= 1, timeout=60,
             what="the backlog draining")

    with conn.transaction():
        newcomers = [pgflow.start(conn, "fair_share", customer=f"new-{i}", n=i)
                     for i in range(5)]

    def started() -> bool:
        return conn.execute("select count(*) from pgflow.runs where id = any(%s)"
                            " and started_at is not null", (newcomers,)).fetchone()[0] == 5

    wait_for(started, timeout=180, what="the five newcomers started")
    big_pending, big_started = conn.execute(
        "select count(*) filter (where status = 'pending'),"
        " count(*) filter (where started_at is not null)"
        " from pgflow.runs where concurrency_key = 'big'").fetchone()
    delays = [r[0].total_seconds() for r in conn.execute(
        "select started_at - created_at from pgflow.runs where id = any(%s)"
        " order by concurrency_key", (newcomers,))]
    print(f"\nnewcomers began {', '.join(f'{d:.3f}' for d in delays)}s after their start;"
          f" meanwhile the big customer began {big_started} of {BACKLOG} runs"
          f" ({big_pending} still pending)")
    assert big_pending > 0
    assert [pgflow.result(conn, r, timeout=60) for r in newcomers] == list(range(5))
    keys = {r[0] for r in conn.execute(
        "select concurrency_key from pgflow.runs where id = any(%s)", (newcomers,))}
    assert keys == {f"new-{i}" for i in range(5)}
    # Still one big run at a time: never two of its runs running together.
    assert conn.execute("select count(*) from pgflow.runs where concurrency_key = 'big'"
                        " and status = 'running'").fetchone()[0] <= 1
