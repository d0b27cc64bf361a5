"""W5: W1 again on a database holding a million finished runs and 100,000 sleeping ones.

Does the hot path grow with history? W5's runs/s is compared with W1's of the same invocation
(run right before it), and the claim's candidate query is EXPLAINed on the loaded tables.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

import pgflow
from bench import workflows
from bench.harness import WORKER_CONCURRENCY, Bench, log, reset
from bench.workloads.producer import W1_RUNS, one_step_live
from pgflow import schema

# W5: W1 again after loading this much history (finished runs, one step each) and these many
# runs asleep on a timer due in a day, bulk-inserted before the worker starts.
W5_HISTORY_RUNS = 1_000_000
W5_SLEEPING_RUNS = 100_000
W5_HISTORY_SPAN_DAYS = 30  # history runs are created evenly over this many days before the load
W5_SLEEP_DUE_DAYS = 1  # the sleepers' timers come due this many days after the load
W5_RATIO_TARGET = 0.8  # W5 per_sec / W1 per_sec should be at least this (within 20 %)
W5_PLAN_PENDING = WORKER_CONCURRENCY  # pending runs (uncommitted) under the claim EXPLAIN

# W5's preload. Ids are version-7 UUIDs of each run's created_at, as pgflow.uuid_v7() would
# have made them then (pgflow.uuid_v7() itself stamps the clock of the insert).
UUID_V7_AT_SQL = """
create or replace function bench_uuid_v7(p_at timestamptz) returns uuid
language sql volatile
as $$
    select encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                  placing substring(int8send((extract(epoch from p_at) * 1000)::bigint) from 3)
                  from 1 for 6), 52, 1), 53, 1), 'hex')::uuid
$$
"""
# Finished one_step runs, created evenly over the last W5_HISTORY_SPAN_DAYS, oldest first, each
# with its one completed step entry, the way worker and engine leave them.
HISTORY_SQL = """
with made as (
    insert into pgflow.runs (id, name, version, queue, status, priority, input, output,
                             created_at, available_at, started_at, finished_at, lease_owner,
                             lease_token)
    select bench_uuid_v7(h.at), %(name)s, %(version)s, %(queue)s, 'completed', 0,
           jsonb_build_array(h.i), to_jsonb(h.i + 1), h.at, h.at, h.at + interval '4 ms',
           h.at + interval '9 ms', null, 1
    from (select i, pgflow.now() - %(days)s * interval '1 day' * (1 - i::float8 / %(n)s) as at
          from generate_series(0, %(n)s - 1) i) h
    order by h.i
    returning id, output, started_at, finished_at
)
insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output, started_at,
                          finished_at)
select m.id, 0, %(step)s, 'step', 'completed', 1, m.output, m.started_at + interval '1 ms',
       m.finished_at - interval '2 ms'
from made m
"""
# Sleeper runs started evenly over the last hour, each asleep at journal entry 0 for
# W5_SLEEP_DUE_DAYS: status 'sleeping', the 'sleeping' sleep entry, the timer (as pgflow.sleep).
SLEEPERS_SQL = """
with made as (
    insert into pgflow.runs (id, name, version, queue, status, priority, input, created_at,
                             available_at, started_at, lease_owner, lease_token)
    select bench_uuid_v7(h.at), %(name)s, %(version)s, %(queue)s, 'sleeping', 0,
           jsonb_build_array(h.i, %(days)s * 86400), h.at, h.at, h.at + interval '4 ms', null, 1
    from (select i, pgflow.now() - interval '1 hour' * (1 - i::float8 / %(n)s) as at
          from generate_series(0, %(n)s - 1) i) h
    order by h.i
    returning id, started_at + interval '1 ms' as slept_at,
              started_at + interval '1 ms' + %(days)s * interval '1 day' as due_at
), journal as (
    insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output, started_at,
                              finished_at)
    select m.id, 0, 'sleep', 'sleep', 'sleeping', 1, jsonb_build_object('until', m.due_at),
           m.slept_at, m.due_at
    from made m
)
insert into pgflow.timers (run_id, kind, seq, due_at, created_at)
select m.id, 'sleep', 0, m.due_at, m.slept_at from made m
"""
# The claim's candidate query, read from the installed pgflow.claim and run as the worker's
# claim would: its queues, the (name, version) pairs it has code for, a limit of its concurrency.
CLAIM_VARIABLES = {"p_queues": "%(queues)s::text[]", "v_now": "pgflow.now()",
                   "p_names": "%(names)s::text[]", "p_versions": "%(versions)s::text[]",
                   "p_limit": "%(limit)s"}
TABLE_SIZES_SQL = ("select pg_total_relation_size('pgflow.runs'), pg_total_relation_size('pgflow.steps'),"
                   " pg_total_relation_size('pgflow.timers')")


def preload_history(dsn: str, history: int, sleeping: int) -> dict[str, Any]:
    """Bulk-load W5's finished and sleeping runs, vacuum analyze, checkpoint; seconds of each."""
    one, sleeper = workflows.one_step, workflows.sleeper
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(UUID_V7_AT_SQL)
        started = time.perf_counter()
        conn.execute(HISTORY_SQL, {"name": one.name, "version": one.version, "queue": one.queue,
                                   "step": workflows.bump.name, "n": history,
                                   "days": W5_HISTORY_SPAN_DAYS})
        conn.execute(SLEEPERS_SQL, {"name": sleeper.name, "version": sleeper.version,
                                    "queue": sleeper.queue, "n": sleeping, "days": W5_SLEEP_DUE_DAYS})
        inserted = time.perf_counter()
        conn.execute("vacuum analyze pgflow.runs, pgflow.steps, pgflow.timers")
        vacuumed = time.perf_counter()
        # The load's dirty pages and WAL: written now, not by a checkpoint during the workload.
        conn.execute("checkpoint")
        done = time.perf_counter()
        row = conn.execute(TABLE_SIZES_SQL).fetchone()
    assert row is not None
    return {"preload_s": round(done - started, 3), "preload_insert_s": round(inserted - started, 3),
            "preload_vacuum_analyze_s": round(vacuumed - inserted, 3),
            "preload_checkpoint_s": round(done - vacuumed, 3),
            "table_mb": {k: round(v / 2**20, 1) for k, v in zip(("runs", "steps", "timers"), row,
                                                                   strict=True)}}


def claim_plan(dsn: str) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim's candidate query (no worker running).

    W5_PLAN_PENDING one_step runs are started in the same transaction, so there is something
    to claim, and rolled back afterwards.
    """
    defined = (workflows.one_step, workflows.ten_steps, workflows.wake_probe, workflows.sleeper)
    with psycopg.connect(dsn) as conn:
        for i in range(W5_PLAN_PENDING):
            pgflow.start(conn, workflows.one_step, i)
        candidates = schema.procedure_query(conn, "pgflow.claim_runs", "candidates", CLAIM_VARIABLES)
        row = conn.execute("explain (analyze, buffers, format json) " + candidates, {
            "queues": sorted({w.queue for w in defined}), "names": [w.name for w in defined],
            "versions": [w.version for w in defined], "limit": WORKER_CONCURRENCY}).fetchone()
        conn.rollback()
    assert row is not None
    plan = row[0][0]
    top = plan["Plan"]
    indexes: list[str] = []
    nodes = [top]
    while nodes:
        node = nodes.pop()
        if "Index Name" in node and node["Index Name"] not in indexes:
            indexes.append(node["Index Name"])
        nodes.extend(node.get("Plans", []))
    return {"rows": top["Actual Rows"], "indexes": indexes,
            "shared_hit": top.get("Shared Hit Blocks", 0), "shared_read": top.get("Shared Read Blocks", 0),
            "execution_ms": plan["Execution Time"], "planning_ms": plan["Planning Time"]}


def w5_history(b: Bench) -> list[dict[str, Any]]:
    """W1 on a database holding a lot of history and many sleeping runs; compared with W1."""
    n = b.count(W1_RUNS)
    history, sleeping = b.count(W5_HISTORY_RUNS), b.count(W5_SLEEPING_RUNS)
    reset(b.dsn)
    log(f"W5: loading {history} finished runs and {sleeping} sleeping runs")
    load = preload_history(b.dsn, history, sleeping)
    log(f"W5: loaded in {load['preload_s']:.1f}s, table sizes {load['table_mb']} MB;"
        f" worker -c {WORKER_CONCURRENCY}, producer starts {n} one_step runs, one per commit")
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        row = conn.execute("select pgflow.now()").fetchone()
    assert row is not None
    w1 = b.results.get("W1")
    if w1 is None:
        log("W5: no W1 result in this run to compare with")
    result = one_step_live(b, "W5_history", "w5", n, since=row[0])
    w1_per_sec = None if w1 is None else w1["per_sec"]
    result = {
        **{k: result[k] for k in ("workload", "n", "seconds", "per_sec", "p50_ms", "p99_ms")},
        "w1_per_sec": w1_per_sec,
        "ratio_to_w1": None if not w1_per_sec else round(result["per_sec"] / w1_per_sec, 3),
        "w1_p50_ms": None if w1 is None else w1["p50_ms"],
        "w1_p99_ms": None if w1 is None else w1["p99_ms"],
        "claim_ms_per_call": result["proc_ms_per_call"].get("claim"),
        "w1_claim_ms_per_call": None if w1 is None else w1["proc_ms_per_call"].get("claim"),
        "history_runs": history, "sleeping_runs": sleeping, **load,
        "claim_plan": claim_plan(b.dsn),
        **{k: v for k, v in result.items() if k not in ("workload", "n", "seconds", "per_sec",
                                                          "p50_ms", "p99_ms")},
    }
    if result["ratio_to_w1"] is not None:
        verdict = "within" if result["ratio_to_w1"] >= W5_RATIO_TARGET else "BELOW"
        log(f"W5: {result['per_sec']} runs/s, {result['ratio_to_w1']} of W1's {w1_per_sec}:"
            f" {verdict} the target (at least {W5_RATIO_TARGET})")
    return [result]
