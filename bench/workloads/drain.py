"""W1b, W1c, W1t and W2: runs queued before the worker starts, then drained by one worker.

The worker's own throughput, with no producer competing for the machine: W1b one-step runs/s,
W1c the same under a queue cap of 20 executing runs (what flow control costs the claim), W1t
the same with the step transactional (its checkpoint in a transaction of its own: what
exactly-once database steps cost), W2 steps/s of ten-step runs, all from the first claim to
the last finish.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg

import pgflow
from bench import workflows
from bench.harness import (
    WAIT_SAMPLING,
    WORKER_CONCURRENCY,
    WORKER_PROCESSES,
    Bench,
    CpuMeter,
    Spans,
    WaitSampler,
    db_work,
    line,
    log,
    preload,
    read_stats,
    reset,
    spans,
    wait_finished,
    worker_process,
)

W1B_RUNS = 5000  # W1b: runs queued before the worker starts
W2_RUNS = 1000  # W2: runs of ten_steps queued before the worker starts
W1C_QUEUE_CAP = 20  # W1c: pgflow.set_queue(concurrency=...) of the one_step queue


def _drain(b: Bench, label: str, workflow: pgflow.Workflow, n: int, steps: int | None = None,
           queue_cap: int | None = None) -> tuple[Spans, dict[str, Any]]:
    """Queue ``n`` runs, then start one worker and wait until it has finished them all."""
    reset(b.dsn)
    preload(b.dsn, workflow, n)
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        if queue_cap is not None:
            pgflow.set_queue(conn, workflow.queue, concurrency=queue_cap)
        if WORKER_PROCESSES > 1:  # none starts before all are up, and measured
            pgflow.pause_queue(conn, workflow.queue)
    before = read_stats(b.dsn)
    waits = WaitSampler(b.dsn) if WAIT_SAMPLING else None
    with worker_process(b, label) as worker, psycopg.connect(b.dsn, autocommit=True) as conn:
        meter = CpuMeter(worker.pid, conn)
        if WORKER_PROCESSES > 1:
            pgflow.resume_queue(conn, workflow.queue)
        with waits or contextlib.nullcontext():
            polls = wait_finished(conn, n, worker)
        cpu = meter.report(conn, n)
        s = spans(conn)
    polls += waits.samples if waits else 0  # the sampler's statements are not the runs'
    work = db_work(read_stats(b.dsn).minus(before), n, polls, producer_commits=0, steps=steps)
    return s, {"concurrency": WORKER_CONCURRENCY, "processes": WORKER_PROCESSES,
               "failed": s.failed, "in_flight_mean": round(s.claimed_s / s.from_started_s, 1),
               **cpu, **work, **(waits.report() if waits else {})}


def w1b_drain(b: Bench) -> list[dict[str, Any]]:
    """Runs queued before the worker starts; runs/s from the first claim to the last finish."""
    n = b.count(W1B_RUNS)
    log(f"W1b: {n} one_step runs queued, then worker -c {WORKER_CONCURRENCY} drains them")
    s, extra = _drain(b, "w1b", workflows.one_step, n)
    return [line("W1b_drain", n, s.from_started_s, n / s.from_started_s, None, None, **extra)]


def w1c_capped(b: Bench) -> list[dict[str, Any]]:
    """W1b with the queue capped at W1C_QUEUE_CAP executing runs (every claim takes a slot)."""
    n = b.count(W1B_RUNS)
    log(f"W1c: {n} one_step runs queued, queue capped at {W1C_QUEUE_CAP}, then worker -c "
        f"{WORKER_CONCURRENCY} drains them")
    s, extra = _drain(b, "w1c", workflows.one_step, n, queue_cap=W1C_QUEUE_CAP)
    return [line("W1c_capped", n, s.from_started_s, n / s.from_started_s, None, None,
                 queue_cap=W1C_QUEUE_CAP, **extra)]


def w1t_transactional(b: Bench) -> list[dict[str, Any]]:
    """W1b with its one step transactional (no group commit for its checkpoint)."""
    n = b.count(W1B_RUNS)
    log(f"W1t: {n} one_tx_step runs queued, then worker -c {WORKER_CONCURRENCY} drains them")
    s, extra = _drain(b, "w1t", workflows.one_tx_step, n)
    return [line("W1t_transactional", n, s.from_started_s, n / s.from_started_s, None, None,
                 **extra)]


def w2_ten_steps(b: Bench) -> list[dict[str, Any]]:
    """ten_steps runs queued, drained by one worker; steps/s."""
    n = b.count(W2_RUNS)
    steps = n * workflows.TEN
    log(f"W2: {n} ten_steps runs queued, then worker -c {WORKER_CONCURRENCY} drains them")
    s, extra = _drain(b, "w2", workflows.ten_steps, n, steps=steps)
    per_step = {f"{key[:-len('_per_run')]}_per_step": round(value / workflows.TEN, 3)
                for key, value in extra.items() if key.endswith("cpu_ms_per_run")}
    return [line("W2_ten_steps", steps, s.from_started_s, steps / s.from_started_s, None, None,
                 runs=n, runs_per_sec=round(n / s.from_started_s, 1), **per_step, **extra)]
