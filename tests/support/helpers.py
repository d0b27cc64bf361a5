"""Helpers for tests that drive real workers: processes, threads, a side-effect log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

import pgflow

REPO = Path(__file__).resolve().parents[2]
EFFECTS_DSN_ENV = "PGFLOW_TEST_EFFECTS_DSN"


def effects_app(pid: int) -> str:
    """The ``application_name`` of process ``pid``'s connections to the effects log."""
    return f"pgflow-test-effects:{pid}"


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``.

    The deadline bounds a hang, never a speed: tests assert what happens, not how
    fast, and must pass on a loaded machine (deadlines of tens of seconds).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def status_of(conn: psycopg.Connection[Any], run_id: uuid.UUID) -> str:
    row = conn.execute("select status from pgflow.runs where id = %s", (run_id,)).fetchone()
    assert row is not None, f"run {run_id} does not exist"
    return str(row[0])


def wait_status(conn: psycopg.Connection[Any], run_id: uuid.UUID, status: str,
                timeout: float = 60.0) -> None:
    wait_for(lambda: status_of(conn, run_id) == status, timeout, what=f"run {run_id} {status}")


@dataclass
class Effects:
    """``public.effects``: one row each time a test step's body actually runs."""

    conn: psycopg.Connection[Any]

    @classmethod
    def create(cls, conn: psycopg.Connection[Any], with_exec_id: bool = False) -> Effects:
        """The log; ``with_exec_id`` adds a unique execution id (a retried write counts once)."""
        conn.execute("""
            create table if not exists public.effects (
                id bigserial primary key,
                run_id text not null,
                step text not null,
                pid integer not null,
                at timestamptz not null default clock_timestamp())""")
        if with_exec_id:
            conn.execute("alter table public.effects add column if not exists exec_id uuid unique")
        return cls(conn)

    def count(self, run_id: Any = None, step: str | None = None) -> int:
        row = self.conn.execute(
            "select count(*) from public.effects where (%(r)s::text is null or run_id = %(r)s)"
            " and (%(s)s::text is null or step = %(s)s)",
            {"r": None if run_id is None else str(run_id), "s": step}).fetchone()
        return int(row[0]) if row else 0

    def per_step(self, run_id: Any) -> dict[str, int]:
        rows = self.conn.execute(
            "select step, count(*) from public.effects where run_id = %s group by step",
            (str(run_id),)).fetchall()
        return {step: int(n) for step, n in rows}


def log_timers(conn: psycopg.Connection[Any]) -> None:
    """Keep a copy of every timer the engine inserts, in ``public.timer_log``.

    A timer row is deleted when it fires; its copy lets a test read the due time
    the engine set (a back-off, a sleep) instead of timing a worker against it.
    """
    conn.execute("""
        create table public.timer_log (like pgflow.timers);
        create function public.log_timer() returns trigger language plpgsql
        set search_path = pg_catalog as $$
        begin
            insert into public.timer_log select new.*;
            return new;
        end $$;
        create trigger log_timer after insert on pgflow.timers
            for each row execute function public.log_timer();
    """)


@dataclass
class Backoff:
    """One failed attempt and the retry timer it set."""

    attempt: int
    delay: timedelta  # the retry's due time minus the failed attempt's end (engine clock)
    due: datetime  # that due time on the database's real clock (as ``public.effects.at``)


def backoffs(conn: psycopg.Connection[Any], run_id: Any) -> list[Backoff]:
    """The retry timers of ``run_id`` (needs :func:`log_timers`), each with its failed attempt.

    Both ends come from one statement of ``pgflow.fail_step``, so ``delay`` is
    exactly the back-off the engine computed, however busy the machine was.
    """
    attempts = conn.execute(
        "select attempt, finished_at from pgflow.step_attempts where run_id = %s"
        " order by seq, attempt", (run_id,)).fetchall()
    timers = conn.execute(
        "select t.due_at, t.due_at - c.offset_by from public.timer_log t, pgflow.clock c"
        " where t.run_id = %s and t.kind = 'retry' order by t.id", (run_id,)).fetchall()
    # the last attempt of a step that failed for good set no timer
    return [Backoff(attempt, due - ended, real_due)
            for (attempt, ended), (due, real_due) in zip(attempts, timers, strict=False)]


class Processes:
    """Worker processes started with the real CLI; all killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def worker(self, dsn: str, *modules: str, concurrency: int = 10,
               extra_env: dict[str, str] | None = None,
               extra_args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        log = Path(tempfile.mkstemp(prefix="pgflow-worker-", suffix=".log")[1])
        env = {**os.environ, "PYTHONPATH": str(REPO), EFFECTS_DSN_ENV: dsn,
               "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        env.pop("PGFLOW_DSN", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgflow", "worker", *modules, "--dsn", dsn, "-p", "1",
             "-c", str(concurrency), *extra_args],
            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[self.procs.index(proc)].read_text(errors="replace")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        for log in self.logs:
            log.unlink(missing_ok=True)


def scheduler_leader_pid(conn: psycopg.Connection[Any]) -> int | None:
    """The OS pid of the worker process whose scheduler holds this database's leader lock."""
    row = conn.execute(
        "select a.application_name from pg_locks l join pg_stat_activity a on a.pid = l.pid"
        " where l.locktype = 'advisory' and l.classid = 7366504 and l.objid = 1 and l.granted"
        "   and l.database = (select oid from pg_database where datname = current_database())"
    ).fetchone()
    return int(row[0].split(":")[1]) if row else None


def align_clock(conn: psycopg.Connection[Any], minute: int = 15) -> datetime:
    """Put the engine clock at the next hh:<minute>:00 (real time plus an offset); returns it.

    Which schedule ticks fall in a span of test time is then exact.
    """
    real = conn.execute("select statement_timestamp()").fetchone()[0]
    target = (real + timedelta(hours=1)).replace(minute=minute, second=0, microsecond=0)
    conn.execute("select pgflow.reset_time(%s)", (target - real,))
    return target


def wait_registered(conn: psycopg.Connection[Any], count: int, timeout: float = 60.0) -> None:
    """Wait until ``count`` workers are registered in the database."""
    wait_for(lambda: conn.execute("select count(*) from pgflow.workers").fetchone()[0] >= count,
             timeout, what=f"{count} registered worker(s)")


class InProcessWorkers:
    """``pgflow.Worker`` instances running in threads of the test process."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.running: list[tuple[pgflow.Worker, threading.Thread]] = []

    def start(self, workflows: Iterable[pgflow.Workflow], **options: Any) -> pgflow.Worker:
        os.environ[EFFECTS_DSN_ENV] = self.dsn
        options.setdefault("poll_interval", 0.5)
        options.setdefault("heartbeat_interval", 0.2)
        worker = pgflow.Worker(self.dsn, workflows=list(workflows), **options)
        thread = threading.Thread(target=worker.run, daemon=True, name="pgflow-test-worker")
        thread.start()
        self.running.append((worker, thread))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            wait_registered(conn, len(self.running))
        return worker

    def stop_all(self) -> None:
        for worker, _ in self.running:
            worker.stop()
        for _, thread in self.running:
            thread.join(30)
        self.running.clear()
