"""Helpers for testing workflows against a real database.

``advance_time`` moves the engine clock (``pgflow.now()``) forward for the
whole database and fires every timer and schedule tick that comes due, so a
workflow that sleeps for weeks, or a nightly schedule, is tested in seconds,
with a real worker running it. The clock stops at each schedule tick on the
way (so each fires on time, never as "missed"); nothing runs between two
stops, so a tick sees the runs of earlier ticks as they were left. It is
for test databases: every run in the database sees the moved clock, and what
is recorded meanwhile keeps its future timestamps. ``time_travel`` puts the
clock back where it found it when its block ends; ``reset_time`` puts it
back to the real time. ``pgflow.purge`` ages runs by real time, so a moved
clock never makes it delete a run early.

``check_replay`` / ``check_replays`` tell whether the current code still
replays recorded runs (see :mod:`pgflow.replaycheck`): the test to run in CI
before deploying a change to a workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from pgflow import connections, ticker
from pgflow.durations import as_timedelta
from pgflow.replaycheck import ReplayCheck, check_replay, check_replays

__all__ = ["ReplayCheck", "TimeTravel", "advance_time", "advance_time_async", "check_replay",
           "check_replays", "reset_time", "time_travel"]

ADVANCE = "select pgflow.advance_time(%s)"
# How far (engine time) the next schedule tick is, if it is due within %s.
NEXT_TICK = ("select min(s.next_fire_at) - pgflow.now() from pgflow.schedules s"
             " where not s.paused and s.next_fire_at <= pgflow.now() + %s")
ANY_DUE = ("select exists (select 1 from pgflow.schedules s"
           " where not s.paused and s.next_fire_at <= pgflow.now())")
# A due schedule another transaction holds (a worker's scheduler deciding it,
# an open backfill) is waited for this long, polling, before the clock moves on.
SETTLE_TIMEOUT = 10.0  # seconds
SETTLE_POLL = 0.01  # seconds
RESET = "select pgflow.reset_time(%s)"
OFFSET = "select offset_by from pgflow.clock"
_WHAT = "advance_time's delta (the clock only moves forward)"


def advance_time(conn: Any, delta: timedelta | float) -> int:
    """Move the engine clock by ``delta``, firing due timers and schedule ticks on the way.

    Returns how many timers fired plus how many runs the ticks started. Runs
    in ``conn``'s transaction (use an autocommit connection, or commit).
    """
    remaining = as_timedelta(delta, _WHAT)
    fired = 0
    last_step: timedelta | None = None
    while (step := connections.fetch(conn, NEXT_TICK, (remaining,))[0][0]) is not None:
        step = max(step, timedelta(0))
        if step == last_step == timedelta(0):
            break  # a due schedule another transaction holds: the leader fires it
        fired += int(connections.fetch(conn, ADVANCE, (step,))[0][0])
        fired += _settle(conn)
        remaining, last_step = max(remaining - step, timedelta(0)), step
    fired += int(connections.fetch(conn, ADVANCE, (remaining,))[0][0])
    return fired + _settle(conn)


def _settle(conn: Any) -> int:
    """Fire the due schedules; wait for those another transaction holds to be decided.

    Moving the clock past a tick nobody decided would make it late (missed).
    """
    fired = ticker.fire_due(conn)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while connections.fetch(conn, ANY_DUE, ())[0][0] and time.monotonic() < deadline:
        time.sleep(SETTLE_POLL)
        fired += ticker.fire_due(conn)
    return fired


async def _settle_async(conn: Any) -> int:
    fired = await ticker.fire_due_in_transaction_async(conn)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (await connections.afetch(conn, ANY_DUE, ()))[0][0] and time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_POLL)
        fired += await ticker.fire_due_in_transaction_async(conn)
    return fired


async def advance_time_async(conn: Any, delta: timedelta | float) -> int:
    """:func:`advance_time` for a ``psycopg.AsyncConnection``."""
    remaining = as_timedelta(delta, _WHAT)
    fired = 0
    last_step: timedelta | None = None
    while (step := (await connections.afetch(conn, NEXT_TICK, (remaining,)))[0][0]) is not None:
        step = max(step, timedelta(0))
        if step == last_step == timedelta(0):
            break
        fired += int((await connections.afetch(conn, ADVANCE, (step,)))[0][0])
        fired += await _settle_async(conn)
        remaining, last_step = max(remaining - step, timedelta(0)), step
    fired += int((await connections.afetch(conn, ADVANCE, (remaining,)))[0][0])
    return fired + await _settle_async(conn)


def reset_time(conn: Any, offset: timedelta = timedelta(0)) -> timedelta:
    """Put the engine clock back to the real time (or ``offset`` ahead of it).

    Returns the offset it replaced. Timers that came due meanwhile have fired;
    timestamps recorded while the clock was ahead stay as they are.
    """
    rows = connections.fetch(conn, RESET, (as_timedelta(offset, "the clock offset"),))
    return rows[0][0]


class TimeTravel:
    """The engine clock inside :func:`time_travel`: ``advance`` it, read its ``offset``."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def advance(self, delta: timedelta | float) -> int:
        """:func:`advance_time`: move the clock by ``delta``; returns how many fired."""
        return advance_time(self._conn, delta)

    @property
    def offset(self) -> timedelta:
        """How far the engine clock runs ahead of the database's real clock."""
        return connections.fetch(self._conn, OFFSET, ())[0][0]


@contextlib.contextmanager
def time_travel(conn: Any) -> Iterator[TimeTravel]:
    """Move the engine clock inside a block; on leaving it, put the clock back as found.

    ``conn`` must commit its own statements (autocommit): the workers see the
    clock only once it is committed. As a pytest fixture::

        @pytest.fixture
        def clock(conn):
            with pgflow.testing.time_travel(conn) as clock:
                yield clock

        def test_reminder(clock, conn):
            run_id = pgflow.start(conn, remind, "u1")
            clock.advance(timedelta(days=1))
    """
    travel = TimeTravel(conn)
    found = travel.offset
    try:
        yield travel
    finally:
        reset_time(conn, found)
