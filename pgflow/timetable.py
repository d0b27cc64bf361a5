"""When a schedule's ticks fall: a cron expression or a fixed interval, in a time zone.

Cron expressions are parsed and iterated by cronsim, in the schedule's IANA
time zone (``zoneinfo``), so ticks follow local wall-clock time across DST
changes. cronsim does what Debian's cron does at a change:

* a local time that does not exist (the spring-forward hour) fires at the
  first minute after the gap: ``30 2 * * *`` in Europe/Paris fires at 03:00
  local time on the day clocks skip from 02:00 to 03:00;
* a local time that happens twice (the fall-back hour) fires once, at its
  first occurrence, for an expression with a fixed hour (``30 2 * * *``);
  an expression whose hour field is ``*`` fires in both occurrences (it is
  "every N minutes", and those minutes all pass).

Intervals (``every``) are anchored: ticks are ``anchor + k * every`` for
whole k, the anchor being ``start_at`` or else the Unix epoch, so they never
drift with how late the scheduler ran, and every 15 minutes means :00,
:15, :30 and :45. An interval counts elapsed time, not wall-clock time:
``every=timedelta(days=1)`` is 24 hours across a DST change (use cron for
"every day at 09:00").

Every tick comes out as an aware ``datetime`` in UTC.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from cronsim import CronSim, CronSimError

from pgflow.durations import as_timedelta

__all__ = ["Timetable", "jitter_for", "zone"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


@cache
def _zones_by_lower_name() -> dict[str, str]:
    return {name.lower(): name for name in available_timezones()}


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ``ValueError`` naming it if there is none.

    PostgreSQL matches zone names without regard to case, zoneinfo does not:
    a schedule created from SQL as ``europe/paris`` still gets Europe/Paris.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"timezone must be an IANA name such as 'Europe/Paris', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        canonical = _zones_by_lower_name().get(name.lower())
        if canonical is not None:
            return ZoneInfo(canonical)
    raise ValueError(f"unknown time zone {name!r}: use an IANA name such as 'Europe/Paris' "
                     f"or 'UTC'")


def _aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, not {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (e.g. datetime(..., tzinfo=UTC)), "
                         f"got {value!r}")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Timetable:
    """A schedule's timing: exactly one of ``cron`` (5 fields) and ``every``."""

    cron: str | None = None
    every: timedelta | None = None
    timezone: str = "UTC"
    start_at: datetime | None = None
    end_at: datetime | None = None

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ValueError("a schedule needs exactly one of cron=... and every=...")
        if self.cron is not None:
            self._check_cron(self.cron)
        if self.every is not None:
            object.__setattr__(self, "every", as_timedelta(self.every, "every", positive=True))
        zone(self.timezone)
        for name in ("start_at", "end_at"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _aware(value, name))
        if self.start_at and self.end_at and self.end_at <= self.start_at:
            raise ValueError(f"end_at ({self.end_at.isoformat()}) must be after start_at "
                             f"({self.start_at.isoformat()})")

    @staticmethod
    def _check_cron(expression: str) -> None:
        if not isinstance(expression, str):
            raise TypeError(f"cron must be a string such as '0 3 * * *', not {expression!r}")
        fields = expression.split()
        if len(fields) != 5:
            raise ValueError(f"invalid cron expression {expression!r}: it needs 5 fields "
                             f"(minute hour day-of-month month day-of-week), got {len(fields)}")
        try:
            CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError as exc:
            raise ValueError(f"invalid cron expression {expression!r}: {exc}") from None

    def ticks_after(self, after: datetime) -> Iterator[datetime]:
        """Every tick strictly after ``after`` within [start_at, end_at), in order."""
        after = _aware(after, "after")
        if self.start_at is not None and after < self.start_at:
            after = self.start_at - _ONE_US  # the first tick may be start_at itself
        for tick in self._spec_ticks_after(after):
            if self.end_at is not None and tick >= self.end_at:
                return
            yield tick

    def ticks_between(self, start: datetime, end: datetime) -> list[datetime]:
        """The ticks in [start, end), ignoring start_at and end_at (a backfill's range)."""
        start, end = _aware(start, "start"), _aware(end, "end")
        if end <= start:
            raise ValueError(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
        ticks = []
        for tick in self._spec_ticks_after(start - _ONE_US):
            if tick >= end:
                break
            ticks.append(tick)
        return ticks

    def _spec_ticks_after(self, after: datetime) -> Iterator[datetime]:
        if self.every is not None:
            anchor = self.start_at or EPOCH
            k = (after - anchor) // self.every + 1
            while True:
                yield anchor + k * self.every
                k += 1
        assert self.cron is not None
        # cronsim counts whole minutes: start it at the minute of `after`, and
        # drop that minute itself if `after` was not strictly before it.
        local = after.astimezone(zone(self.timezone))
        minute = local.replace(second=0, microsecond=0)
        for tick in CronSim(self.cron, minute - timedelta(minutes=1)):
            tick_utc = tick.astimezone(UTC)
            if tick_utc > after:
                yield tick_utc


def jitter_for(schedule_id: str, tick: datetime, bound: timedelta | None) -> timedelta:
    """How late tick ``tick`` of ``schedule_id`` fires: in [0, bound), the same every time.

    A hash of the schedule and the tick, so every leader and every restart
    computes the same delay, and schedules sharing a cron spread out.
    """
    if not bound:
        return timedelta(0)
    digest = hashlib.blake2b(f"{schedule_id}\x00{tick.astimezone(UTC).isoformat()}".encode(),
                             digest_size=8).digest()
    span_us = bound // _ONE_US
    return timedelta(microseconds=int.from_bytes(digest, "big") % span_us)
