"""The schedule procedures (sql/schema/12_schedules.sql), called directly.

What SQL owns: checking a schedule, deciding each tick once, the overlap
policies' bookkeeping, backfills, and the indexes that keep firing cheap.
The ticks' times come from Python (pgflow.ticker, cronsim); where a test
needs them it calls pgflow.ticker.fire_due on the test's connection.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cronsim import CronSim, CronSimError

from pgflow import ticker
from tests.support.sqlkit import (
    BAD_ARGUMENT,
    Conn,
    assert_plan_uses,
    count,
    engine_now,
    raises_sqlstate,
)

UNKNOWN_SCHEDULE = "PF405"
REGISTER = ("select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'],"
            """ '[{"name":"wf","version":"1","queue":"default","params":"""
            """ [{"name":"label","kind":"positional","required":true}]}]')""")


@pytest.fixture
def wf(conn: Conn) -> Conn:
    """The test database with workflow ``wf(label)`` announced by a (row-only) worker."""
    conn.execute(REGISTER)
    return conn


def create(conn: Conn, id: str = "s", **options: Any) -> None:
    names = ", ".join(f"{k} => %({k})s" for k in options)
    conn.execute(f"select pgflow.create_schedule(%(id)s, 'wf'{', ' if names else ''}{names})",
                 {"id": id, **options})


def fire(conn: Conn, id: str, *times: datetime, outcome: str = "fire") -> int:
    row = conn.execute(
        "select pgflow.fire_schedules(array[%s], array[%s::timestamptz], array[null::timestamptz],"
        " %s::text[], %s::timestamptz[], %s::text[], %s::text[])",
        (id, times[-1], [id] * len(times), list(times), [outcome] * len(times),
         [None] * len(times))).fetchone()
    return int(row[0])


def runs_of(conn: Conn, id: str) -> list[tuple[Any, ...]]:
    return conn.execute("select scheduled_time, status, key from pgflow.runs"
                        " where schedule_id = %s order by scheduled_time", (id,)).fetchall()


def ticks_of(conn: Conn, id: str) -> list[tuple[Any, ...]]:
    return conn.execute("select scheduled_time, outcome from pgflow.schedule_ticks"
                        " where schedule_id = %s order by scheduled_time", (id,)).fetchall()


T1 = datetime(2026, 1, 1, 10, tzinfo=UTC)
T2 = T1 + timedelta(hours=1)


def test_a_tick_starts_one_run_however_often_it_is_fired(wf):
    create(wf, cron="0 * * * *", input='["x"]')
    assert fire(wf, "s", T1) == 1
    assert fire(wf, "s", T1) == 0  # a second leader, or a retry after a lost answer
    [(at, status, key)] = runs_of(wf, "s")
    assert at == T1 and status == "pending" and key == "schedule:s:2026-01-01T10:00:00Z"
    # deleted and created again: its ticks are forgotten, but the run's key is not
    (first,) = wf.execute("select id from pgflow.runs").fetchone()
    wf.execute("select pgflow.delete_schedule('s')")
    create(wf, cron="0 * * * *", input='["x"]', overlap="allow_all")
    fire(wf, "s", T1)
    assert count(wf, "runs") == 1
    assert wf.execute("select outcome, run_id from pgflow.schedule_ticks").fetchone() == (
        "started", first)


def test_skip_buffers_and_cancel_other_decide_against_the_unfinished_run(wf):
    for policy in ("skip", "buffer_one", "buffer_all", "cancel_other", "allow_all"):
        create(wf, policy, every=timedelta(hours=1), input='["x"]', overlap=policy)
        fire(wf, policy, T1, T2, T2 + timedelta(hours=1))
    outcomes = {p: [o for _, o in ticks_of(wf, p)]
                for p in ("skip", "buffer_one", "buffer_all", "cancel_other", "allow_all")}
    assert outcomes == {
        "skip": ["started", "skipped", "skipped"],
        "buffer_one": ["started", "buffered", "skipped"],
        "buffer_all": ["started", "buffered", "buffered"],
        "cancel_other": ["started", "started", "started"],
        "allow_all": ["started", "started", "started"],
    }
    assert [s for _, s, _ in runs_of(wf, "cancel_other")] == ["cancelled", "cancelled", "pending"]


def test_a_buffered_tick_starts_when_the_run_before_it_finishes(wf):
    create(wf, every=timedelta(hours=1), input='["x"]', overlap="buffer_all")
    fire(wf, "s", T1, T2)
    assert wf.execute("select pgflow.start_buffered_ticks()").fetchone()[0] == 0  # still busy
    wf.execute("listen pgflow_timer")
    wf.execute("select pgflow.cancel(id) from pgflow.runs where scheduled_time = %s", (T1,))
    assert any(True for _ in wf.notifies(timeout=2, stop_after=1))  # the trigger woke the leader
    assert wf.execute("select pgflow.start_buffered_ticks()").fetchone()[0] == 1
    assert [o for _, o in ticks_of(wf, "s")] == ["started", "started"]
    assert [s for _, s, _ in runs_of(wf, "s")] == ["cancelled", "pending"]


def test_missed_and_failed_ticks_are_recorded_and_start_nothing(wf):
    create(wf, cron="0 * * * *", input='["x"]')
    fire(wf, "s", T1, outcome="missed")
    fire(wf, "s", T2, outcome="failed")
    assert ticks_of(wf, "s") == [(T1, "missed"), (T2, "failed")]
    assert count(wf, "runs") == 0


def test_a_schedule_created_from_sql_gets_its_next_fire_time_from_the_leader(wf):
    create(wf, cron="0 3 * * *", timezone="Europe/Paris", input='["x"]')
    now = engine_now(wf)
    assert wf.execute("select next_fire_at from pgflow.schedules").fetchone()[0] <= now
    assert ticker.fire_due(wf) == 0  # no tick between creation and now: nothing starts
    (next_fire,) = wf.execute("select next_fire_at from pgflow.schedules").fetchone()
    assert next_fire > now and next_fire.astimezone(UTC).hour in (1, 2)  # 03:00 Paris time
    assert count(wf, "schedule_ticks") == 0


def test_an_interval_schedule_is_backfilled_from_sql_alone(wf):
    create(wf, every=timedelta(hours=6), input='["x"]', start_at=datetime(2026, 1, 1, 1, tzinfo=UTC))
    started = wf.execute("select * from pgflow.backfill_schedule('s', %s, %s)",
                         (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC))
                         ).fetchall()
    assert len(started) == 4
    assert [r[0].hour for r in runs_of(wf, "s")] == [1, 7, 13, 19]  # anchored at start_at
    assert wf.execute("select * from pgflow.backfill_schedule('s', %s, %s)",
                      (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC))
                      ).fetchall() == []


@pytest.mark.parametrize("call, fragment", [
    ("select * from pgflow.backfill_schedule('c', '2026-01-02', '2026-01-01')",
     "must be after start"),
    ("select * from pgflow.backfill_schedule('c', '2026-01-01', '2999-01-01')",
     "is in the future"),
    ("select * from pgflow.backfill_schedule('c', '2026-01-01', '2026-01-02')",
     "needs its ticks"),
    ("select * from pgflow.backfill_schedule('c', '2026-01-01', '2026-01-02', 'allow_all',"
     " array['2026-01-05'::timestamptz])", "outside"),
    ("select * from pgflow.backfill_schedule('c', '2026-01-01', '2026-01-02', 'sometimes')",
     "unknown overlap policy"),
])
def test_a_bad_backfill_is_one_error_and_starts_nothing(wf, call, fragment):
    create(wf, "c", cron="0 * * * *", input='["x"]')
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        wf.execute(call)
    assert fragment in str(exc.value)
    assert count(wf, "runs") == 0 and count(wf, "schedule_ticks") == 0


@pytest.mark.parametrize("call", [
    "select pgflow.pause_schedule('nope')", "select pgflow.resume_schedule('nope')",
    "select pgflow.delete_schedule('nope')", "select pgflow.trigger_schedule('nope')",
    "select * from pgflow.backfill_schedule('nope', '2026-01-01', '2026-01-02')",
])
def test_an_unknown_schedule_is_pf405(wf, call):
    with raises_sqlstate(UNKNOWN_SCHEDULE) as exc:
        wf.execute(call)
    assert "unknown schedule 'nope'" in str(exc.value)


BAD_SCHEDULES = [
    ({"cron": "61 * * * *"}, "minute '61' is out of range"),
    ({"cron": "* * * *"}, "must have 5 fields"),
    ({"cron": "0 0 * * 5#2"}, "bad day of week field"),
    ({"cron": "0 0 L * *"}, "bad day of month field"),
    ({"cron": "5-3 * * * *"}, "runs backwards"),
    ({"cron": "*/0 * * * *"}, "step must be at least 1"),
    ({"cron": "0 0 * FOO *"}, "month 'FOO' is out of range"),
    ({"every": timedelta(0)}, "every must be positive"),
    ({"cron": "0 * * * *", "every": timedelta(hours=1)}, "exactly one of cron and every"),
    ({}, "exactly one of cron and every"),
    ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
    ({"cron": "0 * * * *", "timezone": "UTC+3"}, "unknown time zone 'UTC+3'"),
    ({"cron": "0 * * * *", "timezone": "+02:00"}, "unknown time zone '+02:00'"),
    ({"cron": "0 * * * *", "overlap": "sometimes"}, "unknown overlap policy 'sometimes'"),
    ({"cron": "0 * * * *", "catchup_window": timedelta(minutes=-1)}, "must not be negative"),
    ({"cron": "0 * * * *", "start_at": T2, "end_at": T1}, "before it starts"),
    ({"cron": "0 * * * *", "input": '["x", "y"]'}, "takes 1 positional argument"),
    ({"cron": "0 * * * *", "input": '{"nope": 1}'}, "has no parameter nope"),
    ({"cron": "0 * * * *", "input": '"x"'}, "must be a JSON array"),
]


@pytest.mark.parametrize("options, fragment", BAD_SCHEDULES,
                         ids=[f for _, f in BAD_SCHEDULES])
def test_a_bad_schedule_is_one_error_and_writes_nothing(wf, options, fragment):
    options.setdefault("input", '["x"]')
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        create(wf, **options)
    assert fragment in str(exc.value)
    assert count(wf, "schedules") == 0


def test_an_unknown_workflow_is_refused(wf):
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        wf.execute("select pgflow.create_schedule('s', 'nope', cron => '0 * * * *')")
    assert "unknown workflow 'nope'" in str(exc.value)
    assert count(wf, "schedules") == 0


STANDARD = ["0 3 * * *", "*/15 * * * *", "0 9-17/2 * * MON-FRI", "0 0 1,15 * *",
            "30 2 * jan-mar sun", "0 0 * * 7", "0 0 * * 0-7", "59 23 31 12 *", "1/5 * * * *",
            "00 00 * * *", "61 * * * *", "* 24 * * *", "* * 0 * *", "* * * 13 *", "* * * * 8",
            "*/0 * * * *", "5-3 * * * *", ", * * * *", "* * * * FRI-MON", "0 0 * * XYZ",
            "a * * * *", "1-2-3 * * * *", "*/5/2 * * * *", "-1 * * * *"]


@pytest.mark.parametrize("expression", STANDARD)
def test_sql_and_cronsim_agree_on_standard_syntax(conn, expression):
    try:
        CronSim(expression, datetime(2026, 1, 1, tzinfo=UTC))
        library = True
    except CronSimError:
        library = False
    try:
        conn.execute("select pgflow._check_cron(%s)", (expression,))
        database = True
    except Exception:
        database = False
    assert database == library, f"{expression!r}: SQL says {database}, cronsim says {library}"


def test_pause_resume_and_trigger(wf):
    create(wf, cron="0 * * * *", input='["x"]')
    wf.execute("select pgflow.pause_schedule('s')")
    assert wf.execute("select paused from pgflow.schedules").fetchone()[0] is True
    wf.execute("listen pgflow_timer")
    wf.execute("select pgflow.resume_schedule('s')")
    assert any(True for _ in wf.notifies(timeout=2, stop_after=1))
    run_id = wf.execute("select pgflow.trigger_schedule('s')").fetchone()[0]
    assert isinstance(run_id, uuid.UUID)
    (scheduled, status) = wf.execute("select scheduled_time, status from pgflow.runs"
                                     " where id = %s", (run_id,)).fetchone()
    assert status == "pending" and abs(scheduled - engine_now(wf)) < timedelta(minutes=1)


def test_replacing_keeps_progress_unless_the_timing_changes(wf):
    create(wf, cron="0 * * * *", input='["x"]', next_fire_at=T2)
    wf.execute("update pgflow.schedules set handled_through = %s", (T1,))
    create(wf, cron="0 * * * *", input='["y"]', next_fire_at=T2 + timedelta(days=1),
           overlap="allow_all")
    assert wf.execute("select handled_through, next_fire_at, overlap, input"
                      " from pgflow.schedules").fetchone() == (T1, T2, "allow_all", ["y"])
    create(wf, cron="30 * * * *", input='["y"]', next_fire_at=T2 + timedelta(minutes=30))
    (through, next_fire) = wf.execute("select handled_through, next_fire_at"
                                      " from pgflow.schedules").fetchone()
    assert through > T1 and next_fire == T2 + timedelta(minutes=30)


def test_firing_reads_only_due_schedules_and_a_schedules_own_runs(wf):
    """100,000 schedules that are not due, and 20,000 unscheduled runs: index walks only."""
    wf.execute("""
        insert into pgflow.schedules (id, workflow, cron, input, handled_through, next_fire_at,
                                      created_at, updated_at)
        select 'idle-' || i, 'wf', '0 0 1 1 *', '["x"]', now(), now() + interval '300 days',
               now(), now()
        from generate_series(1, 100000) i""")
    wf.execute("""
        insert into pgflow.runs (name, version, queue, status, input, created_at, available_at)
        select 'wf', '1', 'default', 'pending', '["x"]', now(), now()
        from generate_series(1, 20000)""")
    wf.execute("analyze pgflow.schedules; analyze pgflow.runs")
    due = ("select s.id from pgflow.schedules s where not s.paused"
           " and s.next_fire_at <= pgflow.now() order by s.next_fire_at limit 500"
           " for no key update of s skip locked")
    plan = assert_plan_uses(wf, "explain (analyze, buffers, format json) " + due,
                            "schedules", "schedules_due")
    assert plan["Actual Rows"] == 0
    assert plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0) < 20
    assert_plan_uses(wf, "explain (format json) select exists (select 1 from pgflow.runs r"
                     " where r.schedule_id = 'idle-1'"
                     " and r.status not in ('completed', 'failed', 'cancelled'))",
                     "runs", "runs_schedule")
    assert ticker.fire_due(wf) == 0


def test_old_tick_records_are_purged_in_batches_and_buffered_ones_stay(wf):
    create(wf, every=timedelta(hours=1), input='["x"]', overlap="buffer_all")
    fire(wf, "s", T1, T2, T2 + timedelta(hours=1))  # started, buffered, buffered
    fire(wf, "s", T1 - timedelta(hours=1), outcome="missed")
    wf.execute("update pgflow.schedule_ticks set recorded_at = now() - interval '40 days'")
    assert wf.execute("select pgflow.purge_schedule_ticks(interval '30 days', 1)"
                      ).fetchone()[0] == 1
    assert wf.execute("select pgflow.purge_schedule_ticks(interval '30 days')").fetchone()[0] == 1
    assert wf.execute("select pgflow.purge_schedule_ticks(interval '30 days')").fetchone()[0] == 0
    assert [o for _, o in ticks_of(wf, "s")] == ["buffered", "buffered"]
    with raises_sqlstate(BAD_ARGUMENT):
        wf.execute("select pgflow.purge_schedule_ticks(interval '-1 day')")


def test_two_triggers_in_one_statement_share_its_instant_and_its_run(wf):
    create(wf, cron="0 0 1 1 *", input='["x"]')
    first, second = wf.execute("select pgflow.trigger_schedule('s'),"
                               " pgflow.trigger_schedule('s')").fetchone()
    assert first == second and count(wf, "runs") == 1
    third = wf.execute("select pgflow.trigger_schedule('s')").fetchone()[0]
    assert third != first and count(wf, "runs") == 2  # each statement: a run of its own


def test_a_backfill_over_ticks_the_leader_fired_starts_only_the_others(wf):
    create(wf, every=timedelta(hours=1), input='["x"]')
    fire(wf, "s", T1)  # the leader fired T1 on time
    started = wf.execute("select * from pgflow.backfill_schedule('s', %s, %s)",
                         (T1 - timedelta(hours=1), T2 + timedelta(hours=1))).fetchall()
    assert len(started) == 2  # T1 - 1 h and T2; T1's run is the leader's
    assert [r[0] for r in runs_of(wf, "s")] == [T1 - timedelta(hours=1), T1, T2]
