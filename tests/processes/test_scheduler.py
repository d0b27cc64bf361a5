"""The timer scheduler across real worker processes: leadership, takeover, scale."""

from __future__ import annotations

import signal
import time
from datetime import timedelta

import pytest

import pgflow
from pgflow.testing import advance_time
from tests.support.helpers import scheduler_leader_pid, wait_for, wait_registered
from tests.support.workflows.sleepers import nap, quiet_nap

MODULE = "tests.support.workflows.sleepers"
pytestmark = pytest.mark.slow



def test_one_leader_and_a_survivor_takes_over_after_sigkill(dsn, conn, effects, processes):
    workers = [processes.worker(dsn, MODULE), processes.worker(dsn, MODULE)]
    wait_registered(conn, 2)
    leader = wait_for(lambda: scheduler_leader_pid(conn), what="a scheduler leader")
    assert leader in {w.pid for w in workers}
    # exactly one lock holder, whatever the number of processes
    holders = conn.execute(
        "select count(*) from pg_locks where locktype = 'advisory' and classid = 7366504"
        " and granted and database = (select oid from pg_database"
        " where datname = current_database())").fetchone()[0]
    assert holders == 1

    runs = [pgflow.start(conn, nap, 1.5) for _ in range(20)]
    wait_for(lambda: conn.execute("select count(*) from pgflow.timers").fetchone()[0] == 20,
             what="20 timers")
    victim = next(w for w in workers if w.pid == leader)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    killed_at = time.monotonic()

    survivor = next(w for w in workers if w is not victim)
    # The killed process's backend may still hold the lock for a moment (it
    # exits once it notices the closed socket): wait for a leader that is not it.
    new_leader = wait_for(lambda: (pid := scheduler_leader_pid(conn)) != victim.pid and pid,
                          timeout=60, what="a new leader")
    print(f"new scheduler leader after {time.monotonic() - killed_at:.2f}s")
    assert new_leader == survivor.pid

    for run_id in runs:
        assert pgflow.result(conn, run_id, timeout=60) == "awake"
    assert effects.count(step="wake_up") == 20
    lateness = conn.execute(
        "select max(extract(epoch from s.finished_at - (s.output ->> 'until')::timestamptz))"
        " from pgflow.steps s where s.kind = 'sleep'").fetchone()[0]
    print(f"worst timer lateness across the takeover: {lateness * 1000:.0f} ms")


SLEEPERS = 10_000


def test_ten_thousand_sleepers_survive_a_worker_restart(dsn, conn, processes):
    """All asleep at once, the worker replaced mid-sleep, all woken: each once.

    The hour-long sleep is cut short with advance_time, which fires all
    10,000 timers together; real-clock lateness is measured in bench/ (W4b).
    """
    with conn.transaction():
        for _ in range(SLEEPERS):
            pgflow.start(conn, quiet_nap, 3600)
    first = processes.worker(dsn, MODULE, concurrency=20)
    wait_for(lambda: conn.execute("select count(*) from pgflow.runs where status = 'sleeping'"
                                  ).fetchone()[0] == SLEEPERS, timeout=120, interval=0.2,
             what=f"{SLEEPERS} sleeping runs")
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    processes.worker(dsn, MODULE, concurrency=20)
    wait_registered(conn, 1)

    assert advance_time(conn, timedelta(hours=1)) == SLEEPERS
    wait_for(lambda: conn.execute("select count(*) from pgflow.runs where status = 'completed'"
                                  ).fetchone()[0] == SLEEPERS, timeout=120, interval=0.5,
             what=f"{SLEEPERS} completed runs")
    per_run = conn.execute(
        "select count(*) filter (where kind = 'step'), count(*) filter (where kind = 'sleep')"
        " from pgflow.steps group by run_id").fetchall()
    assert len(per_run) == SLEEPERS
    assert set(per_run) == {(1, 1)}  # each slept once, woke once and did its step once
    assert conn.execute("select count(*) from pgflow.timers").fetchone()[0] == 0
