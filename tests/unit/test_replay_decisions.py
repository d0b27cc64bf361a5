"""Replay decisions, without a database: recorded results come back, a diverged call is caught.

The worker's own engine (:mod:`pgflow.replay`) is driven through the replay
check's session, which stops at the first durable call that would act for real.
"""

from __future__ import annotations

import uuid
from typing import Any

import pgflow
from pgflow.journal import JournalEntry
from pgflow.replaycheck import ReplayCheck, _replay


@pgflow.step
def reserve(order: str) -> str:
    raise AssertionError("a replayed step must not run")


@pgflow.step
def charge(order: str, cents: int) -> str:
    raise AssertionError("a replayed step must not run")


@pgflow.workflow(name="unit_replay_order")
def order_flow(ctx: pgflow.Context, order: str, cents: int) -> dict[str, Any]:
    hold = reserve(order)
    ctx.sleep(60)
    receipt = charge(order, cents)
    return {"hold": hold, "receipt": receipt}


def step(seq: int, name: str, output: Any, kind: str = "step") -> JournalEntry:
    return JournalEntry(seq, name, kind, "completed", 1, output, None)


def replay(journal: list[JournalEntry]) -> ReplayCheck:
    return _replay(uuid.uuid4(), order_flow, ["o-1", 4200], journal)


def test_a_complete_journal_replays_to_the_end_without_running_anything():
    done = replay([step(0, "reserve", "h-1"), step(1, "sleep", None, "sleep"),
                   step(2, "charge", "r-1")])
    assert done.ok and done.replayed == 3 and done.journal == 3
    assert done.next_call is None  # the workflow returned from recorded results alone


def test_a_partial_journal_stops_at_the_first_call_that_would_act():
    halfway = replay([step(0, "reserve", "h-1")])
    assert halfway.ok and halfway.replayed == 1
    assert halfway.next_call == "durable call #1"   # the sleep would be taken for real


def test_code_that_asks_for_another_call_than_the_journal_is_non_deterministic():
    diverged = replay([step(0, "charge", "r-1")])
    assert not diverged.ok
    assert "durable call #0" in diverged.error and "'reserve'" in diverged.error
    assert "'charge'" in diverged.error


def test_a_journal_longer_than_the_code_is_reported():
    longer = replay([step(0, "reserve", "h-1"), step(1, "sleep", None, "sleep"),
                     step(2, "charge", "r-1"), step(3, "refund", "x")])
    assert not longer.ok
    assert "returned after 3 durable calls but the journal holds 4" in longer.error
