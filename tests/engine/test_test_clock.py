"""The test clock can be put back, and moving it never makes purge delete a run early."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import pgflow
from pgflow.testing import advance_time, reset_time, time_travel
from tests.support import sqlkit
from tests.support.helpers import wait_status


@pgflow.workflow(name="clock_nap")
def clock_nap(ctx: pgflow.Context, hours: int) -> str:
    ctx.sleep(timedelta(hours=hours))
    return "rested"


def _offset(conn) -> timedelta:
    return conn.execute("select offset_by from pgflow.clock").fetchone()[0]


def test_reset_time_puts_the_engine_clock_back_to_real_time(conn):
    advance_time(conn, timedelta(days=37))
    assert sqlkit.engine_now(conn) - datetime.now(timezone.utc) > timedelta(days=36)
    assert reset_time(conn) == timedelta(days=37)   # what it replaced
    assert _offset(conn) == timedelta(0)
    assert abs(sqlkit.engine_now(conn) - datetime.now(timezone.utc)) < timedelta(hours=1)


def test_time_travel_restores_the_clock_it_found(conn):
    reset_time(conn, timedelta(days=1))   # a database whose clock was already ahead
    with time_travel(conn) as clock:
        assert clock.offset == timedelta(days=1)
        clock.advance(timedelta(days=5))
        assert clock.offset == timedelta(days=6)
    assert _offset(conn) == timedelta(days=1)
    with pytest.raises(RuntimeError), time_travel(conn) as clock:
        clock.advance(timedelta(hours=3))
        raise RuntimeError("a failing test")
    assert _offset(conn) == timedelta(days=1)


def test_time_travel_drives_a_real_worker(conn, inprocess_worker):
    inprocess_worker.start([clock_nap])
    with time_travel(conn) as clock:
        run_id = pgflow.start(conn, clock_nap, 5)
        wait_status(conn, run_id, "sleeping")
        assert clock.advance(timedelta(hours=5)) == 1
        assert pgflow.result(conn, run_id, timeout=30) == "rested"
    assert _offset(conn) == timedelta(0)


def test_reset_time_refuses_bad_offsets(conn):
    for bad in (timedelta(days=-1), timedelta(days=365 * 101)):
        with pytest.raises(ValueError):
            reset_time(conn, bad)
    assert _offset(conn) == timedelta(0)


def test_purge_ages_runs_by_real_time_not_the_test_clock(conn):
    finished = sqlkit.start(conn, "wf")
    conn.execute("update pgflow.runs set status = 'completed', output = 'null',"
                 " started_at = now(), finished_at = now() where id = %s", (finished,))
    advance_time(conn, timedelta(days=37))
    # the run finished moments ago in real time: a clock moved ahead does not age it
    assert conn.execute("select pgflow.purge(interval '30 days')").fetchone()[0] == 0
    conn.execute("update pgflow.runs set finished_at = now() - interval '31 days'")
    assert conn.execute("select pgflow.purge(interval '30 days')").fetchone()[0] == 1


def test_the_clock_tools_are_the_owners_alone(conn):
    granted = conn.execute(
        "select count(*) from information_schema.routine_privileges"
        " where routine_schema = 'pgflow' and routine_name in ('reset_time', 'advance_time')"
        "   and grantee <> current_user").fetchone()[0]
    assert granted == 0
