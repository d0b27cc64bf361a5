"""W6: schedule firing, 10,000 cron schedules due in the same minute among 100,000 that are not.

A running worker (its scheduler leader fires schedules); 10,000 `* * * * *` schedules of
``one_step`` whose first tick is the same minute boundary T, and 100,000 yearly ones that are
not due. The engine clock is set 1 s before T: the leader sleeps until T, as it would for the
wall-clock minute, then fires every tick. Figures from engine timestamps: each run's
``created_at`` - its ``scheduled_time`` (T), the last run created, the last one finished. The
leader's query for due schedules is EXPLAINed at T with and without the 100,000 idle ones,
and before T (nothing due).
"""

from __future__ import annotations

import re
import statistics
import time
from datetime import datetime, timedelta
from typing import Any

import psycopg

import pgflow
from bench import workflows
from bench.harness import (
    POLL_INTERVAL_S,
    RUNS_TIMEOUT_S,
    WORKER_CONCURRENCY,
    Bench,
    CpuMeter,
    db_work,
    line,
    log,
    percentile,
    read_stats,
    reset,
    wait_finished,
    worker_process,
)
from pgflow import ticker

W6_DUE = 10000  # W6: schedules whose first tick is the same instant T, fired by the leader
W6_IDLE = 100000  # W6: schedules present but not due (their next tick is next January 1st)
W6_DUE_CRON = "* * * * *"  # W6: the due schedules' cron (UTC): every minute
W6_IDLE_CRON = "0 0 1 1 *"  # W6: the idle schedules' cron (UTC): once a year
W6_DUE_PREFIX = "w6-due-"  # schedule ids: this plus a number
W6_IDLE_PREFIX = "w6-idle-"
# W6: schedules created per transaction. All 110,000 go through pgflow.create_schedule (two
# round trips and the function's checks each): 137 s on the quiet 2-core development machine.
W6_CREATE_BATCH = 1000
# W6: T, the due schedules' first tick (their start_at), is the minute boundary this far
# ahead of the engine clock when creation begins: creating them all takes less, so the leader
# fires none of them early, and no wall-clock minute boundary splits them into two ticks.
W6_TICK_AHEAD = timedelta(minutes=30)
# W6: the engine clock is set this long before T, once everything is created: the leader
# gets the clock's NOTIFY, finds T that far ahead and sleeps until it, as on a real minute.
W6_LEAD_S = 1.0
W6_PLAN_REPEATS = 5  # W6: EXPLAIN runs of the due query per case; the median time is kept
W6_PLAN_LIMIT = ticker.BATCH  # W6: the limit the leader passes to pgflow.due_schedules
# The procedures a tick goes through, outermost first (12_schedules.sql, 04_start.sql).
FIRE_CHAIN = ("fire_schedules", "_lock_schedule", "_fire_tick", "_schedule_busy", "_start_tick",
              "_start", "_check_input")

# Where the 10,000 runs stand, from engine timestamps; T is the tick of every due schedule.
FIGURES_SQL = """
select count(*),
       count(*) filter (where r.scheduled_time = %(t)s and r.schedule_id like %(due)s),
       count(distinct (r.schedule_id, r.scheduled_time)),
       count(*) filter (where r.schedule_id like %(idle)s),
       count(*) filter (where r.status <> 'completed'),
       extract(epoch from min(r.created_at) - %(t)s)::float8,
       extract(epoch from max(r.created_at) - %(t)s)::float8,
       extract(epoch from max(r.finished_at) - %(t)s)::float8,
       count(*) filter (where r.created_at < (select max(created_at) from pgflow.runs)),
       count(distinct r.created_at),
       (select max(c) from (select count(*) as c from pgflow.runs group by created_at) b)
from pgflow.runs r
"""
# The ticks recorded and the schedules moved on: every due one fired once and now waits for
# T + 1 minute; no idle one fired.
SCHEDULES_SQL = """
select (select count(*) from pgflow.schedule_ticks where outcome = 'started'),
       (select count(*) from pgflow.schedule_ticks where outcome <> 'started'),
       count(*) filter (where s.id like %(due)s and s.next_fire_at = %(t)s + interval '1 minute'
                          and s.handled_through = %(t)s),
       count(*) filter (where s.id like %(idle)s and s.last_fired_at is not null)
from pgflow.schedules s
"""


def create_through_api(dsn: str, prefix: str, n: int, cron: str,
                       start_at: datetime | None = None) -> float:
    """``n`` schedules through pgflow.create_schedule, W6_CREATE_BATCH a transaction; seconds.

    The due ones have ``start_at`` = T: whenever each is created, its first tick is T.
    """
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        for i in range(n):
            pgflow.create_schedule(conn, f"{prefix}{i}", workflows.one_step, args=(i,),
                                   cron=cron, timezone="UTC", start_at=start_at)
            if (i + 1) % W6_CREATE_BATCH == 0:
                conn.commit()
        conn.commit()
        return time.perf_counter() - started


def due_query(conn: psycopg.Connection[Any]) -> str:
    """The statement of pgflow.due_schedules as installed, its limit a parameter."""
    row = conn.execute("select prosrc from pg_catalog.pg_proc"
                       " where oid = 'pgflow.due_schedules'::regproc").fetchone()
    assert row is not None
    return re.sub(r"\bp_limit\b", "%(limit)s", row[0])


def due_plan(dsn: str, at: datetime) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the leader's due query with the engine clock at ``at``.

    The clock moves only inside a transaction that is rolled back (so the leader, which reads
    the committed clock, sees nothing due), with the rows the query locks. Each of
    W6_PLAN_REPEATS runs is its own transaction; the plan shape and buffers are the last
    run's, the times the median. ``call_*``: the same for ``select * from
    pgflow.due_schedules(limit)``, the function as the leader calls it.
    """
    runs: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    with psycopg.connect(dsn) as conn:
        query = due_query(conn)
        conn.rollback()
        for _ in range(W6_PLAN_REPEATS):
            for explained, out in ((query, runs), ("select * from pgflow.due_schedules(%(limit)s)", calls)):
                conn.execute("update pgflow.clock set offset_by = %s - statement_timestamp()", (at,))
                row = conn.execute("explain (analyze, buffers, format json) " + explained,
                                   {"limit": W6_PLAN_LIMIT}).fetchone()
                conn.rollback()
                assert row is not None
                out.append(row[0][0])
    plan = runs[-1]["Plan"]
    indexes: list[str] = []
    nodes_seen: list[str] = []
    nodes = [plan]
    while nodes:
        node = nodes.pop(0)
        nodes_seen.append(node["Node Type"])
        if "Index Name" in node and node["Index Name"] not in indexes:
            indexes.append(node["Index Name"])
        nodes.extend(node.get("Plans", []))
    call = calls[-1]["Plan"]
    return {"rows": plan["Actual Rows"], "nodes": nodes_seen, "indexes": indexes,
            "uses_schedules_due": "schedules_due" in indexes,
            "shared_hit": plan.get("Shared Hit Blocks", 0),
            "shared_read": plan.get("Shared Read Blocks", 0),
            "shared_dirtied": plan.get("Shared Dirtied Blocks", 0),
            "execution_ms": round(statistics.median(r["Execution Time"] for r in runs), 3),
            "planning_ms": round(statistics.median(r["Planning Time"] for r in runs), 3),
            "call_rows": call["Actual Rows"],
            "call_shared_hit": call.get("Shared Hit Blocks", 0),
            "call_shared_read": call.get("Shared Read Blocks", 0),
            "call_execution_ms": round(statistics.median(c["Execution Time"] for c in calls), 3)}


def analyze_schedules(dsn: str) -> None:
    """As autovacuum would after a bulk change (it is off on the development server)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("vacuum analyze pgflow.schedules")


def wait_created(conn: psycopg.Connection[Any], n: int, worker: Any) -> tuple[float, int]:
    """Poll until ``n`` runs exist; (time.perf_counter() then, polls)."""
    deadline = time.monotonic() + RUNS_TIMEOUT_S
    polls = 0
    while True:
        row = conn.execute("select count(*) from pgflow.runs").fetchone()
        polls += 1
        if row and row[0] >= n:
            return time.perf_counter(), polls
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode} after {row and row[0]} runs")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {row and row[0]} of {n} runs created in {RUNS_TIMEOUT_S}s")
        time.sleep(POLL_INTERVAL_S)


def w6_schedules(b: Bench) -> list[dict[str, Any]]:
    """10,000 schedules due at the same minute among 100,000 that are not, fired by the leader."""
    n, idle = b.count(W6_DUE), b.count(W6_IDLE)
    reset(b.dsn)
    try:
        return [_schedules(b, n, idle)]
    finally:
        # Whatever happened: no schedule fires during a later workload, the clock is real again.
        reset(b.dsn)


def _schedules(b: Bench, n: int, idle: int) -> dict[str, Any]:
    log(f"W6: worker -c {WORKER_CONCURRENCY}; {n} schedules '{W6_DUE_CRON}' due at the same"
        f" minute, {idle} '{W6_IDLE_CRON}' not due")
    with worker_process(b, "w6") as worker:  # it registers one_step: create_schedule needs it
        with psycopg.connect(b.dsn, autocommit=True) as conn:
            row = conn.execute("select date_trunc('minute', pgflow.now()) + %s",
                               (W6_TICK_AHEAD,)).fetchone()
        assert row is not None
        tick: datetime = row[0]
        create_due_s = create_through_api(b.dsn, W6_DUE_PREFIX, n, W6_DUE_CRON, tick)
        log(f"W6: {n} due schedules created through pgflow.create_schedule in {create_due_s:.1f}s"
            f" ({n / create_due_s:,.0f}/s); first tick {tick:%H:%M:%S} engine time")
        analyze_schedules(b.dsn)
        plan_no_idle = due_plan(b.dsn, tick)
        create_idle_s = create_through_api(b.dsn, W6_IDLE_PREFIX, idle, W6_IDLE_CRON)
        log(f"W6: {idle} idle schedules created in {create_idle_s:.1f}s ({idle / create_idle_s:,.0f}/s)")
        analyze_schedules(b.dsn)
        plan_idle = due_plan(b.dsn, tick)
        with psycopg.connect(b.dsn, autocommit=True) as conn:
            row = conn.execute("select pgflow.now()").fetchone()
        assert row is not None
        plan_nothing_due = due_plan(b.dsn, row[0])  # what every wake-up of the leader pays
        log(f"W6: due query at T: {plan_idle['execution_ms']} ms, {plan_idle['shared_hit']} buffers"
            f" with {idle} idle; {plan_no_idle['execution_ms']} ms, {plan_no_idle['shared_hit']}"
            f" buffers with none; nothing due: {plan_nothing_due['execution_ms']} ms,"
            f" {plan_nothing_due['shared_hit']} buffers; indexes {plan_idle['indexes']}")
        if not plan_idle["uses_schedules_due"]:
            raise RuntimeError(f"the due query does not use index schedules_due: {plan_idle}")
        before = read_stats(b.dsn)
        with psycopg.connect(b.dsn, autocommit=True) as conn:
            meter = CpuMeter(worker.pid, conn)
            row = conn.execute("select extract(epoch from %s - pgflow.now())::float8",
                               (tick,)).fetchone()
            assert row is not None
            if row[0] < W6_LEAD_S + 1:
                raise RuntimeError(f"creating the schedules took until {row[0]:.1f}s before their"
                                   " tick: raise W6_TICK_AHEAD")
            conn.execute("select pgflow.reset_time(%s - %s * interval '1 second'"
                         " - statement_timestamp())", (tick, W6_LEAD_S))
            row = conn.execute("select extract(epoch from %s - pgflow.now())::float8",
                               (tick,)).fetchone()
            assert row is not None
            tick_at = time.perf_counter() + row[0]  # T on this process's clock
            log(f"W6: engine clock set {row[0]:.3f}s before the tick; the leader fires it")
            created_at, polls = wait_created(conn, n, worker)
            polls += wait_finished(conn, n, worker)
            cpu = meter.report(conn, n)
    delta = read_stats(b.dsn).minus(before)
    with psycopg.connect(b.dsn, autocommit=True) as conn:  # after the reading: not in the stats
        params = {"t": tick, "due": W6_DUE_PREFIX + "%", "idle": W6_IDLE_PREFIX + "%"}
        row = conn.execute(FIGURES_SQL, params).fetchone()
        lag_ms = [r[0] for r in conn.execute(
            "select extract(epoch from created_at - scheduled_time)::float8 * 1000"
            " from pgflow.runs where scheduled_time is not null").fetchall()]
        ticks = conn.execute(SCHEDULES_SQL, params).fetchone()
        sizes = conn.execute("select pg_total_relation_size('pgflow.schedules'),"
                             " pg_relation_size('pgflow.schedules_due')").fetchone()
    assert row is not None and ticks is not None and sizes is not None and lag_ms
    (runs, runs_at_tick, distinct_ticks, idle_runs, not_completed, first_s, last_s, completed_s,
     before_last_batch, fire_batches, max_batch) = row
    check = {"runs": runs, "runs_of_due_schedules_at_t": runs_at_tick,
             "distinct_schedule_ticks": distinct_ticks, "runs_of_idle_schedules": idle_runs,
             "runs_not_completed": not_completed, "ticks_started": ticks[0],
             "ticks_other": ticks[1], "due_schedules_moved_on": ticks[2],
             "idle_schedules_fired": ticks[3]}
    expected = {k: n if k in ("runs", "runs_of_due_schedules_at_t", "distinct_schedule_ticks",
                              "ticks_started", "due_schedules_moved_on") else 0 for k in check}
    if check != expected:
        raise RuntimeError(f"schedules did not fire exactly once each: {check}")
    # created_at is the engine time of the fire_schedules statement that started the run, so
    # the runs of every batch before the last were committed by the last one's created_at.
    fire_per_sec = before_last_batch / last_s if before_last_batch else None
    work = db_work(delta, n, polls, producer_commits=0)
    scheduler = {k: delta.calls.get(k, 0) for k in ("due_schedules", "fire_schedules",
                                                    "start_buffered_ticks", "next_wake_in")}
    fire_ms = delta.total_ms.get("fire_schedules", 0.0)
    result = line(
        "W6_schedules", n, last_s, fire_per_sec, percentile(lag_ms, 0.50),
        percentile(lag_ms, 0.99),
        idle_schedules=idle, cron=W6_DUE_CRON, idle_cron=W6_IDLE_CRON,
        max_ms=round(max(lag_ms), 2), first_created_ms=round(first_s * 1000, 2),
        last_created_s=round(last_s, 3),
        # Polled (every POLL_INTERVAL_S): until all n runs were visible, the last batch's
        # fire_schedules and commit included.
        all_created_visible_s=round(created_at - tick_at, 3),
        completed_s=round(completed_s, 3), completed_per_sec=round(n / completed_s, 1),
        fire_batches=fire_batches, max_fire_batch=max_batch,
        scheduler_calls=scheduler,
        fire_schedules_ms_per_call=round(fire_ms / scheduler["fire_schedules"], 3)
        if scheduler["fire_schedules"] else None,
        # Where a tick's time goes inside fire_schedules (nested calls: each includes the ones
        # it makes; track_functions = 'all').
        fire_ms_per_tick={k: round(delta.total_ms.get(k, 0.0) / n, 3) for k in FIRE_CHAIN},
        due_schedules_ms_per_call=round(delta.total_ms.get("due_schedules", 0.0)
                                        / scheduler["due_schedules"], 3)
        if scheduler["due_schedules"] else None,
        seq_tup_read_schedules=delta.seq_tup_read.get("schedules", 0),
        fired_exactly_once=True, **check,
        create_due_s=round(create_due_s, 3), create_due_per_sec=round(n / create_due_s, 1),
        create_idle_s=round(create_idle_s, 3),
        schedules_mb=round(sizes[0] / 2**20, 1), schedules_due_index_mb=round(sizes[1] / 2**20, 1),
        due_plan=plan_idle, due_plan_no_idle=plan_no_idle, due_plan_nothing_due=plan_nothing_due,
        concurrency=WORKER_CONCURRENCY, lead_s=W6_LEAD_S, **cpu, **work)
    log(f"W6: {n} runs created {last_s:.2f}s after their tick (p50 {result['p50_ms']} ms,"
        f" p99 {result['p99_ms']} ms), {fire_per_sec and round(fire_per_sec)} started/s;"
        f" all completed {completed_s:.2f}s after it")
    return result
