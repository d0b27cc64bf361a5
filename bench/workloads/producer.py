"""W0 and W1: runs started one per transaction, as an application's request handlers would.

W0 is the producer alone (no worker), the ceiling W1 can reach on the machine; W1 has a
worker running while the producer starts runs, and measures first start to last finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

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
    spans,
    wait_finished,
    worker_process,
)

W1_RUNS = 5000  # W1: runs started one per transaction while the worker runs
# W0/W1/W5: connections of the producer process, each a thread doing start() + commit in a
# loop, as an application's request handlers would: 4 is psycopg_pool's default pool size.
# W0 and W1 are also measured with the counts below (the `_<k>conn` lines): one connection
# alone is bounded by its own round trips and commit flushes; 8 is pgbench's -c 8.
PRODUCER_CONNECTIONS = 4
PRODUCER_CONNECTIONS_ALSO = (1, 8)
# W0's yardstick: what a hand-made job table costs the same producer, one row a commit
# (bench_jobs: a uuid primary key, the name, the jsonb input, a timestamp; harness.prepare).
BARE_INSERT = "insert into bench_jobs (name, input) values (%s, %s)"


def producer_variants(workload: str) -> Iterator[tuple[str, int]]:
    """(line name, connections) for each producer measured, the main one last and unsuffixed."""
    for connections in PRODUCER_CONNECTIONS_ALSO:
        yield f"{workload}_{connections}conn", connections
    yield workload, PRODUCER_CONNECTIONS


def produce_committed(dsn: str, n: int, connections: int = 1, bare: bool = False) -> float:
    """Producer for W1: ``n`` runs of one_step, one start per transaction; returns seconds.

    ``connections`` threads share the work, each on its own connection (opened before
    the clock starts), as concurrent requests of an application would. ``bare``: the
    same with a plain insert of the same input into an application's table (W0's
    yardstick) instead of ``pgflow.start()``.
    """
    conns = [psycopg.connect(dsn) for _ in range(connections)]
    go = threading.Barrier(connections + 1)

    def produce(conn: psycopg.Connection[Any], numbers: range) -> None:
        go.wait()
        for i in numbers:
            if bare:
                conn.execute(BARE_INSERT, ("one_step", Jsonb([i])))
            else:
                pgflow.start(conn, workflows.one_step, i)
            conn.commit()

    try:
        with ThreadPoolExecutor(connections) as threads:
            done = [threads.submit(produce, conn, range(k, n, connections))
                    for k, conn in enumerate(conns)]
            go.wait()
            started = time.perf_counter()
            for future in done:
                future.result()
            return time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()


def one_step_live(b: Bench, workload: str, label: str, n: int, since: datetime | None = None,
                   connections: int = PRODUCER_CONNECTIONS) -> dict[str, Any]:
    """W1's measurement: a running worker, a producer starting ``n`` one_step runs one per commit.

    With ``since``, only runs created from then on are waited for and measured (W5's history
    and sleepers are older).
    """
    before = read_stats(b.dsn)
    with worker_process(b, label) as worker, producer() as pool, \
            psycopg.connect(b.dsn, autocommit=True) as conn:
        meter = CpuMeter(worker.pid, conn)
        future = pool.submit(produce_committed, b.dsn, n, connections)
        polls = wait_finished(conn, n, worker, future, since)
        producer_s = future.result()
        cpu = meter.report(conn, n)
    delta = read_stats(b.dsn).minus(before)
    with psycopg.connect(b.dsn, autocommit=True) as conn:  # after the reading: not in seq_tup_read
        s = spans(conn, since)
    work = db_work(delta, n, polls, producer_commits=n)
    # Sequential scans of the engine's tables, nearly all by procedures (W1's completion polls
    # also scan runs; W5's use an index): a procedure whose cost grows with the table shows here.
    seq = {k: round(delta.seq_tup_read.get(k, 0) / n, 1) for k in ("runs", "steps", "timers")}
    return line(workload, n, s.from_created_s, n / s.from_created_s,
                percentile(s.latencies_ms, 0.50), percentile(s.latencies_ms, 0.99),
                concurrency=WORKER_CONCURRENCY, producer_connections=connections, failed=s.failed,
                producer_per_sec=round(n / producer_s, 1), **cpu, **work, seq_tup_read_per_run=seq)


def w1_one_step(b: Bench) -> list[dict[str, Any]]:
    """A running worker; a producer starts runs one per transaction; runs/s first start to last finish."""
    n = b.count(W1_RUNS)
    lines = []
    for name, connections in producer_variants("W1_one_step"):
        reset(b.dsn)
        log(f"W1: worker -c {WORKER_CONCURRENCY}, producer starts {n} one_step runs, one per"
            f" commit, on {connections} connection(s)")
        lines.append(one_step_live(b, name, "w1", n, connections=connections))
    b.results["W1"] = lines[-1]
    return lines


def w0_producer(b: Bench) -> list[dict[str, Any]]:
    """W1's producer alone, no worker: the ceiling W1 can reach on this machine.

    One process doing ``pgflow.start()`` + commit per transaction is what W1 measures
    from first start to last completion, so W1 is bounded by this rate (minus the CPU
    the worker takes from the producer on a shared machine). Each line also measures,
    right before, the same producer inserting the same input into a plain table
    (``bare_per_sec``): ``cost_ratio`` is a start's time over a bare insert's.
    """
    n = b.count(W1_RUNS)
    lines = []
    for name, connections in producer_variants("W0_producer"):
        reset(b.dsn)
        log(f"W0: producer alone inserts {n} rows into a plain table, then starts {n}"
            f" one_step runs, one per commit, on {connections} connection(s) (no worker)")
        with producer() as pool:
            bare_s = pool.submit(produce_committed, b.dsn, n, connections, True).result()
            seconds = pool.submit(produce_committed, b.dsn, n, connections).result()
        lines.append(line(name, n, seconds, n / seconds, None, None,
                          producer_connections=connections,
                          bare_per_sec=round(n / bare_s, 1),
                          cost_ratio=round(seconds / bare_s, 2)))
    reset(b.dsn)
    return lines
