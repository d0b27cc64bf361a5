"""Helpers for testing workflows against a real database.

``advance_time`` moves the engine clock (``pgflow.now()``) forward for the
whole database and fires every timer that comes due, so a workflow that
sleeps for weeks is tested in seconds, with a real worker running it.

``check_replay`` / ``check_replays`` tell whether the current code still
replays recorded runs (see :mod:`pgflow.replaycheck`): the test to run in CI
before deploying a change to a workflow.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pgflow import connections
from pgflow.durations import as_timedelta
from pgflow.replaycheck import ReplayCheck, check_replay, check_replays

__all__ = ["ReplayCheck", "advance_time", "advance_time_async", "check_replay", "check_replays"]

ADVANCE = "select pgflow.advance_time(%s)"
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
