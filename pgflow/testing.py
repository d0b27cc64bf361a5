"""Helpers for testing workflows against a real database.

``advance_time`` moves the engine clock (``pgflow.now()``) forward for the
whole database and fires every timer that comes due, so a workflow that
sleeps for weeks is tested in seconds, with a real worker running it. It is
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

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from pgflow import connections
from pgflow.durations import as_timedelta
from pgflow.replaycheck import ReplayCheck, check_replay, check_replays

__all__ = ["ReplayCheck", "TimeTravel", "advance_time", "advance_time_async", "check_replay",
           "check_replays", "reset_time", "time_travel"]

ADVANCE = "select pgflow.advance_time(%s)"
RESET = "select pgflow.reset_time(%s)"
OFFSET = "select offset_by from pgflow.clock"
_WHAT = "advance_time's delta (the clock only moves forward)"


def advance_time(conn: Any, delta: timedelta | float) -> int:
    """Move the engine clock by ``delta`` and fire due timers; returns how many fired.

    Runs in ``conn``'s transaction (use an autocommit connection, or commit).
    """
    rows = connections.fetch(conn, ADVANCE, (as_timedelta(delta, _WHAT),))
    return int(rows[0][0])


async def advance_time_async(conn: Any, delta: timedelta | float) -> int:
    """:func:`advance_time` for a ``psycopg.AsyncConnection``."""
    rows = await connections.afetch(conn, ADVANCE, (as_timedelta(delta, _WHAT),))
    return int(rows[0][0])


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
        """:func:`advance_time`: move the clock by ``delta``; returns how many timers fired."""
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
