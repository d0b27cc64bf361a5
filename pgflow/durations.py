"""Durations as the API accepts them: a ``timedelta`` or a number of seconds."""

from __future__ import annotations

from datetime import timedelta

__all__ = ["as_timedelta"]


def as_timedelta(value: timedelta | float, what: str, *, positive: bool = False) -> timedelta:
    """``value`` as a ``timedelta``; negative (or, with ``positive``, zero) is a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (timedelta, int, float)):
        raise TypeError(f"{what} must be a timedelta or a number of seconds, not {value!r}")
    delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if positive and delta <= timedelta(0):
        raise ValueError(f"{what} must be positive, got {value!r}")
    if delta < timedelta(0):
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return delta
