"""``pgflow schedules`` and ``pgflow schedule ...``: list, show and control schedules.

Registered on the main app by :mod:`pgflow.cli`; the calls are :mod:`pgflow.schedules`'s.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

import psycopg
import typer

from pgflow import errors, schedules
from pgflow.cli_support import DsnOption, JsonOption, columns, connect, one_line, user_errors

schedule_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                           rich_markup_mode=None,
                           help="Control one schedule: show, pause, resume, trigger, delete, "
                                "backfill.")

ScheduleIdArgument = Annotated[str, typer.Argument(help="Schedule id.")]

# What `pgflow schedules` and `pgflow schedule show` read of a schedule (and print with --json).
_SCHEDULE_COLUMNS = ("id", "workflow", "cron", "every", "timezone", "input", "queue", "priority",
                     "overlap", "catchup_window", "jitter", "start_at", "end_at", "paused",
                     "declared", "handled_through", "next_fire_at", "last_fired_at",
                     "created_at", "updated_at")
_INTERVAL_COLUMNS = ("every", "catchup_window", "jitter")
_TICK_COLUMNS = ("scheduled_time", "outcome", "run_id", "error", "recorded_at")
_SHOWN_TICKS = 20


def list_schedules(dsn: DsnOption = None, as_json: JsonOption = False) -> None:
    """List every schedule: its timing, overlap policy, state, next and last fire (UTC)."""
    with user_errors(), connect(dsn) as conn:
        rows = conn.execute(f"select {', '.join(_SCHEDULE_COLUMNS)} from pgflow.schedules"
                            " order by id").fetchall()
    found = [dict(zip(_SCHEDULE_COLUMNS, row, strict=True)) for row in rows]
    if as_json:  # one JSON array, by id; intervals in seconds
        typer.echo(json.dumps([_schedule_json(s) for s in found], default=str, indent=2))
        return
    if not found:
        typer.echo("no schedules (declare one with pgflow.schedule() in a worker's code, "
                   "or create one with pgflow.create_schedule())")
        return
    table = [("ID", "WORKFLOW", "SPEC", "TIMEZONE", "OVERLAP", "STATE", "NEXT FIRE",
              "LAST FIRED")]
    for s in found:
        table.append((s["id"], s["workflow"], _spec(s), s["timezone"], s["overlap"],
                      "paused" if s["paused"] else "active", _utc(s["next_fire_at"]),
                      _utc(s["last_fired_at"])))
    typer.echo(columns(table))


@schedule_app.command("show")
def show_schedule(schedule_id: ScheduleIdArgument, dsn: DsnOption = None,
                  as_json: JsonOption = False) -> None:
    """Show a schedule and its last 20 decided ticks, newest first (times in UTC)."""
    with user_errors(), connect(dsn) as conn:
        row = conn.execute(f"select {', '.join(_SCHEDULE_COLUMNS)} from pgflow.schedules"
                           " where id = %s", (schedule_id,)).fetchone()
        if row is None:
            raise errors.ScheduleNotFound(f"unknown schedule {schedule_id!r}")
        ticks = [dict(zip(_TICK_COLUMNS, t, strict=True)) for t in conn.execute(
            f"select {', '.join(_TICK_COLUMNS)} from pgflow.schedule_ticks"
            " where schedule_id = %s order by scheduled_time desc limit %s",
            (schedule_id, _SHOWN_TICKS)).fetchall()]
    found = dict(zip(_SCHEDULE_COLUMNS, row, strict=True))
    if as_json:
        typer.echo(json.dumps(_schedule_json(found) | {"ticks": ticks}, default=str, indent=2))
        return
    typer.echo(_render_schedule(found, ticks))


@schedule_app.command("pause")
def pause_schedule(schedule_id: ScheduleIdArgument, dsn: DsnOption = None) -> None:
    """Stop starting runs; the ticks that come due meanwhile are decided on resume."""
    with user_errors(), connect(dsn) as conn:
        schedules.pause_schedule(conn, schedule_id)
    typer.echo(f"schedule {schedule_id!r} paused")


@schedule_app.command("resume")
def resume_schedule(schedule_id: ScheduleIdArgument, dsn: DsnOption = None) -> None:
    """Start again: ticks missed within the catch-up window fire, by the overlap policy."""
    with user_errors(), connect(dsn) as conn:
        schedules.resume_schedule(conn, schedule_id)
    typer.echo(f"schedule {schedule_id!r} resumed")


@schedule_app.command("trigger")
def trigger_schedule(schedule_id: ScheduleIdArgument, dsn: DsnOption = None) -> None:
    """Start one run now, as a tick at this instant would (any overlap policy); print its id."""
    with user_errors(), connect(dsn) as conn:
        run_id = schedules.trigger_schedule(conn, schedule_id)
    typer.echo(str(run_id))


@schedule_app.command("delete")
def delete_schedule(schedule_id: ScheduleIdArgument, dsn: DsnOption = None) -> None:
    """Delete a schedule and its tick records; the runs it started stay.

    A schedule declared in a worker's code comes back when that worker restarts:
    remove it from the code.
    """
    with user_errors(), connect(dsn) as conn:
        schedules.delete_schedule(conn, schedule_id)
    typer.echo(f"schedule {schedule_id!r} deleted")


_ISO_HELP = ("an ISO date or date/time: 2026-11-01, 2026-11-01T03:00, 2026-11-01T03:00:00Z, "
             "2026-11-01T03:00:00+01:00; without an offset it is UTC")


@schedule_app.command("backfill")
def backfill_schedule(
    schedule_id: ScheduleIdArgument,
    start: Annotated[str, typer.Option("--start", help=f"First instant, included: {_ISO_HELP}.")],
    end: Annotated[str, typer.Option(
        "--end", help=f"Last instant, excluded (not in the future): {_ISO_HELP}.")],
    overlap: Annotated[str, typer.Option(
        "--overlap", help="Policy for a tick while an earlier run is unfinished: "
                          f"{', '.join(schedules.OVERLAP_POLICIES)}.")] = "allow_all",
    dsn: DsnOption = None,
) -> None:
    """Start a run for every tick in [START, END) not decided before; print their ids.

    A summary goes to stderr. Ticks already decided (fired on time, or by an earlier
    backfill) start nothing, so repeating a backfill starts nothing new.
    """
    with user_errors():
        since, until = _parse_iso(start, "--start"), _parse_iso(end, "--end")
        if until <= since:
            raise ValueError(f"--end {_utc(until)} must be after --start {_utc(since)}")
        schedules.check_overlap(overlap)
        with connect(dsn) as conn:
            before = _ticks_between(conn, schedule_id, since, until)
            run_ids = schedules.backfill_schedule(conn, schedule_id, since, until,
                                                  overlap=overlap)
            after = _ticks_between(conn, schedule_id, since, until)
    for run_id in run_ids:
        typer.echo(str(run_id))
    span = f"[{_utc(since)}, {_utc(until)})"
    if after == 0:
        summary = f"no tick in {span}: nothing started"
    elif after == before:
        summary = f"every tick in {span} was decided before: nothing started"
    else:
        summary = f"{len(run_ids)} run(s) started for its ticks in {span}"
        if held := after - before - len(run_ids):
            summary += f"; {held} tick(s) skipped or buffered (overlap {overlap})"
        if before:
            summary += f"; {before} tick(s) decided before"
    typer.echo(f"pgflow: schedule {schedule_id!r}: {summary}", err=True)


def _ticks_between(conn: psycopg.Connection[Any], schedule_id: str, since: datetime,
                   until: datetime) -> int:
    row = conn.execute("select count(*) from pgflow.schedule_ticks where schedule_id = %s"
                       " and scheduled_time >= %s and scheduled_time < %s",
                       (schedule_id, since, until)).fetchone()
    return int(row[0]) if row else 0


def _parse_iso(text: str, option: str) -> datetime:
    """An ISO date or date/time; one without an offset is UTC."""
    try:  # Python 3.10's fromisoformat does not know a trailing Z
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z"))
                                      else text)
    except ValueError:
        raise ValueError(f"{option} {text!r} is not an ISO date/time: use e.g. 2026-11-01, "
                         "2026-11-01T03:00, 2026-11-01T03:00:00Z or 2026-11-01T03:00+01:00"
                         ) from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _utc(value: datetime | None) -> str:
    """An instant in ISO 8601, UTC, with a Z; "-" for none."""
    if value is None:
        return "-"
    value = value.astimezone(timezone.utc)
    return value.isoformat(timespec="milliseconds" if value.microsecond else "seconds"
                           ).removesuffix("+00:00") + "Z"


def _span(value: timedelta) -> str:
    """An interval, compactly: 90s -> 1m30s, 1 day -> 1d."""
    seconds = value.total_seconds()
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{int(count)}{unit}")
    if seconds or not parts:
        parts.append(f"{seconds:g}s")
    return "".join(parts)


def _spec(s: dict[str, Any]) -> str:
    return s["cron"] if s["cron"] is not None else f"every {_span(s['every'])}"


def _schedule_json(s: dict[str, Any]) -> dict[str, Any]:
    return {k: v.total_seconds() if k in _INTERVAL_COLUMNS and v is not None else v
            for k, v in s.items()}


def _render_schedule(s: dict[str, Any], ticks: list[dict[str, Any]]) -> str:
    rows = [("schedule", s["id"]),
            ("workflow", s["workflow"]),
            ("queue", s["queue"] or "- (the workflow's)"),
            ("priority", str(s["priority"])),
            ("spec", f"{_spec(s)}  ({s['timezone']})"),
            ("input", json.dumps(s["input"])),
            ("overlap", s["overlap"]),
            ("catch-up", _span(s["catchup_window"])),
            ("jitter", "-" if s["jitter"] is None else _span(s["jitter"])),
            ("start at", _utc(s["start_at"])),
            ("end at", _utc(s["end_at"])),
            ("state", "paused" if s["paused"] else "active"),
            ("origin", "declared in code" if s["declared"] else "created at runtime"),
            ("next fire", _utc(s["next_fire_at"])),
            ("last fired", _utc(s["last_fired_at"])),
            ("created", _utc(s["created_at"])),
            ("updated", _utc(s["updated_at"]))]
    lines = [f"{label:<10} {value}" for label, value in rows]
    lines.append("")
    table = [("SCHEDULED", "OUTCOME", "RUN", "ERROR")]
    for t in ticks:
        table.append((_utc(t["scheduled_time"]), t["outcome"],
                      "-" if t["run_id"] is None else str(t["run_id"]),
                      one_line(t["error"] or "")[:80]))
    lines.append(columns(table) if ticks else "(no ticks decided yet)")
    return "\n".join(lines)
