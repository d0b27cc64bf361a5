"""The dashboard's runs page on a million runs: latency through the ASGI app, and the plans.

    .venv/bin/python -m bench.dashboard [--dsn ADMIN_DSN] [--runs 1000000] [--repeat 200]
        [--output FILE | --no-output]

Creates database ``pgflow_bench_<random>`` on the admin server (as ``bench.run``),
migrates it, loads ``--runs`` runs straight into ``pgflow.runs`` with one set-based
insert (plausible statuses, 20 workflows on 5 queues, idempotency and concurrency
keys, ``created_at`` spread over 30 days, version-7 ids of their ``created_at``),
``vacuum analyze``s it, then requests each page variant ``--repeat`` times through
``pgflow.web.create_app`` in-process (Starlette's TestClient: routing, the query,
the template; no network) and prints one JSON line a variant with p50/p95/max in
ms. Then ``EXPLAIN (ANALYZE, BUFFERS)`` of the runs-page query of each variant,
summarised in the lines and kept whole in ``bench/results/<UTC start>-dashboard-plans.txt``.
The database is dropped afterwards, whatever happens. Target: p95 < 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg.conninfo import make_conninfo

from bench.harness import (
    DEFAULT_ADMIN_DSN,
    DSN_ENV,
    RESULTS_DIR,
    create_database,
    drop_database,
    log,
    percentile,
)
from bench.workloads.history import UUID_V7_AT_SQL
from pgflow import schema

RUNS = 1_000_000  # rows loaded into pgflow.runs
REPEAT = 200  # requests of each page variant
WARMUP = 5  # requests of each variant before the timed ones (pool, caches, plans)
TARGET_P95_MS = 100.0
SPAN_DAYS = 30  # created_at is spread evenly over this many days back from now
DEEP_OFFSET = 500_000  # the deep page starts this many runs down the list (at most half of it)

LOAD_SQL = """
insert into pgflow.runs (id, name, version, queue, key, concurrency_key, status, priority, input,
                         output, error, created_at, available_at, started_at, finished_at,
                         lease_owner)
select bench_uuid_v7(x.at), 'workflow_' || (g %% 20), '1', 'queue_' || (g %% 5),
       case when g %% 4 = 0 then 'order-' || g end,
       case when g %% 3 = 0 then 'customer-' || (g %% 5000) end,
       s.status, 0, jsonb_build_array('order-' || g, g %% 1000),
       case when s.status = 'completed' then jsonb_build_object('ok', true) end,
       case when s.status = 'failed' then jsonb_build_object(
           'type', 'ConnectionError', 'message', 'gateway timed out', 'traceback', '...') end,
       x.at, x.at, x.at + interval '5 ms',
       case when s.status in ('completed', 'failed', 'cancelled') then x.at + interval '900 ms' end,
       case when s.status = 'running' then gen_random_uuid() end
from generate_series(1, %(n)s) g,
     lateral (select now() - (%(n)s - g) * (interval '1 day' * %(days)s / %(n)s) as at) x,
     lateral (select case when g %% 1000 < 880 then 'completed'
                          when g %% 1000 < 950 then 'failed'
                          when g %% 1000 < 970 then 'cancelled'
                          when g %% 1000 < 980 then 'sleeping'
                          when g %% 1000 < 990 then 'waiting'
                          when g %% 1000 < 996 then 'pending'
                          else 'running' end as status) s
"""


def load(dsn: str, n: int) -> dict[str, float]:
    timings = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(UUID_V7_AT_SQL)
        started = time.monotonic()
        conn.execute(LOAD_SQL, {"n": n, "days": SPAN_DAYS})
        timings["load_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        conn.execute("vacuum analyze pgflow.runs")
        conn.execute("checkpoint")
        timings["vacuum_s"] = round(time.monotonic() - started, 1)
        timings["table_mb"] = round(float(conn.execute(
            "select pg_total_relation_size('pgflow.runs') / 1048576.0").fetchone()[0]), 1)
    return timings


def variants(dsn: str, runs: int) -> dict[str, dict[str, str]]:
    """The page variants: the query string of each."""
    with psycopg.connect(dsn) as conn:
        at, rid = conn.execute("select created_at, id from pgflow.runs"
                               " order by created_at desc, id desc offset %s limit 1",
                               (min(DEEP_OFFSET, runs // 2),)).fetchone()
    deep = f"{at.isoformat()}~{rid}"
    return {
        "first_page": {},
        "status_failed": {"status": "failed"},
        "workflow": {"workflow": "workflow_7"},
        "workflow_and_status": {"workflow": "workflow_7", "status": "completed"},
        "concurrency_key": {"concurrency_key": "customer-42"},
        "time_range": {"since": "10d", "until": "9d"},
        "deep_page": {"before": deep},
        "deep_page_newer": {"after": deep},
        "deep_page_failed": {"status": "failed", "before": deep},
    }


def measure(dsn: str, cases: dict[str, dict[str, str]], repeat: int) -> list[dict[str, Any]]:
    from starlette.testclient import TestClient

    from pgflow.web import create_app

    lines = []
    with TestClient(create_app(dsn, read_only=True)) as client:
        for name, params in cases.items():
            url = "/runs" + (f"?{urlencode(params)}" if params else "")
            for _ in range(WARMUP):
                assert client.get(url).status_code == 200, url
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, (url, response.text[:500])
            rows = response.text.count('class="mono run-link"')
            p95 = percentile(times, 0.95)
            lines.append({"workload": f"dashboard_runs_{name}", "n": repeat, "url": url,
                          "rows_shown": rows, "p50_ms": round(percentile(times, 0.5), 2),
                          "p95_ms": round(p95, 2), "max_ms": round(max(times), 2),
                          "target_p95_ms": TARGET_P95_MS, "met": p95 < TARGET_P95_MS})
            log(f"{name}: p50 {lines[-1]['p50_ms']} ms, p95 {lines[-1]['p95_ms']} ms")
        for path in ("/", "/api/runs"):
            times = []
            for _ in range(max(repeat // 10, 5)):
                started = time.perf_counter()
                assert client.get(path).status_code == 200
                times.append((time.perf_counter() - started) * 1000)
            lines.append({"workload": f"dashboard_{'overview' if path == '/' else 'api_runs'}",
                          "n": len(times), "url": path, "p50_ms": round(percentile(times, 0.5), 2),
                          "p95_ms": round(percentile(times, 0.95), 2)})
    return lines


def explain(dsn: str, cases: dict[str, dict[str, str]]) -> tuple[dict[str, Any], str]:
    from pgflow.web import listing

    summary: dict[str, Any] = {}
    text: list[str] = []
    with psycopg.connect(dsn) as conn:
        for name, params in cases.items():
            query, values = listing.statement(listing.RunQuery.parse(params))
            sql = psycopg.ClientCursor(conn).mogrify(query, values)
            plan = conn.execute(f"explain (analyze, buffers, format json) {sql}").fetchone()[0][0]
            nodes = list(_nodes(plan["Plan"]))
            summary[name] = {
                "execution_ms": round(plan["Execution Time"], 3),
                "planning_ms": round(plan["Planning Time"], 3),
                "indexes": sorted({n["Index Name"] for n in nodes if "Index Name" in n}),
                "seq_scan_runs": any(n["Node Type"] == "Seq Scan"
                                     and n.get("Relation Name") == "runs" for n in nodes),
                "shared_hit": plan["Plan"].get("Shared Hit Blocks", 0),
                "shared_read": plan["Plan"].get("Shared Read Blocks", 0),
            }
            rows = conn.execute(f"explain (analyze, buffers) {sql}").fetchall()
            text.append(f"-- {name}: {json.dumps(params)}\n{sql}\n"
                        + "\n".join(r[0] for r in rows) + "\n")
    return summary, "\n".join(text)


def _nodes(plan: dict[str, Any]):  # type: ignore[no-untyped-def]
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help=f"admin server DSN [default: ${DSN_ENV}, else {DEFAULT_ADMIN_DSN}]")
    parser.add_argument("--runs", type=int, default=RUNS, help=f"runs to load [{RUNS}]")
    parser.add_argument("--repeat", type=int, default=REPEAT, help=f"requests a variant [{REPEAT}]")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--output", type=Path, help="results file [bench/results/<UTC start>-dashboard.jsonl]")
    out.add_argument("--no-output", action="store_true", help="stdout only")
    args = parser.parse_args(argv)
    admin = args.dsn or os.environ.get(DSN_ENV) or DEFAULT_ADMIN_DSN
    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    name = create_database(admin)
    dsn = make_conninfo(admin, dbname=name)
    lines: list[dict[str, Any]] = []
    try:
        schema.migrate(dsn)
        log(f"loading {args.runs:,} runs into {name}")
        loaded = load(dsn, args.runs)
        log(f"loaded: {loaded}")
        cases = variants(dsn, args.runs)
        lines = measure(dsn, cases, args.repeat)
        plans, plan_text = explain(dsn, cases)
        for item in lines:
            variant = item["workload"].removeprefix("dashboard_runs_")
            if variant in plans:
                item["plan"] = plans[variant]
        with psycopg.connect(dsn) as conn:
            server = conn.execute("show server_version").fetchone()[0]
        head = {"kind": "machine", "utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "runs": args.runs, "postgresql": server, "cores": os.cpu_count(),
                "load_1m": round(os.getloadavg()[0], 2), **loaded}
        for item in lines:
            print(json.dumps(item), flush=True)
        if not args.no_output:
            path = args.output or RESULTS_DIR / f"{stamp}-dashboard.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(json.dumps(x) for x in [head, *lines]) + "\n")
            path.with_name(path.name.replace(".jsonl", "-plans.txt")).write_text(plan_text)
            log(f"kept {path} and its plans")
    finally:
        drop_database(admin, name)
    missed = [x["workload"] for x in lines if x.get("met") is False]
    if missed:
        log(f"p95 over {TARGET_P95_MS} ms: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
