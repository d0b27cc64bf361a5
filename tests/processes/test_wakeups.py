"""No wake-up lost while starts skip the NOTIFY (revision 0012), with real worker processes.

Workers that never poll (within the test) must pick up every run from a NOTIFY or
from the claim they make after guarding their queues (pgflow/claims.py). Producers on
several connections start runs in bursts, some inside transactions held open for a
while, so the workers keep going from busy (nothing guarded, starts skip the NOTIFY)
to idle (guarded, starts NOTIFY) and back, and some guards are refused by an open
transaction. A run lost on the way would stay pending for the hour-long poll.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg
import pytest

import pgflow
from tests.support import invariants
from tests.support.helpers import Processes, wait_for, wait_registered
from tests.support.workflows import chaos

MODULE = "tests.support.workflows.chaos"
pytestmark = pytest.mark.slow
REPORT_LABEL = "wakeups"

PRODUCERS = 4
RUNS_EACH = 60
NEVER_POLL = {"PGFLOW_TEST_POLL_INTERVAL": "3600"}


def produce(dsn: str, seed: int, started: list[Any]) -> None:
    """Bursts of 1-6 starts, each burst one transaction, sometimes held open."""
    rng = random.Random(seed)
    with psycopg.connect(dsn) as conn:
        made = 0
        while made < RUNS_EACH:
            burst = min(rng.randint(1, 6), RUNS_EACH - made)
            for _ in range(burst):
                started.append(pgflow.start(conn, chaos.ping, seed * 1000 + made))
                made += 1
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0.005, 0.05))  # open, holding its wake stripe
            conn.commit()
            time.sleep(rng.choice((0.0, 0.001, 0.01, 0.03)))


def test_no_run_waits_for_a_poll_while_starts_skip_their_notify(dsn, conn, processes: Processes,
                                                                 report):
    invariants.prepare_effects(conn)
    workers = [processes.worker(dsn, MODULE, concurrency=2, extra_env=NEVER_POLL)
               for _ in range(2)]
    wait_registered(conn, 2)
    started: list[Any] = []
    rounds = []
    watcher = psycopg.connect(dsn, autocommit=True)  # counts the NOTIFYs sent (it does not guard)
    watcher.execute("listen pgflow_ready")
    for round_no in range(3):
        threads = [threading.Thread(target=produce, args=(dsn, round_no * 10 + k, started))
                   for k in range(PRODUCERS)]
        began = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: conn.execute("select count(*) from pgflow.runs where status <>"
                                      " 'completed'").fetchone()[0] == 0,
                 timeout=120, interval=0.05,
                 what=f"every run completed, round {round_no} (none left for a poll)")
        rounds.append(round(time.monotonic() - began, 2))
        time.sleep(0.3)  # the workers go idle: they guard again

    assert all(w.poll() is None for w in workers)
    assert len(started) == 3 * PRODUCERS * RUNS_EACH
    # Both are workers of this revision, and idle ones hold their guard.
    assert conn.execute("select bool_and(guards_wakes), count(*) from pgflow.workers"
                        ).fetchone() == (True, 2)
    wait_for(lambda: conn.execute(
        "select count(distinct pid) from pg_locks where locktype = 'advisory'"
        " and classid = 7366506 and mode = 'ShareLock' and granted and database ="
        " (select oid from pg_database where datname = current_database())").fetchone()[0] == 2,
        timeout=30, what="both idle workers guarding their queue")
    notified = sum(1 for n in watcher.notifies(timeout=0.5) if n.channel == "pgflow_ready")
    watcher.close()
    report("no lost wake-up", runs=len(started), producers=PRODUCERS, rounds_s=rounds,
           ready_notifies=notified)


def test_a_run_watched_while_its_worker_claims_it_is_still_picked_up(dsn, conn,
                                                                      processes: Processes):
    """result() right after start() locks the run's row (pgflow.watch) while the idle worker
    woken by the start claims it; the claim skips the locked row. Here the watch is held open
    on purpose while the worker is woken (by resume_queue); its commit must wake the worker
    again (revision 0013), or the run waits for the hour-long poll."""
    invariants.prepare_effects(conn)
    processes.worker(dsn, MODULE, concurrency=2, extra_env=NEVER_POLL)
    wait_registered(conn, 1)
    queue = chaos.ping.queue
    for n in range(3):
        pgflow.pause_queue(conn, queue)
        run_id = pgflow.start(conn, chaos.ping, n)
        with psycopg.connect(dsn) as watcher:
            watcher.execute("select pgflow.watch(%s)", (run_id,))  # the row, locked to commit
            since = conn.execute("select clock_timestamp()").fetchone()[0]
            pgflow.resume_queue(conn, queue)  # NOTIFYs: the worker claims and skips the row
            wait_for(lambda since=since: _claimed_after(conn, since), timeout=30,
                     what="the worker's claim after the resume")
            watcher.commit()
        assert pgflow.result(conn, run_id, timeout=60) == f"pong:{n}"


def _claimed_after(conn: psycopg.Connection[Any], since: Any) -> bool:
    """Whether a claim that started after ``since`` has ended (its session idle)."""
    return conn.execute(
        "select exists (select 1 from pg_stat_activity where datname = current_database()"
        " and state = 'idle' and query like '%%pgflow.claim_runs(%%' and query_start > %s)",
        (since,)).fetchone()[0]
