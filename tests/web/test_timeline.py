"""The timeline and the chart are drawn to scale; queue notes (no database)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from pgflow import models
from pgflow.web import charts, timeline

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)


def s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run(status: str, steps: list[models.StepRecord], finished: float | None) -> models.Run:
    return models.Run(uuid.uuid4(), "wf", "1", "default", None, status, 0, [], None, None, None,
                      T0, s(10), None if finished is None else s(finished), steps)


def step(seq: int, name: str, kind: str, status: str, start: float, end: float,
         attempts: int = 1) -> models.StepRecord:
    return models.StepRecord(seq, name, kind, status, attempts, None, None, s(start), s(end))


def attempt(n: int, start: float, end: float) -> dict:
    return {"attempt": n, "started_at": s(start), "finished_at": s(end),
            "error": {"type": "E", "message": "boom"}}


def test_attempts_back_offs_sleeps_and_waits_sit_where_they_happened():
    r = run("completed", [
        step(0, "charge", "step", "completed", 60, 70, attempts=3),
        step(1, "nap", "sleep", "completed", 70, 170),
        step(2, "approve", "signal", "completed", 170, 190),
        step(3, "now", "value", "completed", 190, 190),
    ], finished=200)
    t = timeline.build(r, {0: [attempt(1, 10, 20), attempt(2, 30, 40)]}, now=s(999))
    assert t.start == T0 and t.end == s(200)  # a finished run: its end, not now
    lanes = {lane.label: lane.segments for lane in t.lanes}
    assert [(x.kind, x.start, x.width) for x in lanes["run (completed)"]] == [
        ("queued", 0.0, 0.05), ("ok", 0.05, pytest.approx(0.95))]
    charge = [(x.kind, round(x.start, 3), round(x.width, 3)) for x in lanes["0 charge"]]
    assert charge == [("failed", 0.05, 0.05), ("backoff", 0.1, 0.05), ("failed", 0.15, 0.05),
                      ("backoff", 0.2, 0.1), ("ok", 0.3, 0.05)]
    assert [(x.kind, x.start, x.width) for x in lanes["1 nap (sleep)"]] == [("sleep", 0.35, 0.5)]
    wait = lanes["2 approve (signal)"][0]
    assert (wait.kind, wait.start, round(wait.width, 3), wait.label) == (
        "wait", 0.85, 0.1, "waiting for signal approve")
    instant = lanes["3 now (value)"][0]
    assert instant.kind == "instant" and instant.width == timeline.MIN_WIDTH
    assert "attempt 2 failed (E: boom)" in lanes["0 charge"][2].title
    assert [label for _, label in t.ticks] == ["+0 ms", "+50.0 s", "+1 min 40 s", "+2 min 30 s",
                                               "+3 min 20 s"]


def test_an_unfinished_run_ends_now_and_open_waits_reach_it():
    r = run("sleeping", [step(0, "charge", "step", "retrying", 10, 20, attempts=1)], finished=None)
    t = timeline.build(r, {0: [attempt(1, 10, 20)]}, now=s(40),
                       waits=[{"kind": "retry", "seq": 0, "due_at": s(100)}])
    assert t.end == s(40)
    assert [(x.kind, x.start, x.width) for x in t.lanes[0].segments] == [
        ("queued", 0.0, 0.25), ("sleep", 0.25, 0.75)]  # the run itself: asleep since
    kinds = [(x.kind, x.start, x.width) for x in t.lanes[1].segments]
    assert kinds == [("failed", 0.25, 0.25), ("backoff", 0.5, 0.5)]
    assert "until 2026-12-01 08:01:40.000 UTC" in t.lanes[1].segments[1].title


def test_the_failure_chart_scales_bars_to_the_busiest_hour():
    hours = [(T0 + timedelta(hours=i), n) for i, n in enumerate([0, 5, 10] + [0] * 21)]
    chart = charts.bar_chart(hours)
    assert len(chart.bars) == 24 and chart.peak == 10 and chart.total == 15
    heights = [b.height for b in chart.bars[:3]]
    assert heights[0] == 0 and heights[2] == 2 * heights[1]
    assert chart.bars[2].y + chart.bars[2].height == chart.baseline
    assert chart.bars[0].label == "08h" and chart.bars[1].label == ""
    assert charts.bar_chart([(T0, 0)]).bars[0].height == 0


def test_a_long_journal_draws_its_first_and_last_entries():
    steps = [step(i, f"s{i}", "step", "completed", i, i + 0.5) for i in range(250)]
    t = timeline.build(run("completed", steps, finished=300), {}, now=s(999))
    assert t.hidden == 50
    labels = [lane.label for lane in t.lanes]
    assert len(labels) == 1 + 100 + 1 + 100
    assert labels[1] == "0 s0" and labels[100] == "99 s99" and labels[-1] == "249 s249"
    assert labels[101] == "... 50 entries not drawn" and labels[102] == "150 s150"


def test_queue_notes_say_why_runs_wait():
    from pgflow.flow import QueueInfo
    from pgflow.web.reads import queue_holds

    assert queue_holds(QueueInfo("q", None, None, False, 3, 0, 1, 0, 0)) == []
    assert queue_holds(QueueInfo("q", 2, None, True, 3, 1, 2, 0, 0)) == [
        "paused: none of its 3 pending run(s) is claimed", "at its cap: 2 of 2 executing",
        "1 run(s) held by a workflow's concurrency limit"]
    assert queue_holds(QueueInfo("q", None, None, True, 0, 0, 0, 0, 0)) == ["paused: nothing is claimed"]
