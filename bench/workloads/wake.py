"""W3: wake-up latency, from a start's commit to its step running on an idle worker."""

from __future__ import annotations

import time
from typing import Any

import psycopg

import pgflow
from bench import workflows
from bench.harness import (
    WORKER_CONCURRENCY,
    Bench,
    line,
    log,
    percentile,
    producer,
    reset,
    wait_finished,
    worker_process,
)

W3_PROBES = 200  # W3: single runs started one at a time against an idle worker
W3_INTERVAL_S = 0.020  # W3: pause between two probe starts
W3_IDLE_SETTLE_S = 1.0  # W3: time the fresh worker gets to go idle before the first probe


def produce_probes(dsn: str, n: int, interval: float) -> list[tuple[str, float]]:
    """Producer for W3: ``n`` wake_probe runs, ``interval`` apart; (run id, time after commit)."""
    sent: list[tuple[str, float]] = []
    with psycopg.connect(dsn) as conn:
        next_at = time.monotonic()
        for _ in range(n):
            run_id = pgflow.start(conn, workflows.wake_probe)
            conn.commit()
            sent.append((str(run_id), time.time()))
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    return sent


def w3_wake_latency(b: Bench) -> list[dict[str, Any]]:
    """Idle worker; single runs started W3_INTERVAL_S apart; commit-to-step-start latency."""
    n = b.count(W3_PROBES)
    reset(b.dsn)
    log(f"W3: idle worker, {n} probes {W3_INTERVAL_S * 1000:.0f} ms apart")
    with worker_process(b, "w3") as worker, producer() as pool, \
            psycopg.connect(b.dsn, autocommit=True) as conn:
        time.sleep(W3_IDLE_SETTLE_S)
        future = pool.submit(produce_probes, b.dsn, n, W3_INTERVAL_S)
        wait_finished(conn, n, worker, future)
        sent = future.result()
        stamps = dict(conn.execute("select id::text, output::float8 from pgflow.runs"
                                   " where status = 'completed'").fetchall())
    # May be slightly negative: the NOTIFY goes out at commit, before the producer reads its clock.
    latencies = [(stamps[run_id] - committed) * 1000 for run_id, committed in sent if run_id in stamps]
    return [line("W3_wake_latency", len(latencies), sent[-1][1] - sent[0][1], None,
                 percentile(latencies, 0.50), percentile(latencies, 0.99),
                 concurrency=WORKER_CONCURRENCY, interval_ms=W3_INTERVAL_S * 1000,
                 min_ms=round(min(latencies), 2), max_ms=round(max(latencies), 2),
                 failed=n - len(latencies))]
