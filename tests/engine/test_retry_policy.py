"""A retry policy means what it says: a stated interval is never silently shortened."""

from __future__ import annotations

from datetime import timedelta

import pgflow
from tests.support import sqlkit
from tests.support.helpers import wait_for
from tests.support.workflows.effects import record

DAY = timedelta(days=1)


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
