"""When ticks fall (pgflow.timetable) and what a due schedule decides (pgflow.ticker.plan).

No database: cron iteration, DST, interval anchoring, jitter and catch-up are
pure functions of the spec and the clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import islice

import pytest

from pgflow.ticker import MAX_MISSED_RECORDED, Due, plan
from pgflow.timetable import Timetable, jitter_for, zone

PARIS = zone("Europe/Paris")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def ticks(timetable: Timetable, after: datetime, n: int) -> list[datetime]:
    return list(islice(timetable.ticks_after(after), n))


def test_daily_at_nine_in_paris_follows_the_march_dst_change():
    daily = Timetable(cron="0 9 * * *", timezone="Europe/Paris")
    got = ticks(daily, utc(2026, 3, 27, 12), 4)
    assert got == [utc(2026, 3, 28, 8), utc(2026, 3, 29, 7), utc(2026, 3, 30, 7),
                   utc(2026, 3, 31, 7)]
    assert all(t.astimezone(PARIS).hour == 9 for t in got)


def test_a_tick_in_the_skipped_spring_hour_fires_at_the_end_of_the_gap():
    # 2026-03-29: Paris clocks jump from 02:00 to 03:00; 02:30 does not exist.
    got = ticks(Timetable(cron="30 2 * * *", timezone="Europe/Paris"), utc(2026, 3, 28, 12), 2)
    assert got[0] == utc(2026, 3, 29, 1)  # 03:00 CEST, the first minute after the gap
    assert got[1] == utc(2026, 3, 30, 0, 30)  # 02:30 CEST the next day


def test_a_fixed_hour_tick_in_the_repeated_autumn_hour_fires_once():
    # 2026-10-25: Paris clocks go back from 03:00 to 02:00; 02:30 happens twice.
    got = ticks(Timetable(cron="30 2 * * *", timezone="Europe/Paris"), utc(2026, 10, 24, 12), 2)
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_an_every_n_minutes_cron_fires_in_both_occurrences_of_the_repeated_hour():
    half_hourly = Timetable(cron="*/30 * * * *", timezone="Europe/Paris")
    got = ticks(half_hourly, utc(2026, 10, 24, 23, 45), 5)
    # 02:00 CEST, 02:30 CEST, 02:00 CET, 02:30 CET: 30 minutes apart in real time
    assert got == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1),
                   utc(2026, 10, 25, 1, 30), utc(2026, 10, 25, 2)]


def test_intervals_are_anchored_so_they_never_drift():
    every15 = Timetable(every=timedelta(minutes=15))
    got = ticks(every15, utc(2026, 12, 2, 10, 7, 31, 123), 3)
    assert got == [utc(2026, 12, 2, 10, 15), utc(2026, 12, 2, 10, 30), utc(2026, 12, 2, 10, 45)]
    anchored = Timetable(every=timedelta(minutes=15), start_at=utc(2026, 12, 2, 10, 7))
    assert ticks(anchored, utc(2026, 12, 2, 10, 30), 2) == [utc(2026, 12, 2, 10, 37),
                                                            utc(2026, 12, 2, 10, 52)]
    # Before start_at, the first tick is start_at itself.
    assert ticks(anchored, utc(2026, 12, 1), 1) == [utc(2026, 12, 2, 10, 7)]


def test_ticks_are_strictly_after_and_end_at_is_exclusive():
    hourly = Timetable(cron="0 * * * *", end_at=utc(2026, 1, 1, 3))
    assert ticks(hourly, utc(2026, 1, 1, 1), 5) == [utc(2026, 1, 1, 2)]
    assert ticks(hourly, utc(2026, 1, 1, 0, 59, 59, 999999), 1) == [utc(2026, 1, 1, 1)]
    assert hourly.ticks_between(utc(2026, 1, 1, 1), utc(2026, 1, 1, 3)) == [
        utc(2026, 1, 1, 1), utc(2026, 1, 1, 2)]


@pytest.mark.parametrize("kwargs, message", [
    ({"cron": "61 * * * *"}, "invalid cron expression '61 * * * *'"),
    ({"cron": "* * * *"}, "needs 5 fields"),
    ({"cron": "* * * * * *"}, "needs 5 fields"),
    ({"cron": "0 0 31 2 *"}, "invalid cron expression"),
    ({}, "exactly one of cron"),
    ({"cron": "0 * * * *", "every": 60}, "exactly one of cron"),
    ({"every": 0}, "every must be positive"),
    ({"every": timedelta(seconds=-5)}, "every must be positive"),
    ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
    ({"cron": "0 * * * *", "start_at": datetime(2026, 1, 1)}, "start_at must be timezone-aware"),
    ({"cron": "0 * * * *", "start_at": utc(2026, 2, 1), "end_at": utc(2026, 1, 1)},
     "must be after start_at"),
])
def test_a_bad_timetable_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        Timetable(**kwargs)


def test_time_zone_names_are_matched_without_regard_to_case():
    assert zone("europe/paris").key == "Europe/Paris"


def test_jitter_is_fixed_per_tick_and_within_its_bound():
    bound = timedelta(seconds=20)
    tick = utc(2026, 12, 2, 10)
    delays = {jitter_for("sync-crm", tick + timedelta(minutes=15 * i), bound) for i in range(200)}
    assert all(timedelta(0) <= d < bound for d in delays)
    assert len(delays) > 150  # spread out, not one value
    assert jitter_for("sync-crm", tick, bound) == jitter_for("sync-crm", tick, bound)
    assert jitter_for("a", tick, bound) != jitter_for("b", tick, bound)
    assert jitter_for("a", tick, None) == timedelta(0)


def due(cursor: datetime, now: datetime, **overrides: object) -> Due:
    fields: dict[str, object] = dict(id="s", cron="0 * * * *", every=None, timezone="UTC",
                                     catchup_window=timedelta(minutes=10), jitter=None,
                                     start_at=None, end_at=None, handled_through=cursor, now=now)
    fields.update(overrides)
    return Due(**fields)  # type: ignore[arg-type]


def test_ticks_older_than_the_catchup_window_are_missed_the_rest_fire():
    p = plan(due(utc(2026, 1, 1, 9), utc(2026, 1, 1, 12, 5)))
    assert p.ticks == [(utc(2026, 1, 1, 10), "missed"), (utc(2026, 1, 1, 11), "missed"),
                       (utc(2026, 1, 1, 12), "fire")]
    assert p.handled_through == utc(2026, 1, 1, 12)
    assert p.next_fire_at == utc(2026, 1, 1, 13)


def test_a_tick_waits_for_its_jitter():
    d = due(utc(2026, 1, 1, 11, 30), utc(2026, 1, 1, 12), jitter=timedelta(minutes=30))
    delay = jitter_for("s", utc(2026, 1, 1, 12), timedelta(minutes=30))
    assert delay > timedelta(0)
    p = plan(d)
    assert p.ticks == [] and p.handled_through == utc(2026, 1, 1, 11, 30)
    assert p.next_fire_at == utc(2026, 1, 1, 12) + delay
    later = plan(due(utc(2026, 1, 1, 11, 30), utc(2026, 1, 1, 12) + delay,
                     jitter=timedelta(minutes=30)))
    assert later.ticks == [(utc(2026, 1, 1, 12), "fire")]


def test_a_long_outage_records_a_bounded_number_of_missed_ticks():
    p = plan(due(utc(2026, 1, 1), utc(2026, 1, 3, 0, 0, 30), cron="* * * * *"))
    missed = [t for t, outcome in p.ticks if outcome == "missed"]
    fired = [t for t, outcome in p.ticks if outcome == "fire"]
    assert len(missed) == MAX_MISSED_RECORDED
    assert fired == [utc(2026, 1, 2, 23, 51) + timedelta(minutes=i) for i in range(10)]
    assert p.next_fire_at == utc(2026, 1, 3, 0, 1)


def test_a_schedule_past_its_end_has_no_next_fire_time():
    p = plan(due(utc(2026, 1, 1, 9), utc(2026, 1, 1, 12, 5), end_at=utc(2026, 1, 1, 12, 30),
                 catchup_window=timedelta(hours=5)))
    assert [t for t, _ in p.ticks] == [utc(2026, 1, 1, h) for h in (10, 11, 12)]
    assert p.next_fire_at is None
