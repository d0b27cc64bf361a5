"""A retry policy means what it says: a stated interval is never silently shortened."""

from __future__ import annotations

from datetime import timedelta

import pytest

import pgflow
from pgflow.retry import DEFAULT_MAX_INTERVAL
from tests import sqlkit
from tests.helpers import wait_for
from tests.workflows.effects import record

DAY = timedelta(days=1)


def test_a_long_initial_interval_raises_the_default_cap():
    policy = pgflow.Retry(initial_interval=DAY, backoff=1.0)
    assert policy.max_interval == DAY
    assert pgflow.Retry(initial_interval=DAY).max_interval == DAY
    assert pgflow.Retry().max_interval == DEFAULT_MAX_INTERVAL == timedelta(seconds=60)
    assert pgflow.Retry(initial_interval=5).max_interval == timedelta(seconds=60)


def test_an_explicit_cap_below_the_initial_interval_is_refused():
    with pytest.raises(ValueError, match=r"max_interval .* is shorter than initial_interval"):
        pgflow.Retry(initial_interval=DAY, max_interval=timedelta(minutes=1))
    assert pgflow.Retry(initial_interval=DAY, max_interval=DAY).max_interval == DAY
    assert pgflow.Retry(initial_interval=1, max_interval=600).max_interval == timedelta(minutes=10)


@pgflow.step(retry=pgflow.Retry(initial_interval=DAY, backoff=1.0))
def daily_attempt(run_id: str) -> str:
    if record(run_id, "daily_attempt") == 1:
        raise RuntimeError("not yet")
    return "done"


@pgflow.workflow(name="daily_retry")
def daily_retry(ctx: pgflow.Context) -> str:
    return daily_attempt(str(ctx.workflow_id))


def test_the_back_off_timer_waits_the_stated_day(conn, effects, inprocess_worker):
    inprocess_worker.start([daily_retry])
    run_id = pgflow.start(conn, daily_retry)
    wait_for(lambda: sqlkit.timer_rows(conn, run_id), what="the retry timer")
    [timer] = sqlkit.timer_rows(conn, run_id)
    waits = timer["due_at"] - sqlkit.engine_now(conn)
    assert timedelta(hours=23) < waits <= DAY
    sqlkit.advance_time(conn, DAY)
    assert pgflow.result(conn, run_id, timeout=30) == "done"
