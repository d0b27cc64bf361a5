"""Schedules fired by the workers' scheduler leader, across processes and a SIGKILL."""

from __future__ import annotations

import signal
from datetime import timedelta

import pytest

import pgflow
from tests.support.helpers import (
    align_clock,
    scheduler_leader_pid,
    wait_for,
    wait_registered,
)

MODULE = "tests.support.workflows.scheduled"
HOUR = timedelta(hours=1)
pytestmark = pytest.mark.slow


def test_five_hourly_ticks_start_five_runs_across_a_killed_leader(dsn, conn, effects,
                                                                  processes):
    """Two workers (two scheduler candidates); the leader is SIGKILLed after two ticks.

    The clock moves with the SQL pgflow.advance_time, which fires timers but
    not schedule ticks: every tick here is fired by whichever worker leads.
    Each tick is 15 minutes late when the clock lands on it, inside the
    2-hour catch-up window.
    """
    workers = [processes.worker(dsn, MODULE), processes.worker(dsn, MODULE)]
    wait_registered(conn, 2)
    start = align_clock(conn)
    pgflow.create_schedule(conn, "hourly", "report_tick", cron="0 * * * *", args=["h"],
                           catchup_window=2 * HOUR)

    def finished() -> int:
        return conn.execute("select count(*) from pgflow.runs where schedule_id = 'hourly'"
                            " and status = 'completed'").fetchone()[0]

    for hour in range(1, 6):
        conn.execute("select pgflow.advance_time(%s)", (HOUR,))
        wait_for(lambda n=hour: finished() == n, timeout=60, what=f"tick {hour}'s run")
        if hour == 2:
            leader = wait_for(lambda: scheduler_leader_pid(conn), what="the leader")
            victim = next(w for w in workers if w.pid == leader)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            wait_for(lambda old=leader: scheduler_leader_pid(conn) not in (None, old),
                     timeout=60, what="the survivor to lead")

    rows = conn.execute("select scheduled_time, output, key from pgflow.runs"
                        " where schedule_id = 'hourly' order by scheduled_time").fetchall()
    expected = [(start + HOUR * h).replace(minute=0) for h in range(1, 6)]
    assert [r[0] for r in rows] == expected
    assert [r[1] for r in rows] == [t.isoformat() for t in expected]  # ctx.scheduled_time
    assert len({r[2] for r in rows}) == 5
    assert conn.execute("select count(*), count(*) filter (where outcome = 'started')"
                        " from pgflow.schedule_ticks").fetchone() == (5, 5)
    assert conn.execute("select count(*) from pgflow.runs").fetchone()[0] == 5
