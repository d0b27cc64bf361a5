"""Schedules end to end: a real worker (its scheduler leader included), the test clock.

The clock is put at a known minute first (hh:15), so which ticks fall in a
span is exact; ``pgflow.testing.advance_time`` stops at each tick on the way.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgflow
import pgflow.aio
import pgflow.ticker
from pgflow.schedules import build_spec
from pgflow.testing import advance_time
from pgflow.timetable import jitter_for
from tests.support.helpers import align_clock, wait_for
from tests.support.workflows.scheduled import held_tick, report_tick

Conn = psycopg.Connection[Any]
HOUR = timedelta(hours=1)


def scheduled_runs(conn: Conn, schedule_id: str) -> list[tuple[Any, ...]]:
    return conn.execute("select id, scheduled_time, status, output from pgflow.runs"
                        " where schedule_id = %s order by scheduled_time", (schedule_id,)
                        ).fetchall()


def outcomes(conn: Conn, schedule_id: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "select outcome from pgflow.schedule_ticks where schedule_id = %s"
        " order by scheduled_time", (schedule_id,))]


def settled(conn: Conn, schedule_id: str) -> bool:
    """No run of the schedule is pending or running: the worker is done with them for now."""
    return not conn.execute("select 1 from pgflow.runs where schedule_id = %s"
                            " and status in ('pending', 'running')", (schedule_id,)).fetchone()


@pytest.fixture
def worker(inprocess_worker, effects):
    return inprocess_worker.start([report_tick, held_tick])


def test_an_hourly_schedule_starts_one_run_an_hour_with_its_scheduled_time(conn, worker,
                                                                           effects):
    start = align_clock(conn)
    pgflow.create_schedule(conn, "hourly", report_tick, cron="0 * * * *", args=["h"])
    for hour in range(1, 6):
        advance_time(conn, HOUR)
        wait_for(lambda n=hour: len(scheduled_runs(conn, "hourly")) == n
                 and settled(conn, "hourly"), what=f"run {hour}")
    runs = scheduled_runs(conn, "hourly")
    expected = [(start + HOUR * h).replace(minute=0) for h in range(1, 6)]
    assert [r[1] for r in runs] == expected
    assert [r[2] for r in runs] == ["completed"] * 5
    assert [r[3] for r in runs] == [t.isoformat() for t in expected]  # ctx.scheduled_time
    assert outcomes(conn, "hourly") == ["started"] * 5
    assert effects.count(step="tick:h") == 5


# What each policy does with a run that outlives the interval: ticks T1, T2, T3 come
# while the T1 run is unfinished, then it finishes, then T4 comes.
POLICIES = {
    "skip": (["started", "skipped", "skipped", "started"], ["T1", "T4"]),
    "buffer_one": (["started", "started", "skipped", "buffered"], ["T1", "T2"]),
    "buffer_all": (["started", "started", "buffered", "buffered"], ["T1", "T2"]),
    "cancel_other": (["started", "started", "started", "started"], ["T1", "T2", "T3", "T4"]),
    "allow_all": (["started", "started", "started", "started"], ["T1", "T2", "T3", "T4"]),
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_overlap_policies_with_a_run_that_outlives_the_interval(conn, worker, policy):
    start = align_clock(conn)
    ticks = {f"T{h}": (start + HOUR * h).replace(minute=0) for h in range(1, 5)}
    pgflow.create_schedule(conn, "o", held_tick, every=HOUR, args=["o"], overlap=policy)
    for name in ("T1", "T2", "T3"):
        advance_time(conn, HOUR)
        wait_for(lambda: settled(conn, "o"), what=f"runs of {name} waiting")
    first = scheduled_runs(conn, "o")[0]
    assert first[1] == ticks["T1"]
    if policy != "cancel_other":
        assert first[2] == "waiting"  # it outlived T2 and T3
        pgflow.signal(conn, first[0], "finish")
        assert pgflow.result(conn, first[0], timeout=60) == ticks["T1"].isoformat()
    wait_for(lambda: settled(conn, "o"), what="the buffered run, if any, to start")
    advance_time(conn, HOUR)
    wait_for(lambda: settled(conn, "o"), what="T4's run, if any")

    expected_outcomes, started = POLICIES[policy]
    assert outcomes(conn, "o") == expected_outcomes
    runs = scheduled_runs(conn, "o")
    assert [r[1] for r in runs] == [ticks[t] for t in started]
    statuses = [r[2] for r in runs]
    if policy == "cancel_other":
        assert statuses == ["cancelled", "cancelled", "cancelled", "waiting"]
    else:
        assert statuses[0] == "completed" and set(statuses[1:]) <= {"waiting"}
        # never two unfinished runs at once, except where allowed
        assert statuses.count("waiting") == (3 if policy == "allow_all" else 1)


def test_catch_up_after_a_pause_longer_than_the_window(conn, worker):
    start = align_clock(conn)  # hh:15
    pgflow.create_schedule(conn, "c", report_tick, cron="0 * * * *", args=["c"],
                           overlap="allow_all", catchup_window=timedelta(hours=2))
    pgflow.pause_schedule(conn, "c")
    advance_time(conn, 5 * HOUR)  # hh+1 .. hh+5 come due while paused: nothing starts
    assert scheduled_runs(conn, "c") == []
    pgflow.resume_schedule(conn, "c")
    advance_time(conn, 0)  # fire what is due now (the worker's leader may do it first)
    wait_for(lambda: len(outcomes(conn, "c")) == 5 and settled(conn, "c"), what="5 ticks decided")
    hour = [(start + HOUR * h).replace(minute=0) for h in range(1, 6)]
    # now hh+5:15, window 2 h: hh+1, hh+2, hh+3 are missed; hh+4 and hh+5 fire
    assert outcomes(conn, "c") == ["missed", "missed", "missed", "started", "started"]
    assert [r[1] for r in scheduled_runs(conn, "c")] == hour[3:]
    (next_fire,) = conn.execute("select next_fire_at from pgflow.schedules").fetchone()
    assert next_fire == (start + 6 * HOUR).replace(minute=0)


def test_a_backfill_across_the_march_dst_change_follows_paris_time_and_runs_once(conn, worker):
    pgflow.create_schedule(conn, "paris", report_tick, cron="0 9 * * *",
                           timezone="Europe/Paris", args=["p"])
    span = (datetime(2026, 3, 26, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
    started = pgflow.backfill_schedule(conn, "paris", *span)
    assert len(started) == 6
    wait_for(lambda: settled(conn, "paris"), what="the backfilled runs")
    times = [r[1] for r in scheduled_runs(conn, "paris")]
    assert [(t.day, t.hour) for t in times] == [(26, 8), (27, 8), (28, 8), (29, 7), (30, 7),
                                                (31, 7)]
    assert pgflow.backfill_schedule(conn, "paris", *span) == []
    # a wider range over the same days starts only the new days
    assert len(pgflow.backfill_schedule(conn, "paris", datetime(2026, 3, 24, tzinfo=UTC),
                                        span[1])) == 2
    assert len(scheduled_runs(conn, "paris")) == 8
    with pytest.raises(ValueError, match="must be after start"):
        pgflow.backfill_schedule(conn, "paris", span[1], span[0])
    with pytest.raises(pgflow.ScheduleNotFound, match="unknown schedule 'nope'"):
        pgflow.backfill_schedule(conn, "nope", *span)


def test_jitter_delays_each_tick_by_its_own_fixed_amount(conn, worker):
    align_clock(conn)
    bound = timedelta(minutes=20)
    pgflow.create_schedule(conn, "j", report_tick, every=HOUR, args=["j"], jitter=bound,
                           overlap="allow_all")
    for _ in range(4):
        advance_time(conn, HOUR)
    advance_time(conn, bound)  # now hh+4:35: T4 (hh+4:00 plus under 20 min) has fired, T5 not
    rows = conn.execute("select scheduled_time, created_at from pgflow.runs"
                        " where schedule_id = 'j' order by scheduled_time").fetchall()
    assert len(rows) == 4
    for scheduled, created in rows:
        delay = jitter_for("j", scheduled, bound)
        assert timedelta(0) <= delay < bound
        assert created >= scheduled + delay  # never before its jittered time
        assert created - scheduled < bound + timedelta(minutes=1)


def test_a_worker_applies_declared_schedules_and_deletes_those_removed_from_code(
        conn, inprocess_worker):
    nightly = build_spec("nightly", report_tick, cron="0 3 * * *", timezone="Europe/Paris",
                         args=["n"])
    other = build_spec("other", report_tick, every=HOUR, args=["o"])
    first = inprocess_worker.start([report_tick], schedules=[nightly, other])
    wait_for(lambda: conn.execute("select count(*) from pgflow.schedules").fetchone()[0] == 2,
             what="the worker to apply its schedules")
    rows = conn.execute("select id, cron, timezone, declared, paused from pgflow.schedules"
                        " order by id").fetchall()
    assert rows == [("nightly", "0 3 * * *", "Europe/Paris", True, False),
                    ("other", None, "UTC", True, False)]
    pgflow.create_schedule(conn, "runtime", report_tick, every=HOUR, args=["r"])
    pgflow.pause_schedule(conn, "nightly")
    first.stop()
    inprocess_worker.stop_all()
    # The next deploy declares only "nightly": "other" goes, "runtime" stays, the pause stays.
    inprocess_worker.start([report_tick], schedules=[nightly])

    def rows() -> list[tuple[Any, ...]]:
        return conn.execute("select id, declared, paused from pgflow.schedules order by id"
                            ).fetchall()

    wait_for(lambda: len(rows()) == 2, what="the second worker to apply its schedules")
    assert rows() == [("nightly", True, True), ("runtime", False, False)]


def test_trigger_starts_a_run_now_and_plain_runs_have_no_scheduled_time(conn, worker):
    pgflow.create_schedule(conn, "t", report_tick, cron="0 0 1 1 *", args=["t"])
    run_id = pgflow.trigger_schedule(conn, "t")
    output = pgflow.result(conn, run_id, timeout=60)
    (scheduled,) = conn.execute("select scheduled_time from pgflow.runs where id = %s",
                                (run_id,)).fetchone()
    assert output == scheduled.isoformat()
    plain = pgflow.start(conn, report_tick, "plain")
    assert pgflow.result(conn, plain, timeout=60) == "none"
    # The replay check sees the run's scheduled time, as the worker did.
    assert [s.name for s in pgflow.get(conn, run_id).steps] == ["note_tick"]
    assert pgflow.testing.check_replay(conn, run_id).ok
    assert pgflow.testing.check_replay(conn, plain).ok


BAD = [
    (dict(cron="61 * * * *"), ValueError, "invalid cron expression '61 * * * *'"),
    (dict(cron="0 0 * * 5#2"), ValueError, "bad day of week field"),
    (dict(cron="0 * * * *", timezone="Europe/Nowhere"), ValueError, "unknown time zone"),
    (dict(cron="0 * * * *", every=HOUR), ValueError, "exactly one of cron"),
    (dict(), ValueError, "exactly one of cron"),
    (dict(every=timedelta(0)), ValueError, "every must be positive"),
    (dict(every=HOUR, overlap="sometimes"), ValueError, "unknown overlap policy 'sometimes'"),
    (dict(every=HOUR, args=["a", "b"]), TypeError, "too many positional arguments"),
    (dict(every=HOUR, start_at=datetime(2026, 1, 1)), ValueError, "timezone-aware"),
]


@pytest.mark.parametrize("options, error, message", BAD, ids=[b[2] for b in BAD])
def test_a_bad_schedule_raises_one_clear_error_and_writes_nothing(conn, worker, options, error,
                                                                  message):
    options.setdefault("args", ["x"])
    with pytest.raises(error, match=message.replace("*", r"\*")):
        pgflow.create_schedule(conn, "bad", report_tick, **options)
    assert conn.execute("select count(*) from pgflow.schedules").fetchone()[0] == 0


def test_an_unknown_workflow_by_name_writes_nothing(conn, worker):
    with pytest.raises(pgflow.WorkflowNotFound, match="unknown workflow 'no_such'"):
        pgflow.create_schedule(conn, "bad", "no_such", cron="0 * * * *")
    assert conn.execute("select count(*) from pgflow.schedules").fetchone()[0] == 0


def test_the_async_client_controls_schedules(dsn, worker):
    async def scenario() -> list[uuid.UUID]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            await pgflow.aio.create_schedule(aconn, "a", "report_tick", cron="0 9 * * *",
                                             timezone="Europe/Paris", args=["a"])
            await pgflow.aio.pause_schedule(aconn, "a")
            await pgflow.aio.resume_schedule(aconn, "a")
            ids = await pgflow.aio.backfill_schedule(aconn, "a", datetime(2026, 3, 28, tzinfo=UTC),
                                                     datetime(2026, 3, 30, tzinfo=UTC))
            ids.append(await pgflow.aio.trigger_schedule(aconn, "a"))
            await pgflow.aio.delete_schedule(aconn, "a")
            return ids

    ids = asyncio.run(scenario())
    assert len(ids) == 3
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select count(*) from pgflow.schedules").fetchone()[0] == 0
        for run_id in ids:
            pgflow.result(conn, run_id, timeout=60)


def _register(conn: Conn, version: str, param: str) -> None:
    conn.execute(
        "select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'], %s::jsonb)",
        (f'[{{"name": "wf", "version": "{version}", "queue": "default", "params":'
         f' [{{"name": "{param}", "kind": "positional", "required": true}}]}}]',))


def test_a_tick_that_cannot_start_is_recorded_as_failed_and_the_others_still_fire(dsn, conn):
    """The leader's batch fails on one schedule: it fires them one by one, and moves on.

    The clock is at hh:15, so the 61 minutes handled below hold one hourly tick
    (at hh:00), never two (at the real clock's hh:00:30 they would).
    """
    align_clock(conn)
    _register(conn, "1", "label")
    pgflow.create_schedule(conn, "good", "wf", every=HOUR, args=["x"])
    pgflow.create_schedule(conn, "bad", "wf", every=HOUR, kwargs={"label": "x"})
    _register(conn, "2", "name")  # the new version renamed the parameter "bad" names
    conn.execute("update pgflow.schedules set handled_through = pgflow.now() - interval '61 min',"
                 " next_fire_at = pgflow.now() - interval '1 min', catchup_window = '2 hours'")

    async def leader_pass() -> int:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            return await pgflow.ticker.fire_due_async(aconn)

    assert asyncio.run(leader_pass()) == 1
    rows = conn.execute("select schedule_id, outcome, error from pgflow.schedule_ticks"
                        " order by schedule_id").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("bad", "failed"), ("good", "started")]
    assert "has no parameter label" in rows[0][2]
    # both moved on: the next tick is in the future
    assert conn.execute("select bool_and(next_fire_at > pgflow.now()) from pgflow.schedules"
                        ).fetchone()[0] is True
