"""Firing schedules: the scheduler leader's half that needs cron (``sql/schema/12_schedules.sql``).

One pass: start the buffered ticks whose schedule is free again, then, in
batches of :data:`BATCH`, take the due schedules (locked, in due order), work
out each one's ticks with :mod:`pgflow.timetable`, and hand them to
``pgflow.fire_schedules``, which starts the runs and moves each schedule's
cursor and next fire time in the same transaction.

What a due schedule's ticks become (:func:`plan`): every tick after the
cursor whose time (plus its jitter) has come is decided; one older than the
catch-up window is recorded as missed, not fired (the scheduler was down, or
the schedule paused, when it came due); the others are fired by the overlap
policy. The next fire time is the first undecided tick plus its jitter.

The leader (:mod:`pgflow.scheduler`) runs :func:`fire_due_async` on its own
connection; ``pgflow.testing.advance_time`` runs :func:`fire_due` on the
test's, at each tick's instant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from pgflow import connections
from pgflow.timetable import Timetable, jitter_for

logger = logging.getLogger("pgflow.scheduler")

BATCH = 500  # schedules decided in one transaction
MAX_MISSED_RECORDED = 1000  # missed ticks recorded a schedule a pass; older ones are skipped

START_BUFFERED = "select pgflow.start_buffered_ticks()"
DUE = ("select id, cron, every, timezone, catchup_window, jitter, start_at, end_at,"
       " handled_through, now from pgflow.due_schedules(%s)")
FIRE = ("select pgflow.fire_schedules(%s::text[], %s::timestamptz[], %s::timestamptz[],"
        " %s::text[], %s::timestamptz[], %s::text[], %s::text[])")
_ONE_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class Due:
    """A row of ``pgflow.due_schedules``."""

    id: str
    cron: str | None
    every: timedelta | None
    timezone: str
    catchup_window: timedelta
    jitter: timedelta | None
    start_at: datetime | None
    end_at: datetime | None
    handled_through: datetime
    now: datetime


@dataclass
class Plan:
    """What to record for one due schedule: ticks as (time, 'fire' | 'missed' | 'failed')."""

    id: str
    handled_through: datetime
    ticks: list[tuple[datetime, str]] = field(default_factory=list)
    next_fire_at: datetime | None = None
    error: str | None = None  # with 'failed' ticks: why they could not start

    def failed(self, error: str) -> Plan:
        """This plan with every tick to fire recorded as failed instead."""
        ticks = [(at, "failed" if outcome == "fire" else outcome) for at, outcome in self.ticks]
        return Plan(self.id, self.handled_through, ticks, self.next_fire_at, error)


def plan(due: Due) -> Plan:
    """Decide which ticks of ``due`` fire now, which were missed, and when to look next."""
    result = Plan(due.id, due.handled_through)
    try:
        timetable = Timetable(cron=due.cron, every=due.every, timezone=due.timezone,
                              start_at=due.start_at, end_at=due.end_at)
    except (ValueError, TypeError) as exc:
        # Only a schedule written to the table by hand can get here: every
        # create_schedule checks the spec. It stops (no next fire time).
        logger.error("schedule %r cannot fire: %s; replace it with pgflow.create_schedule",
                     due.id, exc)
        return result
    cutoff = due.now - due.catchup_window
    missed = 0
    ticks: Iterator[datetime] = timetable.ticks_after(due.handled_through)
    while (tick := next(ticks, None)) is not None:
        fire_at = tick + jitter_for(due.id, tick, due.jitter)
        if fire_at > due.now:
            result.next_fire_at = fire_at
            break
        late = fire_at < cutoff  # measured from when it should fire: jitter is not lateness
        if late and missed == MAX_MISSED_RECORDED:
            # Too many to record one by one: go on from the catch-up window.
            logger.warning("schedule %r: more than %d ticks missed; those before %s are not "
                           "recorded", due.id, missed, cutoff.isoformat())
            result.handled_through = cutoff - _ONE_US
            ticks = timetable.ticks_after(result.handled_through)
            continue
        missed += late
        result.ticks.append((tick, "missed" if late else "fire"))
        result.handled_through = tick
    if missed:
        logger.warning("schedule %r: %d tick(s) came due more than %s ago (its catch-up "
                       "window) and were recorded as missed", due.id, missed, due.catchup_window)
    return result


def _fire_params(plans: list[Plan]) -> tuple[Any, ...]:
    ticks = [(p.id, at, outcome, p.error) for p in plans for at, outcome in p.ticks]
    return ([p.id for p in plans], [p.handled_through for p in plans],
            [p.next_fire_at for p in plans], *([t[i] for t in ticks] for i in range(4)))


def _failure(exc: Exception) -> str:
    return " ".join(str(exc).split())[:1000] or type(exc).__name__


def fire_due(conn: Any, *, batch: int = BATCH) -> int:
    """One pass in ``conn``'s transaction (a synchronous connection); returns the runs started.

    Used by ``pgflow.testing.advance_time``: a tick that cannot start raises.
    """
    started = int(connections.fetch(conn, START_BUFFERED, ())[0][0])
    while True:
        rows = connections.fetch(conn, DUE, (batch,))
        if not rows:
            return started
        plans = [plan(Due(*row)) for row in rows]
        started += int(connections.fetch(conn, FIRE, _fire_params(plans))[0][0])
        if len(rows) < batch:
            return started


async def fire_due_in_transaction_async(conn: psycopg.AsyncConnection[Any], *,
                                        batch: int = BATCH) -> int:
    """:func:`fire_due` on an ``AsyncConnection`` (``pgflow.testing.advance_time_async``)."""
    started = int((await connections.afetch(conn, START_BUFFERED, ()))[0][0])
    while True:
        rows = await connections.afetch(conn, DUE, (batch,))
        if not rows:
            return started
        plans = [plan(Due(*row)) for row in rows]
        started += int((await connections.afetch(conn, FIRE, _fire_params(plans)))[0][0])
        if len(rows) < batch:
            return started


async def fire_due_async(conn: psycopg.AsyncConnection[Any], *, batch: int = BATCH) -> int:
    """One pass on the leader's autocommit connection; returns the runs started.

    Each batch is one transaction. If a batch fails (a tick's run cannot
    start: its workflow's parameters changed under the schedule's input, say),
    its schedules are fired one at a time, and the ticks of one that still
    fails are recorded as failed, with the error, so that it moves on.
    """
    started = int((await connections.afetch(conn, START_BUFFERED, ()))[0][0])
    while True:
        plans: list[Plan] = []
        try:
            async with conn.transaction():
                rows = await connections.afetch(conn, DUE, (batch,))
                plans = [plan(Due(*row)) for row in rows]
                if plans:
                    started += int((await connections.afetch(conn, FIRE,
                                                             _fire_params(plans)))[0][0])
        except psycopg.Error:
            raise
        except Exception as exc:  # a pgflow error translated from the database
            logger.warning("firing %d schedules failed (%s); firing them one at a time",
                           len(plans), _failure(exc))
            started += await _fire_one_by_one(conn)
            continue
        if len(rows) < batch:
            return started


async def _fire_one_by_one(conn: psycopg.AsyncConnection[Any]) -> int:
    started = 0
    while True:
        async with conn.transaction():
            rows = await connections.afetch(conn, DUE, (1,))
            if not rows:
                return started
            one = plan(Due(*rows[0]))
            try:
                async with conn.transaction():  # a savepoint: a failure undoes only this
                    started += int((await connections.afetch(conn, FIRE,
                                                             _fire_params([one])))[0][0])
                continue
            except psycopg.Error:
                raise
            except Exception as exc:
                logger.error("schedule %r: its tick(s) could not start: %s", one.id,
                             _failure(exc))
                await connections.afetch(conn, FIRE, _fire_params([one.failed(_failure(exc))]))
