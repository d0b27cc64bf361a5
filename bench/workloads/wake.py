"""W3: wake-up latency, from a start's commit to its step running on an idle worker.

W3 and W3a measure the worker, with a ``def`` and an ``async def`` probe. W3_floor
measures, in the same run, what the database alone takes for the same wake-up: a
bare client that LISTENs and, on each NOTIFY, runs one statement; the part of W3
above it is pgflow's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

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
FLOOR_APPLICATION = "pgflow-bench-listener"  # the bare client's application_name, once listening
FLOOR_WAIT_S = 30.0  # the bare client gives up after this long without a NOTIFY
# What the bare client runs on each NOTIFY: a round trip, and the worker's claim itself.
FLOOR_QUERIES = {
    "select1": "select 1",
    "claim": "select * from pgflow.claim_runs(%(worker)s, array['default'], %(names)s,"
             " %(versions)s, 24)",
}


def produce_probes(dsn: str, n: int, interval: float,
                   probe: str = "wake_probe") -> list[tuple[str, float]]:
    """Producer for W3: ``n`` runs of workflow ``probe`` (of bench.workflows; workflows
    do not pickle), ``interval`` apart; (run id, time after commit)."""
    workflow = getattr(workflows, probe)
    sent: list[tuple[str, float]] = []
    with psycopg.connect(dsn) as conn:
        next_at = time.monotonic()
        for _ in range(n):
            run_id = pgflow.start(conn, workflow)
            conn.commit()
            sent.append((str(run_id), time.time()))
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    return sent


def _latencies(sent: list[tuple[str, float]], stamps: dict[str, float]) -> list[float]:
    # May be slightly negative: the NOTIFY goes out at commit, before the producer reads its clock.
    return [(stamps[run_id] - committed) * 1000 for run_id, committed in sent if run_id in stamps]


def _claim_starts(conn: psycopg.Connection[Any]) -> dict[str, float]:
    """When each run's claim statement began, on the server's clock (runs.started_at:
    the claim's statement_timestamp(); the engine clock is not moved in the bench)."""
    return dict(conn.execute("select id::text, extract(epoch from started_at)::float8"
                             " from pgflow.runs where started_at is not null").fetchall())


def _split(sent: list[tuple[str, float]], claimed: dict[str, float],
           answered: dict[str, float]) -> dict[str, float]:
    """W3 in two parts, at the claim statement's start: ``to_claim`` (the NOTIFY's
    delivery, the waiter's wake-up, the claim sent) and ``from_claim`` (the claim
    executed and answered, and for the worker the run handed to its code)."""
    to_claim = [(claimed[r] - c) * 1000 for r, c in sent if r in claimed]
    from_claim = [(answered[r] - claimed[r]) * 1000 for r, _ in sent
                  if r in claimed and r in answered]
    return {"to_claim_p50_ms": round(percentile(to_claim, 0.50), 2),
            "from_claim_p50_ms": round(percentile(from_claim, 0.50), 2)}


def _probe_worker(b: Bench, name: str, workload: str,
                  workflow: pgflow.Workflow) -> list[dict[str, Any]]:
    n = b.count(W3_PROBES)
    reset(b.dsn)
    log(f"{name}: idle worker, {n} {workflow.name} probes {W3_INTERVAL_S * 1000:.0f} ms apart")
    with worker_process(b, name.lower()) as worker, producer() as pool, \
            psycopg.connect(b.dsn, autocommit=True) as conn:
        time.sleep(W3_IDLE_SETTLE_S)
        future = pool.submit(produce_probes, b.dsn, n, W3_INTERVAL_S, workflow.name)
        wait_finished(conn, n, worker, future)
        sent = future.result()
        stamps = dict(conn.execute("select id::text, output::float8 from pgflow.runs"
                                   " where status = 'completed'").fetchall())
        claimed = _claim_starts(conn)
    latencies = _latencies(sent, stamps)
    return [line(workload, len(latencies), sent[-1][1] - sent[0][1], None,
                 percentile(latencies, 0.50), percentile(latencies, 0.99),
                 concurrency=WORKER_CONCURRENCY, interval_ms=W3_INTERVAL_S * 1000,
                 min_ms=round(min(latencies), 2), max_ms=round(max(latencies), 2),
                 failed=n - len(latencies), **_split(sent, claimed, stamps))]


def floor_listener(dsn: str, n: int, query: str) -> list[float]:
    """The bare client of W3_floor: LISTEN, and on each NOTIFY run ``query`` once.

    Registers as a worker of the probe workflow (so that runs of it can start, and
    be claimed); returns the wall clock of the answer to each NOTIFY.
    """
    worker = uuid.uuid4()
    probe = workflows.wake_probe
    answered: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pgflow.register_worker(%s, 'bench', 0, array['default'], %s)",
                     (worker, Jsonb([probe.announcement()])))
        conn.execute("set synchronous_commit = off")  # as the worker's claims
        conn.execute("listen pgflow_ready")
        conn.execute(f"set application_name = '{FLOOR_APPLICATION}'")  # listening now
        params = {"worker": worker, "names": [probe.name], "versions": [probe.version]}
        while len(answered) < n:
            received = list(conn.notifies(timeout=FLOOR_WAIT_S, stop_after=1))
            if not received:
                break
            conn.execute(query, params if "%(" in query else None).fetchall()
            # NOTIFYs that arrived together (a busy machine) are answered by one claim.
            answered += [time.time()] * len(received)
    return answered


def _wait_listening(conn: psycopg.Connection[Any]) -> None:
    deadline = time.monotonic() + FLOOR_WAIT_S
    while not conn.execute("select exists (select 1 from pg_stat_activity"
                           " where application_name = %s)", (FLOOR_APPLICATION,)).fetchone()[0]:
        if time.monotonic() > deadline:
            raise RuntimeError("the W3_floor listener did not start")
        time.sleep(0.05)


def _floor_pass(b: Bench, n: int, query: str) -> tuple[list[float], dict[str, float]]:
    """The producer's commit to the bare client's answer, each probe; and for the
    claim pass, its split at the claim statement's start (``_split``)."""
    reset(b.dsn)
    with producer() as listener, producer() as pool, \
            psycopg.connect(b.dsn, autocommit=True) as conn:
        answers = listener.submit(floor_listener, b.dsn, n, query)
        _wait_listening(conn)
        time.sleep(W3_IDLE_SETTLE_S)
        sent = pool.submit(produce_probes, b.dsn, n, W3_INTERVAL_S).result()
        answered = answers.result()
        claimed = _claim_starts(conn)
    latencies = [(at - committed) * 1000
                 for (_run, committed), at in zip(sent, answered, strict=True)]
    # One NOTIFY, one claim, one run: the i-th answer is the i-th probe's.
    split = (_split(sent, claimed, {r: at for (r, _c), at in zip(sent, answered, strict=True)})
             if claimed else {})
    return latencies, split


def w3_floor(b: Bench) -> list[dict[str, Any]]:
    """The database's share of W3: a bare client's NOTIFY-to-answer time."""
    n = b.count(W3_PROBES)
    log(f"W3_floor: a bare LISTEN client, {n} probes {W3_INTERVAL_S * 1000:.0f} ms apart,"
        f" then the same running the claim")
    round_trip, _ = _floor_pass(b, n, FLOOR_QUERIES["select1"])
    claim, split = _floor_pass(b, n, FLOOR_QUERIES["claim"])
    return [line("W3_floor", len(claim), 0.0, None,
                 percentile(claim, 0.50), percentile(claim, 0.99),
                 select1_p50_ms=round(percentile(round_trip, 0.50), 2),
                 select1_p99_ms=round(percentile(round_trip, 0.99), 2),
                 interval_ms=W3_INTERVAL_S * 1000, **split)]


def w3_wake_latency(b: Bench) -> list[dict[str, Any]]:
    """Idle worker; single ``def`` runs started W3_INTERVAL_S apart; commit-to-step-start
    latency. Then W3_floor, the database's share, in the same run."""
    return _probe_worker(b, "W3", "W3_wake_latency", workflows.wake_probe) + w3_floor(b)


def w3a_async_wake_latency(b: Bench) -> list[dict[str, Any]]:
    """W3 with an ``async def`` probe: no thread between the claim and the step."""
    return _probe_worker(b, "W3a", "W3a_async_wake_latency", workflows.async_wake_probe)
