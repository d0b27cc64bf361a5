"""What every workload shares: the server, a fresh database, the worker process, the waits,
the statistics, CPU accounting, pgbench's commit rate and the JSON lines.

A workload (``bench/workloads/``) is a function ``Bench -> list[dict]``: it calls ``reset``
first, starts what it needs with ``worker_process`` / ``producer``, waits with
``wait_finished`` and returns ``line(...)`` dicts; ``bench/run.py`` prints them and keeps them
in ``bench/results/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import pgflow
from pgflow import schema
from pgflow.worker import DEFAULT_CONCURRENCY

# -- knobs (each workload's own are at the top of its module) -----------------

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
# Observability on the worker (bench/README.md, "Observability cost"): with
# PGFLOW_BENCH_METRICS=1 it records Prometheus metrics and serves them
# (--metrics-port, never scraped during a run); with PGFLOW_BENCH_TRACING=1
# bench.workflows configures the OpenTelemetry SDK, spans batched to an exporter
# that drops them (the cost of making spans, not of shipping them).
WORKER_METRICS = os.environ.get("PGFLOW_BENCH_METRICS") == "1"
# Worker processes (`pgflow worker -p N`, one supervisor): PGFLOW_BENCH_PROCESSES, default 1.
# The worker CPU figures then add up the supervisor and all its processes.
WORKER_PROCESSES = int(os.environ.get("PGFLOW_BENCH_PROCESSES", "1"))
WORKER_TRACING = os.environ.get("PGFLOW_BENCH_TRACING") == "1"
# What the database waits on during the drains (WaitSampler): PGFLOW_BENCH_WAITS=1 samples
# pg_stat_activity every WAIT_SAMPLE_S on a connection of its own (off by default: the
# sampling costs a little CPU of its own); bench/scale.py turns it on.
WAIT_SAMPLING = os.environ.get("PGFLOW_BENCH_WAITS") == "1"
WAIT_SAMPLE_S = 0.010
WAIT_SAMPLER_NAME = "pgflow-bench-waits"  # its backend: not in the CPU figures
PRELOAD_BATCH = 1000  # W1b/W2: runs started per transaction when queueing ahead

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
# --private-server: the server's defaults (durability untouched), plus the statement
# statistics that need shared_preload_libraries.
PRIVATE_SERVER_OPTIONS = ("-c shared_preload_libraries=pg_stat_statements"
                          " -c pg_stat_statements.track=top -c max_connections=100")
# The server settings the machine line of each results file records.
SERVER_SETTINGS = ("server_version", "synchronous_commit", "fsync", "full_page_writes",
                   "shared_buffers", "wal_buffers", "max_connections", "autovacuum", "jit",
                   "shared_preload_libraries", "track_functions")

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"  # one <UTC start>.jsonl per run
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


# -- the server ---------------------------------------------------------------

@contextlib.contextmanager
def admin_server(dsn: str | None, private: bool) -> Iterator[str]:
    """The admin DSN to benchmark on; the one place that finds or starts a server.

    ``private``: a throwaway cluster of its own (the tests' helper: the machine's binaries,
    else the embedded mode's) that loads pg_stat_statements, removed on exit. Otherwise
    ``dsn``, else ``$PGFLOW_BENCH_DSN``, else DEFAULT_ADMIN_DSN.
    """
    if private:
        from tests.support import pgcluster

        with pgcluster.private_cluster(PRIVATE_SERVER_OPTIONS) as cluster:
            log(f"private server on port {cluster.port} (pg_stat_statements loaded)")
            yield cluster.dsn
        return
    yield dsn or os.environ.get(DSN_ENV) or DEFAULT_ADMIN_DSN


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
        # W0's yardstick (bench/workloads/producer.py): an application's own job table.
        conn.execute("create table bench_jobs (id uuid primary key default gen_random_uuid(),"
                     " name text not null, input jsonb not null,"
                     " created_at timestamptz not null default now())")
        if statements_tracked(conn):
            conn.execute("create extension if not exists pg_stat_statements")


def reset(dsn: str) -> None:
    """Empty the engine tables between workloads (no worker is running then); the engine
    clock back to the real time (W6 moves it)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("truncate bench_jobs, pgflow.runs, pgflow.steps, pgflow.timers, pgflow.schedules,"
                     " pgflow.schedule_ticks, pgflow.queue_settings, pgflow.slots")
        conn.execute("select pgflow.reset_time()")
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


def tree_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds so far of ``pid`` and of each live child of it (a supervisor's workers)."""
    found = {pid: process_cpu_s(pid)}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return found


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def backend_cpu_s(conn: psycopg.Connection[Any]) -> dict[int, float]:
    """CPU seconds so far of every other backend connected to this database, by pid."""
    rows = conn.execute("select pid from pg_stat_activity where datname = current_database()"
                        " and pid <> pg_backend_pid() and application_name <> %s",
                        (WAIT_SAMPLER_NAME,)).fetchall()
    return {r[0]: process_cpu_s(r[0]) for r in rows}


class CpuMeter:
    """CPU used from now on by the worker process, its backends, and the whole host."""

    def __init__(self, worker_pid: int, conn: psycopg.Connection[Any]) -> None:
        self.worker_pid = worker_pid
        self.worker = tree_cpu_s(worker_pid)  # imports and start-up are not counted
        self.backends = backend_cpu_s(conn)
        self.host = host_cpu()

    def report(self, conn: psycopg.Connection[Any], n: int) -> dict[str, Any]:
        """Sample while the worker still runs (its backends vanish when it stops)."""
        backends = sum(cpu - self.backends.get(pid, 0.0) for pid, cpu in backend_cpu_s(conn).items())
        busy, total = host_cpu()
        return {
            "worker_cpu_ms_per_run": round(sum(
                cpu - self.worker.get(pid, 0.0) for pid, cpu in tree_cpu_s(self.worker_pid).items()
            ) * 1000 / n, 3),
            "db_cpu_ms_per_run": round(backends * 1000 / n, 3),
            "host_cpu_busy": round((busy - self.host[0]) / max(1, total - self.host[1]), 2),
        }


class WaitSampler:
    """What the bench database's active backends wait on, sampled while a drain runs.

    Every WAIT_SAMPLE_S, on a connection of its own, the client backends of the
    database that are running a statement, by ``wait_event_type:wait_event`` (``CPU``:
    none, so running). Where PostgreSQL saturates, its waits say on what: WAL flushes
    (``IO:WALSync``, ``LWLock:WALWrite``), locks, or CPU.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._stop = threading.Event()
        self._counts: Counter[str] = Counter()
        self.samples = 0  # one commit each: not the runs' (db_work subtracts them)
        self._thread = threading.Thread(target=self._sample, name="wait-sampler", daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True,
                             application_name=WAIT_SAMPLER_NAME) as conn:
            while not self._stop.wait(WAIT_SAMPLE_S):
                rows = conn.execute(
                    "select wait_event_type, wait_event from pg_catalog.pg_stat_activity"
                    " where datname = current_database() and state = 'active'"
                    " and backend_type = 'client backend' and pid <> pg_backend_pid()").fetchall()
                self.samples += 1
                self._counts.update(f"{kind}:{event}" if kind else "CPU" for kind, event in rows)

    def report(self) -> dict[str, Any]:
        active = sum(self._counts.values())
        return {"wait_samples": self.samples,
                "active_backends": round(active / max(1, self.samples), 2),
                "wait_events": {name: round(count / max(1, active), 3)
                                for name, count in self._counts.most_common(6)}}


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
            if row and row[0] >= WORKER_PROCESSES:
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
        metrics = ["--metrics-port", str(_free_port()), "--metrics-host", "127.0.0.1"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgflow", "worker", "bench.workflows", "--dsn", b.dsn,
             "-p", str(WORKER_PROCESSES),
             "-c", str(WORKER_CONCURRENCY), *(metrics if WORKER_METRICS else [])],
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


# -- waiting ------------------------------------------------------------------


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
    # sum of finished_at - started_at: divided by from_started_s, the runs in flight on
    # average (claim statement to completion statement; the completion's commit excluded)
    claimed_s: float = 0.0


def spans(conn: psycopg.Connection[Any], since: datetime | None = None) -> Spans:
    """Figures of every run, or (``since``) of the runs created from then on only."""
    where, params = ("", None) if since is None else (" where created_at >= %s", (since,))
    row = conn.execute(
        "select count(*), count(*) filter (where status <> 'completed'),"
        " extract(epoch from max(finished_at) - min(created_at))::float8,"
        " extract(epoch from max(finished_at) - min(started_at))::float8,"
        " coalesce(sum(extract(epoch from finished_at - started_at)), 0)::float8"
        " from pgflow.runs" + where, params).fetchone()
    assert row is not None
    lat = conn.execute("select extract(epoch from finished_at - created_at)::float8 * 1000"
                       " from pgflow.runs" + where, params).fetchall()
    return Spans(int(row[0]), int(row[1]), float(row[2]), float(row[3]), [r[0] for r in lat],
                 float(row[4]))


def line(workload: str, n: int, seconds: float, per_sec: float | None, p50: float | None,
         p99: float | None, **extra: Any) -> dict[str, Any]:
    def r(v: float | None, digits: int) -> float | None:
        return None if v is None else round(v, digits)

    return {"workload": workload, "n": n, "seconds": r(seconds, 3), "per_sec": r(per_sec, 1),
            "p50_ms": r(p50, 2), "p99_ms": r(p99, 2), **extra}


# -- the machine's commit rate ------------------------------------------------

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


# -- the results file ---------------------------------------------------------


def _read(path: str) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text(errors="replace")
    return ""


def _git(*args: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    return None


def describe_machine(b: Bench, admin_dsn: str, started: datetime, **run: Any) -> dict[str, Any]:
    """The first line of a results file: the machine, its PostgreSQL, the code, the run."""
    cpuinfo = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.MULTILINE)
    memory = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    os_name = re.search(r'^PRETTY_NAME="?([^"\n]*)', _read("/etc/os-release"), re.MULTILINE)
    server = conninfo_to_dict(admin_dsn)
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        # As SHOW says them (shared_buffers 128MB, not 16384 pages of 8 kB).
        settings = dict(conn.execute("select name, current_setting(name) from pg_settings"
                                     " where name = any(%s)", (list(SERVER_SETTINGS),)).fetchall())
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "kind": "machine",
        "utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "cpu_model": cpuinfo.group(1).strip() if cpuinfo else platform.processor() or None,
        "cores": os.cpu_count(),
        "memory_gb": round(int(memory.group(1)) / 2**20, 1) if memory else None,
        "load_1m": round(os.getloadavg()[0], 2),
        "os": f"{os_name.group(1) if os_name else platform.system()} ({platform.release()})",
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "server": {"host": server.get("host"), "port": server.get("port")},
        "postgresql": {name: settings.get(name) for name in SERVER_SETTINGS},
        "worker_concurrency": WORKER_CONCURRENCY,
        **run,
    }


class Output:
    """Each line to stdout and, if a path is given, to that results file (flushed per line).

    The file is created with its first line, the machine's: a run that never reached the
    server leaves none.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lines: list[dict[str, Any]] = []
        self._file: IO[str] | None = None

    def machine(self, description: dict[str, Any]) -> None:
        """The results file's first line; not printed (stdout carries workload lines only)."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "x")  # noqa: SIM115 (closed in close())
            self._write(description)

    def emit(self, result: dict[str, Any]) -> None:
        self.lines.append(result)
        print(json.dumps(result), flush=True)
        self._write(result)

    def _write(self, line: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
