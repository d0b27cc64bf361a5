"""W4, W4a and W4b: durable timers, how late sleeping runs resume.

W4 puts 2,000 `def` sleepers to sleep for 2 s while the worker runs, W4a the same written
``async def``; W4b puts 10,000 to sleep and restarts the worker before any is due, then checks
that every run completed exactly once. All lateness figures use engine timestamps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import psycopg

import pgflow
from bench import workflows
from bench.harness import (
    WORKER_CONCURRENCY,
    Bench,
    CpuMeter,
    db_work,
    line,
    log,
    percentile,
    producer,
    read_stats,
    reset,
    stop_process,
    wait_asleep,
    wait_finished,
    worker_process,
)

W4_RUNS = 2000  # W4: sleeper runs (ctx.sleep, then one step) started while the worker runs
W4_SLEEP_S = 2.0  # W4: each run's sleep
W4_START_BATCH = 500  # W4: runs started per producer transaction
W4B_RUNS = 10000  # W4b: sleeper runs asleep at once, across a worker restart
# W4b: each run's sleep. It must outlast putting all runs to sleep (11 to 22 s for 10,000 on
# the 2-core development machine, 450-900 runs/s) plus the restart, or no instant has them all
# asleep with none due; the workload fails rather than measure something else.
W4B_SLEEP_S = 30.0
W4B_SLEEP_S_QUICK = 5.0  # with --quick (1,000 runs, asleep in about 2 s)
W4B_START_BATCH = 1000  # W4b: runs started per producer transaction
W4B_RESTART_MARGIN_S = 0.5  # W4b fails unless the new worker is up this long before the first timer


def produce_sleepers(dsn: str, n: int, seconds: float, batch: int,
                     workflow: str = "sleeper") -> float:
    """Producer for W4/W4a/W4b: ``n`` runs of ``workflow`` (``sleeper`` or ``async_sleeper``),
    ``batch`` per transaction; returns seconds."""
    defined = getattr(workflows, workflow)
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        for i in range(n):
            pgflow.start(conn, defined, i, seconds)
            if (i + 1) % batch == 0:
                conn.commit()
        conn.commit()
        return time.perf_counter() - started


@dataclass
class Lateness:
    """Timer figures of sleeper runs, all from engine timestamps (pgflow.now())."""

    n: int  # runs whose sleep fired and whose step after it is recorded
    seconds: float  # max(runs.finished_at) - min(runs.created_at)
    park_s: float  # max(sleep entry started_at) - min(runs.created_at): until all were asleep
    fire_ms: list[float]  # sleep entry finished_at (fire_timers' now) - its 'until'
    resume_ms: list[float]  # started_at of the step after the sleep - 'until'
    fires: int  # distinct fire instants: fire_timers statements that fired at least one timer
    max_batch: int  # most timers fired by one fire_timers statement
    due_span_s: float  # last 'until' - first 'until': timers came due at n / this
    resume_span_s: float  # max(runs.finished_at) - first 'until': the runs finished at n / this

    def figures(self) -> dict[str, Any]:
        after = [r - f for r, f in zip(self.resume_ms, self.fire_ms, strict=True)]
        return {
            "fire_p50_ms": round(percentile(self.fire_ms, 0.50), 2),
            "fire_p99_ms": round(percentile(self.fire_ms, 0.99), 2),
            "fire_max_ms": round(max(self.fire_ms), 2),
            "resume_max_ms": round(max(self.resume_ms), 2),
            # Fired to step started: commit, NOTIFY, claim, replay.
            "fire_to_step_p50_ms": round(percentile(after, 0.50), 2),
            "fire_to_step_p99_ms": round(percentile(after, 0.99), 2),
            "fires": self.fires,
            "max_fire_batch": self.max_batch,
            "park_s": round(self.park_s, 3),
            "due_per_sec": round(self.n / self.due_span_s, 1),
            "resumed_per_sec": round(self.n / self.resume_span_s, 1),
        }


def lateness(conn: psycopg.Connection[Any]) -> Lateness:
    rows = conn.execute(
        "select extract(epoch from sl.finished_at - u.until)::float8 * 1000,"
        " extract(epoch from st.started_at - u.until)::float8 * 1000, sl.finished_at"
        " from pgflow.steps sl"
        " cross join lateral (select (sl.output ->> 'until')::timestamptz as until) u"
        " join pgflow.steps st on st.run_id = sl.run_id and st.seq = sl.seq + 1"
        " where sl.kind = 'sleep' and sl.status = 'completed' and st.kind = 'step'").fetchall()
    row = conn.execute(
        "select extract(epoch from max(r.finished_at) - min(r.created_at))::float8,"
        " extract(epoch from (select max(s.started_at) from pgflow.steps s where s.kind = 'sleep')"
        "                    - min(r.created_at))::float8,"
        " extract(epoch from max(u.until) - min(u.until))::float8,"
        " extract(epoch from max(r.finished_at) - min(u.until))::float8"
        " from pgflow.runs r, lateral (select (s.output ->> 'until')::timestamptz as until"
        "                             from pgflow.steps s where s.run_id = r.id and s.kind = 'sleep') u"
        ).fetchone()
    assert row is not None and rows
    batches: dict[Any, int] = {}
    for _, _, fired_at in rows:
        batches[fired_at] = batches.get(fired_at, 0) + 1
    return Lateness(len(rows), float(row[0]), float(row[1]), [r[0] for r in rows],
                    [r[1] for r in rows], len(batches), max(batches.values()), float(row[2]),
                    float(row[3]))


def exactly_once(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Per-run journal counts that must all hold for every run to have completed exactly once."""
    row = conn.execute(
        "select count(*), count(*) filter (where r.status = 'completed'),"
        " count(*) filter (where j.steps <> 1), count(*) filter (where j.sleeps <> 1),"
        " count(*) filter (where j.attempts <> 1),"
        " (select count(*) from pgflow.timers)"
        " from pgflow.runs r cross join lateral ("
        "   select count(*) filter (where s.kind = 'step') as steps,"
        "          count(*) filter (where s.kind = 'sleep') as sleeps,"
        "          coalesce(sum(s.attempts) filter (where s.kind = 'step'), 0) as attempts"
        "   from pgflow.steps s where s.run_id = r.id) j").fetchone()
    assert row is not None
    keys = ("runs", "runs_completed", "runs_without_exactly_one_step", "runs_without_exactly_one_sleep",
            "runs_with_step_attempts_not_1", "timers_left")
    return dict(zip(keys, (int(v) for v in row), strict=True))


def w4_timers(b: Bench) -> list[dict[str, Any]]:
    """A running worker; sleeper runs (2 s sleep, one step) started in a few transactions."""
    return _timers(b, "W4_timers", "sleeper")


def w4a_async_timers(b: Bench) -> list[dict[str, Any]]:
    """W4 with the workflow and its step written ``async def``: no thread per run."""
    return _timers(b, "W4a_async_timers", "async_sleeper")


def _timers(b: Bench, workload: str, workflow: str) -> list[dict[str, Any]]:
    n = b.count(W4_RUNS)
    batches = math.ceil(n / W4_START_BATCH)
    reset(b.dsn)
    before = read_stats(b.dsn)
    log(f"{workload}: worker -c {WORKER_CONCURRENCY}, producer starts {n} {workflow} runs"
        f" ({W4_SLEEP_S:g} s sleep) in {batches} transaction(s)")
    with worker_process(b, workload.split("_")[0].lower()) as worker, producer() as pool, \
            psycopg.connect(b.dsn, autocommit=True) as conn:
        meter = CpuMeter(worker.pid, conn)
        future = pool.submit(produce_sleepers, b.dsn, n, W4_SLEEP_S, W4_START_BATCH, workflow)
        polls = wait_finished(conn, n, worker, future)
        future.result()
        cpu = meter.report(conn, n)
        t = lateness(conn)
        check = exactly_once(conn)
    work = db_work(read_stats(b.dsn).minus(before), n, polls, producer_commits=batches, timers=True)
    return [line(workload, t.n, t.seconds, t.n / t.seconds,
                 percentile(t.resume_ms, 0.50), percentile(t.resume_ms, 0.99), **t.figures(),
                 sleep_s=W4_SLEEP_S, concurrency=WORKER_CONCURRENCY,
                 failed=check["runs"] - check["runs_completed"], **cpu, **work)]


def w4b_many_sleepers(b: Bench) -> list[dict[str, Any]]:
    """10,000 runs asleep at once; the worker is SIGTERMed and restarted before any is due.

    Then every run must have completed exactly once: one step entry (one attempt) and one
    fired sleep each, no timer left.
    """
    n = b.count(W4B_RUNS)
    sleep_s = W4B_SLEEP_S_QUICK if b.quick else W4B_SLEEP_S
    batches = math.ceil(n / W4B_START_BATCH)
    reset(b.dsn)
    before = read_stats(b.dsn)
    log(f"W4b: producer starts {n} sleeper runs ({sleep_s:g} s sleep) in {batches}"
        " transaction(s); worker restarted while they all sleep")
    with producer() as pool, psycopg.connect(b.dsn, autocommit=True) as conn:
        with worker_process(b, "w4b-first") as first:
            future = pool.submit(produce_sleepers, b.dsn, n, sleep_s, W4B_START_BATCH)
            polls = wait_asleep(conn, n, first, future)
            future.result()
            due_in = _first_due_in(conn)
            if due_in < W4B_RESTART_MARGIN_S:
                raise RuntimeError(f"the first timer is due in {due_in:.2f}s, no time left to restart"
                                   f" the worker before it: raise W4B_SLEEP_S{'_QUICK' if b.quick else ''}")
            stopped = time.monotonic()
            log(f"W4b: all {n} asleep, first due in {due_in:.2f}s: SIGTERM to worker {first.pid}")
            stop_process(first)  # drains: nothing is in flight, so it exits at once
        first_rc = first.returncode
        with worker_process(b, "w4b-second") as second:
            restart_s = time.monotonic() - stopped
            due_after_restart = _first_due_in(conn)
            log(f"W4b: worker {second.pid} registered {restart_s:.2f}s after the SIGTERM,"
                f" first timer due in {due_after_restart:.2f}s")
            if due_after_restart < W4B_RESTART_MARGIN_S:
                raise RuntimeError(f"the new worker came up {due_after_restart:.2f}s before the first"
                                   " timer: not a restart in the middle of the sleep")
            meter = CpuMeter(second.pid, conn)
            polls += wait_finished(conn, n, second)
            cpu = meter.report(conn, n)
            t = lateness(conn)
            check = exactly_once(conn)
    work = db_work(read_stats(b.dsn).minus(before), n, polls, producer_commits=batches, timers=True)
    problems = {k: v for k, v in check.items()
                if v != (n if k in ("runs", "runs_completed") else 0)}
    if problems or t.n != n:
        raise RuntimeError(f"not every run completed exactly once: {check}, {t.n} with a fired sleep")
    return [line("W4b_many_sleepers", t.n, t.seconds, t.n / t.seconds,
                 percentile(t.resume_ms, 0.50), percentile(t.resume_ms, 0.99), **t.figures(),
                 sleep_s=sleep_s, concurrency=WORKER_CONCURRENCY, restarted=True,
                 first_worker_exit=first_rc, restart_s=round(restart_s, 3),
                 first_due_in_s_at_sigterm=round(due_in, 3),
                 first_due_in_s_after_restart=round(due_after_restart, 3),
                 completed_exactly_once=True, **check,
                 cpu_after_restart=cpu, **work)]


def _first_due_in(conn: psycopg.Connection[Any]) -> float:
    """Seconds until the earliest timer (engine clock); inf when there is none."""
    row = conn.execute("select extract(epoch from min(due_at) - pgflow.now())::float8"
                       " from pgflow.timers").fetchone()
    return math.inf if row is None or row[0] is None else float(row[0])
