"""Schedules: start runs of a workflow on a cron expression or a fixed interval.

Two ways to have one:

* declared in code, ``pgflow.schedule("nightly", report, cron="0 3 * * *")``
  at import time: ``pgflow worker`` creates or updates it when it starts.
  A worker also deletes the declared schedules of *its* workflows that its
  code no longer declares (a schedule removed from code stops at the next
  deploy); schedules of workflows it does not know, and schedules created at
  runtime, it leaves alone. A pause made at runtime survives restarts.
* created at runtime, :func:`create_schedule`, in the caller's transaction.

Every call takes a connection first and works in its current transaction,
like :func:`pgflow.start`. The scheduler leader fires the ticks
(:mod:`pgflow.ticker`); each tick starts at most one run, whose key is
``schedule:<id>:<scheduled time>``. When ticks fall: :mod:`pgflow.timetable`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pgflow import codec, connections, definitions, errors, queries
from pgflow.durations import as_timedelta
from pgflow.timetable import Timetable, jitter_for
from pgflow.validation import check_name

__all__ = ["OVERLAP_POLICIES", "ScheduleSpec", "backfill_schedule", "create_schedule",
           "declared_schedules", "delete_schedule", "pause_schedule", "resume_schedule",
           "schedule", "trigger_schedule"]

logger = logging.getLogger("pgflow.schedules")

OVERLAP_POLICIES = ("skip", "buffer_one", "buffer_all", "cancel_other", "allow_all")
DEFAULT_CATCHUP_WINDOW = timedelta(minutes=10)

NOW = "select pgflow.now()"
CREATE = ("select pgflow.create_schedule(id => %s, workflow => %s, cron => %s, every => %s,"
          " timezone => %s, input => %s::jsonb, overlap => %s, catchup_window => %s,"
          " jitter => %s, start_at => %s, end_at => %s, paused => %s, queue => %s,"
          " priority => %s, next_fire_at => %s, declared => %s)")
PAUSE = "select pgflow.pause_schedule(%s)"
RESUME = "select pgflow.resume_schedule(%s)"
DELETE = "select pgflow.delete_schedule(%s)"
TRIGGER = "select pgflow.trigger_schedule(%s)"
SPEC = "select cron, every, timezone, start_at from pgflow.schedules where id = %s"
BACKFILL = "select * from pgflow.backfill_schedule(%s, %s, %s, %s, %s::timestamptz[])"
DECLARED_OF = ("select id from pgflow.schedules where declared and workflow = any(%s::text[])"
               " order by id")


@dataclass(frozen=True)
class ScheduleSpec:
    """A checked schedule, ready to store: what :func:`schedule` declares."""

    id: str
    workflow: str
    timetable: Timetable
    input: Any  # JSON: a list (positional arguments) or a dict (keyword arguments)
    overlap: str = "skip"
    catchup_window: timedelta = DEFAULT_CATCHUP_WINDOW
    jitter: timedelta | None = None
    paused: bool = False
    queue: str | None = None
    priority: int = 0

    def next_fire_at(self, now: datetime) -> datetime | None:
        """The first tick after ``now`` plus its jitter; None if no tick is left."""
        tick = next(self.timetable.ticks_after(now), None)
        return None if tick is None else tick + jitter_for(self.id, tick, self.jitter)


def build_spec(id: str, workflow: definitions.Workflow | str, *, cron: str | None = None,
               every: timedelta | float | None = None, timezone: str = "UTC",
               args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               overlap: str = "skip", catchup_window: timedelta | float = DEFAULT_CATCHUP_WINDOW,
               jitter: timedelta | float | None = None, start_at: datetime | None = None,
               end_at: datetime | None = None, paused: bool = False, queue: str | None = None,
               priority: int = 0) -> ScheduleSpec:
    """Check every option (one ``ValueError`` / ``TypeError`` naming the bad one)."""
    check_name(id, "schedule id")
    check_overlap(overlap)
    if every is not None:
        every = as_timedelta(every, "every", positive=True)
    timetable = Timetable(cron=cron, every=every, timezone=timezone, start_at=start_at,
                          end_at=end_at)
    catchup = as_timedelta(catchup_window, "catchup_window")
    spread = None if jitter is None else as_timedelta(jitter, "jitter") or None
    if queue is not None:
        check_name(queue, "queue")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, not {priority!r}")
    if not isinstance(paused, bool):
        raise TypeError(f"paused must be a bool, not {paused!r}")
    name, data = _input(workflow, tuple(args), dict(kwargs or {}), id)
    return ScheduleSpec(id, name, timetable, data, overlap, catchup, spread, paused, queue,
                        priority)


def _input(workflow: definitions.Workflow | str, args: tuple[Any, ...],
           kwargs: dict[str, Any], id: str) -> tuple[str, Any]:
    what = f"the input of schedule {id!r}"
    if isinstance(workflow, definitions.Workflow):
        return workflow.name, workflow.signature.encode_args(args, kwargs, what)
    if isinstance(workflow, str):
        check_name(workflow, "workflow name")
        if args and kwargs:
            raise TypeError(f"schedule {id!r} names workflow {workflow!r}: pass positional or "
                            "keyword arguments, not both (without the code their order is "
                            "unknown)")
        return workflow, codec.to_json(dict(kwargs) if kwargs else list(args), what)
    raise TypeError(f"workflow must be a @pgflow.workflow function or a name, not {workflow!r}")


def create_params(spec: ScheduleSpec, now: datetime, declared: bool) -> tuple[Any, ...]:
    t = spec.timetable
    return (spec.id, spec.workflow, t.cron, t.every, t.timezone,
            codec.dumps(spec.input, f"the input of schedule {spec.id!r}"), spec.overlap,
            spec.catchup_window, spec.jitter, t.start_at, t.end_at, spec.paused, spec.queue,
            spec.priority, spec.next_fire_at(now), declared)


# -- declared in code ---------------------------------------------------------

_declared: dict[str, ScheduleSpec] = {}


def schedule(id: str, workflow: definitions.Workflow | str, *, cron: str | None = None,
             every: timedelta | float | None = None, timezone: str = "UTC",
             args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             overlap: str = "skip", catchup_window: timedelta | float = DEFAULT_CATCHUP_WINDOW,
             jitter: timedelta | float | None = None, start_at: datetime | None = None,
             end_at: datetime | None = None, paused: bool = False, queue: str | None = None,
             priority: int = 0) -> ScheduleSpec:
    """Declare schedule ``id`` in code; ``pgflow worker`` applies it when it starts.

    Exactly one of ``cron`` (5 fields, in ``timezone``) and ``every``. See
    :func:`create_schedule` for the options. ``paused`` applies when the
    schedule is first created; later, a pause or resume made at runtime stays.
    """
    spec = build_spec(id, workflow, cron=cron, every=every, timezone=timezone, args=args,
                      kwargs=kwargs, overlap=overlap, catchup_window=catchup_window,
                      jitter=jitter, start_at=start_at, end_at=end_at, paused=paused,
                      queue=queue, priority=priority)
    known = _declared.get(id)
    if known is not None and known != spec:
        raise ValueError(f"schedule {id!r} is declared twice, differently")
    _declared[id] = spec
    return spec


def declared_schedules() -> list[ScheduleSpec]:
    """The schedules this process's code declared, by id."""
    return [_declared[k] for k in sorted(_declared)]


def apply_declared(conn: Any, workflow_names: Sequence[str],
                   specs: Sequence[ScheduleSpec] | None = None) -> tuple[list[str], list[str]]:
    """Create or update the declared schedules; delete the stale ones of these workflows.

    In ``conn``'s transaction. Returns (applied ids, deleted ids).
    """
    specs = declared_schedules() if specs is None else list(specs)
    now = _now(conn)
    for spec in specs:
        connections.fetch(conn, CREATE, create_params(spec, now, declared=True))
    keep = {spec.id for spec in specs}
    stale = [row[0] for row in connections.fetch(conn, DECLARED_OF, (list(workflow_names),))
             if row[0] not in keep]
    for id in stale:
        connections.fetch(conn, DELETE, (id,))
        logger.info("deleted schedule %r: its workflow's code no longer declares it", id)
    return [spec.id for spec in specs], stale


# -- at runtime ---------------------------------------------------------------

def _now(conn: Any) -> datetime:
    value: datetime = connections.fetch(conn, NOW, ())[0][0]
    return value


def create_schedule(conn: Any, id: str, workflow: definitions.Workflow | str, *,
                    cron: str | None = None, every: timedelta | float | None = None,
                    timezone: str = "UTC", args: Sequence[Any] = (),
                    kwargs: dict[str, Any] | None = None, overlap: str = "skip",
                    catchup_window: timedelta | float = DEFAULT_CATCHUP_WINDOW,
                    jitter: timedelta | float | None = None, start_at: datetime | None = None,
                    end_at: datetime | None = None, paused: bool = False,
                    queue: str | None = None, priority: int = 0) -> None:
    """Create or replace schedule ``id`` in ``conn``'s transaction.

    - ``cron``: 5 fields, standard syntax, in ``timezone`` (an IANA name); or
      ``every``: a fixed interval anchored at ``start_at`` (else the epoch).
    - ``args`` / ``kwargs``: the input of every run.
    - ``overlap``: what a tick does while an earlier run is unfinished:
      ``skip``, ``buffer_one``, ``buffer_all``, ``cancel_other``, ``allow_all``.
    - ``catchup_window``: ticks missed (downtime, pause) within it still fire.
    - ``jitter``: each tick fires up to this much late, by a fixed amount per tick.
    - ``start_at`` / ``end_at``: no tick before / at or after.

    Replacing keeps the schedule's progress unless its timing changed.
    A bad option raises before anything is written.
    """
    spec = build_spec(id, workflow, cron=cron, every=every, timezone=timezone, args=args,
                      kwargs=kwargs, overlap=overlap, catchup_window=catchup_window,
                      jitter=jitter, start_at=start_at, end_at=end_at, paused=paused,
                      queue=queue, priority=priority)
    connections.fetch(conn, CREATE, create_params(spec, _now(conn), declared=False))


def pause_schedule(conn: Any, id: str) -> None:
    """Stop starting runs; the ticks that come due meanwhile are decided on resume."""
    connections.fetch(conn, PAUSE, (check_name(id, "schedule id"),))


def resume_schedule(conn: Any, id: str) -> None:
    """Start again: ticks missed within the catch-up window fire (by the overlap policy)."""
    connections.fetch(conn, RESUME, (check_name(id, "schedule id"),))


def delete_schedule(conn: Any, id: str) -> None:
    """Delete the schedule and its tick records; the runs it started stay."""
    connections.fetch(conn, DELETE, (check_name(id, "schedule id"),))


def trigger_schedule(conn: Any, id: str) -> uuid.UUID:
    """Start one run now, as a tick at this instant would (whatever the overlap policy)."""
    rows = connections.fetch(conn, TRIGGER, (check_name(id, "schedule id"),))
    return queries.as_uuid(rows[0][0])



def backfill_schedule(conn: Any, id: str, start: datetime, end: datetime, *,
                      overlap: str = "allow_all") -> list[uuid.UUID]:
    """One run for every tick in [start, end), decided by ``overlap``; the runs it started.

    Ticks decided before (fired on time, or by an earlier backfill) start
    nothing, so backfilling a range again returns ``[]``. ``end`` may not be
    in the future: future ticks fire on time.
    """
    check_name(id, "schedule id")
    check_overlap(overlap)
    found = connections.fetch(conn, BACKFILL,
                              backfill_params(id, connections.fetch(conn, SPEC, (id,)), start,
                                              end, overlap))
    return [queries.as_uuid(row[0]) for row in found]


def check_overlap(overlap: str) -> str:
    if overlap not in OVERLAP_POLICIES:
        raise ValueError(f"unknown overlap policy {overlap!r}: use one of "
                         f"{', '.join(OVERLAP_POLICIES)}")
    return overlap


def backfill_params(id: str, spec_rows: list[tuple[Any, ...]], start: datetime, end: datetime,
                    overlap: str) -> tuple[Any, ...]:
    """The parameters of :data:`BACKFILL`: a cron schedule's ticks are worked out here."""
    if not spec_rows:
        raise errors.ScheduleNotFound(f"unknown schedule {id!r}")
    cron, every, timezone, start_at = spec_rows[0]
    timetable = Timetable(cron=cron, every=every, timezone=timezone, start_at=start_at)
    ticks = timetable.ticks_between(start, end)  # also checks start and end
    # An interval schedule's ticks are worked out in SQL, from the same anchor.
    return (id, start, end, overlap, ticks if cron is not None else None)

