"""Durations as the API accepts them: a ``timedelta`` or a number of seconds."""

from __future__ import annotations

import math
from datetime import timedelta

__all__ = ["MAX_DURATION", "as_timedelta"]

MAX_DURATION = timedelta(days=36525)
"""100 years: the longest delay, sleep, timeout or back-off accepted. Far past any
real need, and far from where engine timestamps (now + duration) would overflow;
SQL ``pgflow.start`` enforces the same bound."""


def as_timedelta(value: timedelta | float, what: str, *, positive: bool = False) -> timedelta:
    """``value`` as a ``timedelta``; negative (or, with ``positive``, zero), NaN, infinite
    or over :data:`MAX_DURATION` is a ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (timedelta, int, float)):
        raise TypeError(f"{what} must be a timedelta or a number of seconds, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    if not isinstance(value, timedelta) and abs(value) > MAX_DURATION.total_seconds():
        raise ValueError(f"{what} must be at most {MAX_DURATION.days} days (100 years), "
                         f"got {value!r} seconds")
    delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if positive and delta <= timedelta(0):
        raise ValueError(f"{what} must be positive, got {value!r}")
    if delta < timedelta(0):
        raise ValueError(f"{what} must not be negative, got {value!r}")
    if delta > MAX_DURATION:
        raise ValueError(f"{what} must be at most {MAX_DURATION.days} days (100 years), "
                         f"got {value!r}")
    return delta
