"""Helpers for testing workflows against a real database.

``advance_time`` moves the engine clock (``pgflow.now()``) forward for the
whole database and fires every timer that comes due, so a workflow that
sleeps for weeks is tested in seconds, with a real worker running it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pgflow import connections

__all__ = ["advance_time", "advance_time_async"]

ADVANCE = "select pgflow.advance_time(%s)"


def _as_delta(delta: timedelta | float) -> timedelta:
    if isinstance(delta, bool) or not isinstance(delta, (timedelta, int, float)):
        raise TypeError(f"delta must be a timedelta or a number of seconds, not {delta!r}")
    value = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
    if value < timedelta(0):
        raise ValueError(f"the clock only moves forward, got {delta!r}")
    return value


def advance_time(conn: Any, delta: timedelta | float) -> int:
    """Move the engine clock by ``delta`` and fire due timers; returns how many fired.

    Runs in ``conn``'s transaction (use an autocommit connection, or commit).
    """
    rows = connections.fetch(conn, ADVANCE, (_as_delta(delta),))
    return int(rows[0][0])


async def advance_time_async(conn: Any, delta: timedelta | float) -> int:
    """:func:`advance_time` for a ``psycopg.AsyncConnection``."""
    rows = await connections.afetch(conn, ADVANCE, (_as_delta(delta),))
    return int(rows[0][0])
