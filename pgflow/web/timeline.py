"""A run's timeline drawn to scale: one lane a journal entry, bars and labelled gaps.

The time axis runs from the run's creation to its end (or to now while it is
unfinished). Each entry of the journal is a lane:

* a step: each failed attempt (``pgflow.step_attempts``) as a red bar, the
  retry back-off after it as a labelled gap, the attempt that succeeded as a
  green bar; a step in back-off now shows the gap up to now;
* a sleep, a signal wait, a child or map wait: one gap bar labelled with its
  reason, up to when it ended (or now);
* an instant entry (``ctx.now()``, a child started): a thin mark.

A first lane shows the run itself: queued from creation to its first claim,
then running or suspended until its end. Positions are fractions of the axis
(0 to 1), so the template draws them in percent of any width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pgflow import models

__all__ = ["Lane", "Segment", "Timeline", "build"]

MIN_WIDTH = 0.004  # of the axis: an instant still shows
MAX_LANES = 200  # journal entries drawn; a longer journal shows its first and last 100


@dataclass(frozen=True)
class Segment:
    kind: str  # css class: queued, run, ok, failed, backoff, sleep, wait, instant, open
    start: float  # 0..1 of the axis
    width: float
    title: str  # the tooltip: what, when, how long
    label: str = ""  # written on the bar when it is wide enough


@dataclass
class Lane:
    label: str
    segments: list[Segment] = field(default_factory=list)


@dataclass(frozen=True)
class Timeline:
    start: datetime
    end: datetime
    lanes: list[Lane]
    ticks: list[tuple[float, str]]  # axis marks: position, offset from the start
    hidden: int = 0  # journal entries left out of the drawing (the steps table has them all)


def duration_text(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 0:
        seconds = 0.0
    if seconds == 0:
        return "0 ms"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600)} h"


def _stamp(when: datetime) -> str:
    return f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d}"


class _Axis:
    def __init__(self, start: datetime, end: datetime) -> None:
        self.start = start
        self.span = max((end - start).total_seconds(), 0.001)

    def at(self, when: datetime) -> float:
        return min(max((when - self.start).total_seconds() / self.span, 0.0), 1.0)

    def segment(self, kind: str, begin: datetime, end: datetime, what: str,
                label: str = "") -> Segment:
        x0, x1 = self.at(begin), self.at(max(end, begin))
        width = max(x1 - x0, MIN_WIDTH)
        x0 = min(x0, 1.0 - width)
        title = f"{what}: {_stamp(begin)} to {_stamp(end)} UTC ({duration_text(end - begin)})"
        return Segment(kind, x0, width, title, label)


def build(run: models.Run, attempts: dict[int, list[dict[str, Any]]], now: datetime,
          waits: list[dict[str, Any]] | None = None) -> Timeline:
    """The timeline of ``run``; ``attempts`` are its failed attempts by step seq."""
    end = run.finished_at or max(now, run.created_at)
    axis = _Axis(run.created_at, end)
    lanes = [_run_lane(run, axis, end)]
    retry_due = {w["seq"]: w["due_at"] for w in waits or [] if w["kind"] == "retry"}
    steps = run.steps
    hidden = max(len(steps) - MAX_LANES, 0)
    if hidden:
        steps = steps[:MAX_LANES // 2] + steps[-(MAX_LANES // 2):]
    for i, step in enumerate(steps):
        if hidden and i == MAX_LANES // 2:
            lanes.append(Lane(f"... {hidden} entries not drawn"))
        lanes.append(_step_lane(step, attempts.get(step.seq, []), axis, end, retry_due))
    ticks = [(i / 4, "+" + duration_text(timedelta(seconds=axis.span * i / 4))) for i in range(5)]
    return Timeline(run.created_at, end, lanes, ticks, hidden)


def _run_lane(run: models.Run, axis: _Axis, end: datetime) -> Lane:
    lane = Lane(f"run ({run.status})")
    claimed = run.started_at or end
    lane.segments.append(axis.segment("queued", run.created_at, claimed,
                                      "queued before its first claim", "queued"))
    if run.started_at is not None:
        kind = {"completed": "ok", "failed": "failed", "cancelled": "cancelled",
                "running": "run", "sleeping": "sleep", "waiting": "wait",
                "pending": "queued"}.get(run.status, "run")
        until = "its end" if run.finished else f"now ({run.status})"
        lane.segments.append(axis.segment(kind, run.started_at, end,
                                          f"from its first claim to {until}", run.status))
    return lane


def _step_lane(step: models.StepRecord, failed: list[dict[str, Any]], axis: _Axis,
               end: datetime, retry_due: dict[int, datetime]) -> Lane:
    lane = Lane(f"{step.seq} {step.name}"
                + ("" if step.kind in ("step", step.name) else f" ({step.kind})"))
    started = step.started_at or end
    finished = step.finished_at or end
    if step.kind == "step":
        previous_end: datetime | None = None
        for a in failed:
            if previous_end is not None and a["started_at"] > previous_end:
                lane.segments.append(axis.segment("backoff", previous_end, a["started_at"],
                                                  "retry back-off", "back-off"))
            error = a["error"] or {}
            lane.segments.append(axis.segment(
                "failed", a["started_at"], a["finished_at"],
                f"attempt {a['attempt']} failed ({error.get('type')}: "
                f"{str(error.get('message'))[:200]})", f"attempt {a['attempt']}"))
            previous_end = a["finished_at"]
        if step.status == "completed":
            if previous_end is not None and started > previous_end:
                lane.segments.append(axis.segment("backoff", previous_end, started,
                                                  "retry back-off", "back-off"))
            lane.segments.append(axis.segment("ok", started, finished,
                                              f"attempt {step.attempts} succeeded",
                                              f"attempt {step.attempts}"))
        elif step.status == "retrying":
            since = previous_end or finished
            due = retry_due.get(step.seq)
            lane.segments.append(axis.segment(
                "backoff", since, end,
                "retry back-off" + (f" until {_stamp(due)} UTC" if due else ""), "back-off"))
        elif not failed:  # failed or cancelled with no attempt recorded
            lane.segments.append(axis.segment("failed" if step.status == "failed" else "cancelled",
                                              started, finished, step.status, step.status))
        return lane
    if step.open:  # waiting / sleeping now: finished_at holds its deadline, not its end
        what = _wait_reason(step)
        deadline = step.waits_until
        title = what + (f" (until {_stamp(deadline)} UTC)" if deadline else "")
        lane.segments.append(axis.segment("sleep" if step.kind == "sleep" else "wait",
                                          started, end, title + ", still open", what))
        return lane
    if finished <= started:
        lane.segments.append(axis.segment("instant", started, started,
                                          f"{step.kind} recorded", ""))
        return lane
    kind = "sleep" if step.kind == "sleep" else "wait"
    what = _wait_reason(step)
    lane.segments.append(axis.segment(kind, started, finished, what, what))
    return lane


def _wait_reason(step: models.StepRecord) -> str:
    if step.kind == "sleep":
        return "sleep"
    if step.kind == "signal":
        return f"waiting for signal {step.name}"
    if step.kind == "map":
        return "waiting for map items"
    if step.kind == "child":
        return "waiting for a child run"
    return f"{step.kind} {step.status}"
