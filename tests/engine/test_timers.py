"""Durable time with a real worker and the real clock: back-off, timeouts, sleeps, retry."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
import uuid

import pytest

import pgflow
from pgflow.testing import advance_time
from tests.support.helpers import backoffs, log_timers, wait_for, wait_status
from tests.support.workflows.effects import executions, record

BACKOFF = pgflow.Retry(max_attempts=4, initial_interval=0.3, backoff=2.0, max_interval=10)


@pgflow.step(retry=BACKOFF)
def fails_three_times(run_id: str) -> str:
    attempt = record(run_id, "fails_three_times")
    if attempt <= 3:
        raise ConnectionError(f"attempt {attempt} failed")
    return f"ok on attempt {attempt}"


@pgflow.workflow(name="timers_backoff")
def backoff_flow(ctx: pgflow.Context) -> str:
    return fails_three_times(str(ctx.workflow_id))


@pytest.mark.slow
def test_back_off_gaps_double_and_every_attempt_is_kept(conn, effects, inprocess_worker):
    log_timers(conn)
    inprocess_worker.start([backoff_flow])
    run_id = pgflow.start(conn, backoff_flow)
    assert pgflow.result(conn, run_id, timeout=60) == "ok on attempt 4"

    times = [r[0] for r in conn.execute(
        "select at from public.effects where run_id = %s order by at", (str(run_id),))]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    print("attempt gaps (s):", [round(g, 3) for g in gaps])
    # The back-off the engine set doubles each time (exactly: read from the retry timers,
    # not from how soon a busy worker came back), and no attempt came before its time.
    retries = backoffs(conn, run_id)
    assert [(b.attempt, round(b.delay.total_seconds(), 3)) for b in retries] == [
        (1, 0.3), (2, 0.6), (3, 1.2)]
    for retry, next_attempt in zip(retries, times[1:], strict=True):
        assert next_attempt >= retry.due, (retry, next_attempt)
    attempts = conn.execute(
        "select attempt, error ->> 'type', error ->> 'message', error ->> 'traceback' like"
        " 'Traceback%%' from pgflow.step_attempts where run_id = %s order by attempt",
        (run_id,)).fetchall()
    assert attempts == [(n, "ConnectionError", f"attempt {n} failed", True) for n in (1, 2, 3)]
    step = pgflow.get(conn, run_id).steps[0]
    assert (step.status, step.attempts) == ("completed", 4)


# An attempt that overruns is retried: the first attempt of each step below always
# overruns (it outlives its attempt on purpose); a later one may too on a busy machine,
# which is retried the same way, so there are attempts to spare.
SLOW_ONCE = pgflow.Retry(max_attempts=10, initial_interval=0.05)
LATE_FOR = 60.0  # seconds the first attempt waits at most for its successor to begin


@pgflow.step(timeout=0.3, retry=SLOW_ONCE)
def slow_the_first_time(run_id: str) -> str:
    if record(run_id, "slow_the_first_time") == 1:
        # A thread cannot be stopped: it returns, late, once the next attempt has begun.
        wait_for(lambda: executions(run_id, "slow_the_first_time") > 1, timeout=LATE_FOR,
                 what="the next attempt")
        record(run_id, "first attempt ended")
        return "late"
    return "in time"


@pgflow.step(timeout=0.3, retry=SLOW_ONCE)
async def async_slow_the_first_time(run_id: str) -> str:
    if record(run_id, "async_slow_the_first_time") == 1:
        try:  # cancelled at its timeout; were it not, it would return late
            deadline = time.monotonic() + LATE_FOR
            while executions(run_id, "async_slow_the_first_time") == 1 \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return "late"
        finally:
            record(run_id, "first attempt ended")
    return "in time"


@pgflow.workflow(name="timers_timeouts")
def timeouts_flow(ctx: pgflow.Context) -> list[str]:
    run_id = str(ctx.workflow_id)
    return [slow_the_first_time(run_id), async_slow_the_first_time(run_id)]


@pgflow.workflow(name="timers_timeouts_async")
async def timeouts_flow_async(ctx: pgflow.Context) -> list[str]:
    run_id = str(ctx.workflow_id)
    return [await slow_the_first_time(run_id), await async_slow_the_first_time(run_id)]


@pytest.mark.parametrize("flow", [timeouts_flow, timeouts_flow_async], ids=["def", "async"])
def test_an_attempt_that_overruns_counts_as_failed_and_its_late_result_is_discarded(
        conn, effects, inprocess_worker, flow):
    inprocess_worker.start([flow])
    run_id = pgflow.start(conn, flow)
    assert pgflow.result(conn, run_id, timeout=60) == ["in time", "in time"]
    # the first attempts are over (the thread returned "late", the coroutine was cancelled)
    wait_for(lambda: effects.count(run_id, "first attempt ended") == 2, timeout=60,
             what="the first attempts to end")
    steps = pgflow.get(conn, run_id).steps
    assert [(s.status, s.output) for s in steps] == [("completed", "in time")] * 2
    # every attempt before the last overran and was recorded failed: the first one always
    failed = conn.execute(
        "select seq, array_agg(error ->> 'type' order by attempt) from pgflow.step_attempts"
        " where run_id = %s group by seq order by seq", (run_id,)).fetchall()
    assert [seq for seq, _ in failed] == [0, 1]
    for step, (_, types) in zip(steps, failed, strict=True):
        assert types == ["pgflow.errors.StepTimeout"] * len(types)
        assert step.attempts == len(types) + 1


@pgflow.step(retry=pgflow.Retry(max_attempts=2, initial_interval=0.05))
def fails_once_with(run_id: str, values: list) -> list:
    record(run_id, f"fails_once_with {values}")
    if record(run_id, "fails_once") == 1:
        raise RuntimeError("once")
    return values


@pgflow.workflow(name="timers_values")
def values_flow(ctx: pgflow.Context) -> dict:
    now, ident, rnd = ctx.now(), ctx.uuid4(), ctx.random()
    assert isinstance(now, dt.datetime) and isinstance(ident, uuid.UUID)
    # the retry replays this function: the three values must come back identical
    fails_once_with(str(ctx.workflow_id), [now.isoformat(), str(ident), rnd])
    return {"now": now.isoformat(), "uuid": str(ident), "random": rnd}


def test_now_uuid_and_random_are_recorded_once(conn, effects, inprocess_worker):
    advance_time(conn, dt.timedelta(days=30))
    inprocess_worker.start([values_flow])
    run_id = pgflow.start(conn, values_flow)
    out = pgflow.result(conn, run_id, timeout=60)
    calls = conn.execute("select step from public.effects where run_id = %s"
                         " and step like 'fails_once_with%%'", (str(run_id),)).fetchall()
    assert len(calls) == 2 and calls[0] == calls[1]  # both attempts saw the same values
    recorded = dt.datetime.fromisoformat(out["now"])
    db_now = conn.execute("select pgflow.now()").fetchone()[0]
    assert abs((db_now - recorded).total_seconds()) < 60  # the engine clock, offset included
    assert [s.kind for s in pgflow.get(conn, run_id).steps] == ["now", "uuid4", "random", "step"]


@pgflow.step
def mark(run_id: str, label: str) -> str:
    record(run_id, label)
    return label


@pgflow.workflow(name="timers_sleepy")
def sleepy(ctx: pgflow.Context, seconds: float) -> list[str]:
    run_id = str(ctx.workflow_id)
    ctx.sleep(0)  # due at once: recorded, nothing suspended
    before = mark(run_id, "before")
    ctx.sleep(seconds)
    return [before, mark(run_id, "after")]


@pgflow.workflow(name="timers_sleepy_async")
async def sleepy_async(ctx: pgflow.Context, until: dt.datetime) -> str:
    await ctx.sleep_until(until)
    return await mark(str(ctx.workflow_id), "after")


def test_a_sleeping_run_holds_no_worker_and_wakes_on_time(conn, effects, inprocess_worker):
    inprocess_worker.start([sleepy, sleepy_async], concurrency=1)
    long_nap = pgflow.start(conn, sleepy, 3600)
    short_nap = pgflow.start(conn, sleepy, 0.5)
    wait_status(conn, long_nap, "sleeping")
    # concurrency is 1: the short nap runs although the long one has not finished
    assert pgflow.result(conn, short_nap, timeout=60) == ["before", "after"]
    waits = conn.execute("select kind, step, due_at - pgflow.now() > interval '59 minutes'"
                         " from pgflow.waits where run_id = %s", (long_nap,)).fetchall()
    assert waits == [("sleep", "sleep", True)]
    assert advance_time(conn, dt.timedelta(hours=1)) == 1
    assert pgflow.result(conn, long_nap, timeout=60) == ["before", "after"]
    assert effects.per_step(long_nap) == {"before": 1, "after": 1}

    until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.5)
    async_run = pgflow.start(conn, sleepy_async, until)
    assert pgflow.result(conn, async_run, timeout=60) == "after"
    woke = conn.execute("select finished_at from pgflow.steps where run_id = %s and seq = 0",
                        (async_run,)).fetchone()[0]
    assert woke >= until


def test_bad_durations_are_clear_errors(conn, inprocess_worker):
    ctx_errors: list[str] = []

    @pgflow.workflow(name="timers_bad_sleep")
    def bad(ctx: pgflow.Context) -> None:
        for call in (lambda: ctx.sleep(-1), lambda: ctx.sleep("1 day"),
                     lambda: ctx.sleep_until(dt.datetime(2030, 1, 1))):
            try:
                call()
            except (TypeError, ValueError) as exc:
                ctx_errors.append(type(exc).__name__)

    inprocess_worker.start([bad])
    pgflow.result(conn, pgflow.start(conn, bad), timeout=60)
    assert ctx_errors == ["ValueError", "TypeError", "TypeError"]
    with pytest.raises(ValueError, match="forward"):
        advance_time(conn, -1)


@pgflow.step(retry=pgflow.Retry(max_attempts=1))
def needs_flag(run_id: str) -> str:
    record(run_id, "needs_flag")
    from tests.support.workflows.effects import _conn
    if not _conn().execute("select exists (select 1 from public.flags)").fetchone()[0]:
        raise LookupError("no flag yet")
    return "flag found"


@pgflow.workflow(name="timers_retry")
def retry_flow(ctx: pgflow.Context) -> list[str]:
    run_id = str(ctx.workflow_id)
    return [mark(run_id, "first"), needs_flag(run_id)]


def test_retry_resumes_a_failed_run_from_its_last_checkpoint(conn, effects, inprocess_worker):
    conn.execute("create table public.flags (flag text)")
    inprocess_worker.start([retry_flow])
    run_id = pgflow.start(conn, retry_flow)
    with pytest.raises(pgflow.WorkflowFailed, match="no flag yet"):
        pgflow.result(conn, run_id, timeout=60)
    with pytest.raises(pgflow.RunStateError):
        pgflow.retry(conn, pgflow.start(conn, retry_flow, key="still-pending"))

    conn.execute("insert into public.flags values ('set')")
    pgflow.retry(conn, run_id)
    assert pgflow.result(conn, run_id, timeout=60) == ["first", "flag found"]
    assert effects.per_step(run_id) == {"first": 1, "needs_flag": 2}
    assert conn.execute("select count(*) from pgflow.step_attempts where run_id = %s",
                        (run_id,)).fetchone()[0] == 1
    with pytest.raises(pgflow.RunStateError, match="only failed runs"):
        pgflow.retry(conn, run_id)
    with pytest.raises(pgflow.RunNotFound):
        pgflow.retry(conn, uuid.uuid4())


@pgflow.step
def takes_two_seconds(run_id: str) -> str:
    record(run_id, "takes_two_seconds")
    time.sleep(2)
    return "too late"


@pgflow.workflow(name="timers_deadline", timeout=dt.timedelta(hours=1))
def with_deadline(ctx: pgflow.Context) -> str:
    return takes_two_seconds(str(ctx.workflow_id))


@pytest.mark.slow
def test_a_run_that_outlives_its_timeout_fails_and_its_worker_is_fenced(conn, effects,
                                                                          inprocess_worker):
    inprocess_worker.start([with_deadline])
    run_id = pgflow.start(conn, with_deadline)
    wait_for(lambda: effects.count(run_id) == 1, what="the step running")
    assert advance_time(conn, dt.timedelta(hours=2)) == 1  # the deadline passes mid-step
    with pytest.raises(pgflow.WorkflowFailed) as info:
        pgflow.result(conn, run_id, timeout=60)
    assert info.value.error_type == "pgflow.errors.WorkflowTimeout"
    time.sleep(2.0)  # the step has returned by now: its checkpoint must have been refused
    run = pgflow.get(conn, run_id)
    assert run.status == "failed" and run.steps == []
    assert effects.count(run_id) == 1
    assert conn.execute("select count(*) from pgflow.timers").fetchone()[0] == 0


@pgflow.workflow(name="timers_long_deadline", timeout=dt.timedelta(hours=1))
def with_long_deadline(ctx: pgflow.Context) -> str:
    ctx.sleep(dt.timedelta(days=2))
    return "woke"


def test_a_sleeping_run_also_meets_its_deadline(conn, inprocess_worker):
    inprocess_worker.start([with_long_deadline])
    run_id = pgflow.start(conn, with_long_deadline)
    wait_status(conn, run_id, "sleeping")
    kinds = sorted(r[0] for r in conn.execute(
        "select kind from pgflow.waits where run_id = %s", (run_id,)))
    assert kinds == ["deadline", "sleep"]
    assert advance_time(conn, dt.timedelta(hours=2)) == 1
    with pytest.raises(pgflow.WorkflowFailed, match="WorkflowTimeout"):
        pgflow.result(conn, run_id, timeout=60)
    assert conn.execute("select count(*) from pgflow.timers").fetchone()[0] == 0


@pgflow.workflow(name="timers_in_time", timeout=60)
def in_time(ctx: pgflow.Context) -> str:
    return "done"


def test_a_run_finished_in_time_leaves_no_deadline_behind(conn, inprocess_worker):
    inprocess_worker.start([in_time])
    assert pgflow.result(conn, pgflow.start(conn, in_time), timeout=60) == "done"
    assert conn.execute("select count(*) from pgflow.timers").fetchone()[0] == 0
    # started by name, the registered timeout applies too
    by_name = pgflow.start(conn, "timers_in_time")
    assert conn.execute("select timeout from pgflow.runs where id = %s",
                        (by_name,)).fetchone()[0] == dt.timedelta(seconds=60)
