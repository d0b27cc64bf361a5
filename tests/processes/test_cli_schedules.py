"""``pgflow schedules`` and ``pgflow schedule ...``, driven as a real subprocess.

Each action commits (the CLI's own connection): what it did is read back here
through another connection. Every mistake is one line on stderr and exit 1.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

import pgflow
from tests.support.cli import (
    assert_one_line_error,
    cli_env,
    ok,
    pgflow_cli,
    register_two_steps,
)

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"
HEADER = ["ID", "WORKFLOW", "SPEC", "TIMEZONE", "OVERLAP", "STATE", "NEXT FIRE", "LAST FIRED"]
NOV = [datetime(2026, 11, day, 2, tzinfo=timezone.utc) for day in (1, 2, 3)]  # 03:00 CET


def _nightly(dsn: str, conn: psycopg.Connection[Any], id: str = "nightly") -> None:
    """Schedule ``id``: two_steps at 03:00, Paris time (02:00 UTC in November)."""
    register_two_steps(dsn)
    pgflow.create_schedule(conn, id, "two_steps", cron="0 3 * * *", timezone="Europe/Paris",
                           args=[1])


def _rows(dsn: str) -> dict[str, list[str]]:
    """The table of ``pgflow schedules``, by id (cells split on runs of spaces)."""
    lines = ok(pgflow_cli("schedules", "--dsn", dsn)).splitlines()
    assert re.split(r"\s{2,}", lines[0]) == HEADER
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines[1:])}


def _paused(conn: psycopg.Connection[Any], id: str = "nightly") -> bool:
    row = conn.execute("select paused from pgflow.schedules where id = %s", (id,)).fetchone()
    assert row is not None, f"no schedule {id!r}"
    return bool(row[0])


def _scheduled_runs(conn: psycopg.Connection[Any], id: str = "nightly") -> list[tuple[Any, ...]]:
    return conn.execute("select id, scheduled_time, key from pgflow.runs where schedule_id = %s"
                        " order by scheduled_time", (id,)).fetchall()


# --- error paths -----------------------------------------------------------------------

BACKFILL = ("schedule", "backfill", "nightly")
ERROR_CASES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    # (id, database, arguments before --dsn, expected fragments of the error line)
    *[(f"{verb}-unknown", "migrated", ("schedule", verb, "x"), ("unknown schedule 'x'",))
      for verb in ("show", "pause", "resume", "trigger", "delete")],
    ("backfill-unknown", "migrated",
     ("schedule", "backfill", "x", "--start", "2026-11-01", "--end", "2026-11-02"),
     ("unknown schedule 'x'",)),
    ("backfill-bad-start", "migrated", (*BACKFILL, "--start", "2026-13-01", "--end", "2026-11-02"),
     ("--start '2026-13-01'", "ISO")),
    ("backfill-bad-end", "migrated", (*BACKFILL, "--start", "2026-11-01", "--end", "tomorrow"),
     ("--end 'tomorrow'", "ISO")),
    ("backfill-end-before-start", "migrated",
     (*BACKFILL, "--start", "2026-11-04", "--end", "2026-11-01T00:00:00Z"),
     ("--end 2026-11-01T00:00:00Z must be after --start 2026-11-04T00:00:00Z",)),
    ("backfill-empty-range", "migrated",
     (*BACKFILL, "--start", "2026-11-01T01:00+01:00", "--end", "2026-11-01T00:00"),
     ("must be after --start",)),
    ("backfill-unknown-overlap", "migrated",
     (*BACKFILL, "--start", "2026-11-01", "--end", "2026-11-02", "--overlap", "sometimes"),
     ("unknown overlap policy 'sometimes'", "allow_all")),
    ("schedules-unreachable", "unreachable", ("schedules",), ("cannot connect to the database",)),
    ("pause-unreachable", "unreachable", ("schedule", "pause", "nightly"),
     ("cannot connect to the database",)),
    ("show-unreachable", "unreachable", ("schedule", "show", "nightly"),
     ("cannot connect to the database",)),
    ("backfill-unreachable", "unreachable", (*BACKFILL, "--start", "2026-11-01", "--end",
                                             "2026-11-02"), ("cannot connect to the database",)),
    ("schedules-not-migrated", "empty", ("schedules",), ("pgflow migrate",)),
]


@pytest.mark.parametrize(("database", "args", "fragments"),
                         [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES])
def test_error_is_one_line_on_stderr(request: pytest.FixtureRequest, database: str,
                                     args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    if database == "unreachable":
        target = UNREACHABLE
    else:
        target = request.getfixturevalue("dsn" if database == "migrated" else "empty_dsn")
    assert_one_line_error(pgflow_cli(*args, "--dsn", target), *fragments)


@pytest.mark.parametrize(("args", "fragment"), [
    (["schedule", "backfill", "nightly", "--start", "2026-11-01"], "Missing option '--end'"),
    (["schedule", "pause"], "Missing argument"),
    (["schedule", "no-such-verb", "x"], "No such command"),
])
def test_usage_errors_are_one_line_with_exit_2(args: list[str], fragment: str) -> None:
    assert_one_line_error(pgflow_cli(*args), fragment, exit_code=2)


def test_help_lists_the_schedule_commands() -> None:
    commands = ok(pgflow_cli("--help")).split("Commands:")[1]
    assert {line.split()[0] for line in commands.splitlines() if line.strip()} >= {
        "schedules", "schedule"}
    verbs = ok(pgflow_cli("schedule", "--help")).split("Commands:")[1]
    assert [line.split()[0] for line in verbs.splitlines() if line.strip()] == [
        "show", "pause", "resume", "trigger", "delete", "backfill"]
    assert "without an offset it is UTC" in ok(pgflow_cli("schedule", "backfill", "--help"))


# --- list ------------------------------------------------------------------------------

@pytest.mark.slow
def test_schedules_lists_every_schedule(dsn: str, conn: psycopg.Connection[Any]) -> None:
    empty = ok(pgflow_cli("schedules", "--dsn", dsn))
    assert empty.startswith("no schedules") and len(empty.splitlines()) == 1
    assert json.loads(ok(pgflow_cli("schedules", "--json", "--dsn", dsn))) == []

    _nightly(dsn, conn)
    pgflow.create_schedule(conn, "often", "two_steps", every=timedelta(minutes=90),
                           kwargs={"n": 2}, overlap="buffer_one", paused=True)
    next_fire = conn.execute("select next_fire_at from pgflow.schedules where id = 'nightly'"
                             ).fetchone()[0]
    assert next_fire.astimezone(timezone.utc).hour == 2  # 03:00 in Paris, winter time

    rows = _rows(dsn)
    assert list(rows) == ["nightly", "often"]  # by id
    assert rows["nightly"] == ["nightly", "two_steps", "0 3 * * *", "Europe/Paris", "skip",
                               "active", next_fire.strftime("%Y-%m-%dT%H:%M:%SZ"), "-"]
    assert rows["often"][:6] == ["often", "two_steps", "every 1h30m", "UTC", "buffer_one",
                                 "paused"]
    assert rows["often"][7] == "-"

    records = json.loads(ok(pgflow_cli("schedules", "--json", "--dsn", dsn)))
    assert [r["id"] for r in records] == ["nightly", "often"]
    nightly, often = records
    assert nightly | {"next_fire_at": None, "handled_through": None, "created_at": None,
                      "updated_at": None} == {
        "id": "nightly", "workflow": "two_steps", "cron": "0 3 * * *", "every": None,
        "timezone": "Europe/Paris", "input": [1], "queue": None, "priority": 0,
        "overlap": "skip", "catchup_window": 600.0, "jitter": None, "start_at": None,
        "end_at": None, "paused": False, "declared": False, "handled_through": None,
        "next_fire_at": None, "last_fired_at": None, "created_at": None, "updated_at": None}
    assert datetime.fromisoformat(nightly["next_fire_at"]) == next_fire
    assert (often["cron"], often["every"], often["input"], often["paused"]) == (
        None, 5400.0, {"n": 2}, True)


# --- pause / resume / trigger / delete ---------------------------------------------------

@pytest.mark.slow
def test_pause_and_resume(dsn: str, conn: psycopg.Connection[Any]) -> None:
    _nightly(dsn, conn)
    assert ok(pgflow_cli("schedule", "pause", "nightly", "--dsn", dsn)) == \
        "schedule 'nightly' paused\n"
    assert _paused(conn)
    assert _rows(dsn)["nightly"][5] == "paused"
    # pausing a paused schedule is no mistake
    ok(pgflow_cli("schedule", "pause", "nightly", "--dsn", dsn))
    assert _paused(conn)

    assert ok(pgflow_cli("schedule", "resume", "nightly", "--dsn", dsn)) == \
        "schedule 'nightly' resumed\n"
    assert not _paused(conn)
    assert _rows(dsn)["nightly"][5] == "active"


@pytest.mark.slow
def test_trigger_starts_one_run_now(dsn: str, conn: psycopg.Connection[Any]) -> None:
    _nightly(dsn, conn)
    out = ok(pgflow_cli("schedule", "trigger", "nightly", "--dsn", dsn))
    run_id = uuid.UUID(out.strip())
    assert out == f"{run_id}\n"
    assert conn.execute("select name, status, input, schedule_id from pgflow.runs where id = %s",
                        (run_id,)).fetchone() == ("two_steps", "pending", [1], "nightly")
    assert conn.execute("select outcome, run_id from pgflow.schedule_ticks"
                        " where schedule_id = 'nightly'").fetchall() == [("started", run_id)]
    # a paused schedule can still be triggered: asking for a run is the point
    ok(pgflow_cli("schedule", "pause", "nightly", "--dsn", dsn))
    again = uuid.UUID(ok(pgflow_cli("schedule", "trigger", "nightly", "--dsn", dsn)).strip())
    assert again != run_id
    assert {r[0] for r in _scheduled_runs(conn)} == {run_id, again}
    assert _rows(dsn)["nightly"][7] != "-"  # last fired


@pytest.mark.slow
def test_delete_keeps_the_runs(dsn: str, conn: psycopg.Connection[Any]) -> None:
    _nightly(dsn, conn)
    _nightly(dsn, conn, "other")
    run_id = uuid.UUID(ok(pgflow_cli("schedule", "trigger", "nightly", "--dsn", dsn)).strip())
    assert ok(pgflow_cli("schedule", "delete", "nightly", "--dsn", dsn)) == \
        "schedule 'nightly' deleted\n"
    assert conn.execute("select id from pgflow.schedules").fetchall() == [("other",)]
    assert conn.execute("select count(*) from pgflow.schedule_ticks").fetchone() == (0,)
    assert conn.execute("select status from pgflow.runs where id = %s",
                        (run_id,)).fetchone() == ("pending",)
    assert list(_rows(dsn)) == ["other"]
    assert_one_line_error(pgflow_cli("schedule", "delete", "nightly", "--dsn", dsn),
                          "unknown schedule 'nightly'")


# --- backfill / show -------------------------------------------------------------------

@pytest.mark.slow
def test_backfill_starts_each_tick_once(dsn: str, conn: psycopg.Connection[Any]) -> None:
    _nightly(dsn, conn)
    first = pgflow_cli("schedule", "backfill", "nightly", "--start", "2026-11-01",
                       "--end", "2026-11-04", "--dsn", dsn)
    printed = [uuid.UUID(line) for line in ok(first).splitlines()]
    assert len(printed) == 3
    assert _scheduled_runs(conn) == [
        (run_id, tick, f"schedule:nightly:{tick:%Y-%m-%dT%H:%M:%SZ}")
        for run_id, tick in zip(printed, NOV, strict=True)]
    assert first.stderr == ("pgflow: schedule 'nightly': 3 run(s) started for its ticks in "
                            "[2026-11-01T00:00:00Z, 2026-11-04T00:00:00Z)\n")

    # the same range again (other spellings of the same instants): nothing new
    again = pgflow_cli("schedule", "backfill", "nightly", "--start", "2026-11-01T01:00+01:00",
                       "--end", "2026-11-04T00:00:00Z", "--dsn", dsn)
    assert ok(again) == ""
    assert "every tick in [2026-11-01T00:00:00Z, 2026-11-04T00:00:00Z) was decided before" \
        in again.stderr
    assert len(_scheduled_runs(conn)) == 3

    # an overlapping range starts only the new tick
    more = pgflow_cli("schedule", "backfill", "nightly", "--start", "2026-11-03",
                      "--end", "2026-11-05", "--dsn", dsn)
    (new,) = [uuid.UUID(line) for line in ok(more).splitlines()]
    assert "1 run(s) started" in more.stderr and "1 tick(s) decided before" in more.stderr
    assert _scheduled_runs(conn)[-1][:2] == (new, datetime(2026, 11, 4, 2, tzinfo=timezone.utc))

    # a date/time without an offset is UTC, not the local time (here UTC+5, where
    # 02:30 would be 21:30 UTC the day before, and take in the tick of 02:00 UTC)
    naive = pgflow_cli("schedule", "backfill", "nightly", "--start", "2026-11-05T02:30",
                       "--end", "2026-11-07T00:00:00+01:00", "--dsn", dsn,
                       env=cli_env(TZ="XYZ-5"))
    (late,) = [uuid.UUID(line) for line in ok(naive).splitlines()]
    assert _scheduled_runs(conn)[-1][:2] == (late, datetime(2026, 11, 6, 2, tzinfo=timezone.utc))
    assert len(_scheduled_runs(conn)) == 5

    # future ticks fire on time: a backfill may not reach past now
    future = (datetime.now(timezone.utc) + timedelta(days=2)).date().isoformat()
    assert_one_line_error(pgflow_cli("schedule", "backfill", "nightly", "--start", "2026-11-01",
                                     "--end", future, "--dsn", dsn), "in the future")
    assert len(_scheduled_runs(conn)) == 5


@pytest.mark.slow
def test_backfill_by_overlap_policy(dsn: str, conn: psycopg.Connection[Any]) -> None:
    _nightly(dsn, conn)
    out = pgflow_cli("schedule", "backfill", "nightly", "--start", "2026-11-01",
                     "--end", "2026-11-04", "--overlap", "skip", "--dsn", dsn)
    assert len(ok(out).splitlines()) == 1  # the first run is unfinished: the others skip
    assert "1 run(s) started" in out.stderr
    assert "2 tick(s) skipped or buffered (overlap skip)" in out.stderr
    assert conn.execute("select outcome from pgflow.schedule_ticks order by scheduled_time"
                        ).fetchall() == [("started",), ("skipped",), ("skipped",)]


@pytest.mark.slow
def test_show_a_schedule_and_its_ticks(dsn: str, conn: psycopg.Connection[Any]) -> None:
    _nightly(dsn, conn)
    shown = ok(pgflow_cli("schedule", "show", "nightly", "--dsn", dsn)).splitlines()
    assert shown[0] == "schedule   nightly"
    assert "workflow   two_steps" in shown
    assert "spec       0 3 * * *  (Europe/Paris)" in shown
    assert "state      active" in shown
    assert "last fired -" in shown
    assert shown[-1] == "(no ticks decided yet)"

    runs = ok(pgflow_cli("schedule", "backfill", "nightly", "--start", "2026-11-01",
                         "--end", "2026-11-04", "--dsn", dsn)).split()
    conn.execute("insert into pgflow.schedule_ticks (schedule_id, scheduled_time, outcome, error,"
                 " recorded_at) values ('nightly', '2026-10-31 02:00Z', 'failed',"
                 " e'input no longer fits\\nthe parameters', now())")
    ok(pgflow_cli("schedule", "pause", "nightly", "--dsn", dsn))
    shown = ok(pgflow_cli("schedule", "show", "nightly", "--dsn", dsn)).splitlines()
    assert "state      paused" in shown
    header = shown.index(next(line for line in shown if line.startswith("SCHEDULED")))
    assert shown[header].split() == ["SCHEDULED", "OUTCOME", "RUN", "ERROR"]
    ticks = [line.split(None, 3) for line in shown[header + 1:]]
    assert ticks == [  # newest first
        ["2026-11-03T02:00:00Z", "started", runs[2]],
        ["2026-11-02T02:00:00Z", "started", runs[1]],
        ["2026-11-01T02:00:00Z", "started", runs[0]],
        ["2026-10-31T02:00:00Z", "failed", "-", "input no longer fits the parameters"]]

    data = json.loads(ok(pgflow_cli("schedule", "show", "nightly", "--json", "--dsn", dsn)))
    assert (data["id"], data["cron"], data["paused"]) == ("nightly", "0 3 * * *", True)
    assert [(t["outcome"], t["run_id"]) for t in data["ticks"]] == [
        ("started", runs[2]), ("started", runs[1]), ("started", runs[0]), ("failed", None)]


@pytest.mark.slow
def test_show_lists_the_last_20_ticks(dsn: str, conn: psycopg.Connection[Any]) -> None:
    _nightly(dsn, conn)
    conn.execute("insert into pgflow.schedule_ticks (schedule_id, scheduled_time, outcome,"
                 " recorded_at) select 'nightly', timestamptz '2026-01-01 02:00Z'"
                 " + d * interval '1 day', 'missed', now() from generate_series(0, 29) d")
    shown = ok(pgflow_cli("schedule", "show", "nightly", "--dsn", dsn)).splitlines()
    header = shown.index(next(line for line in shown if line.startswith("SCHEDULED")))
    ticks = shown[header + 1:]
    assert len(ticks) == 20
    assert ticks[0].startswith("2026-01-30T02:00:00Z") and ticks[-1].startswith("2026-01-11T")
