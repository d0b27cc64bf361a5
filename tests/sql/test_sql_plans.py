"""Cached plans follow the tables' statistics.

A connection keeps the plans of a procedure's statements, and ``claim`` and
``complete_batch`` use one generic plan from their first call. A plan made
while a table was small may scan it sequentially (the cheapest plan for a
few dozen rows); PostgreSQL re-plans when the table's statistics change,
which autovacuum does as the table grows (``runs`` is analyzed after every
2 % of change). Each test makes a worker connection plan on small, analyzed
tables, grows them and analyzes them again, and checks from the statistics
of one transaction that the same connection's next call scanned nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.support.sqlkit import Conn, fire_timers, recover, set_clock, start, worker_factory

SMALL = 40  # runs when the plans are made
GROWN = 20_000  # finished runs added before the second call (and a tenth as many sleepers)
ENGINE_TABLES = ("runs", "steps", "timers")


@pytest.fixture
def workers(dsn: str) -> Iterator[Any]:
    with worker_factory(dsn) as make:
        yield make


def analyze(conn: Conn) -> None:
    for table in ENGINE_TABLES:
        conn.execute(f"analyze pgflow.{table}")


def grow(conn: Conn) -> None:
    """GROWN finished one-step runs and a tenth as many asleep for a day, then fresh
    statistics (as autovacuum would take them)."""
    conn.execute("""
        with made as (
            insert into pgflow.runs (name, version, queue, status, input, output, created_at,
                                     available_at, started_at, finished_at)
            select 'wf', '1', 'default', 'completed', '[]', 'null', t, t, t, t
            from generate_series(1, %s) g, lateral (select now() - interval '1 day' as t) x
            returning id, created_at)
        insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output,
                                  started_at, finished_at)
        select id, 0, 'step', 'step', 'completed', 1, 'null', created_at, created_at from made""",
                 (GROWN,))
    conn.execute("""
        with sleeping as (
            insert into pgflow.runs (name, version, queue, status, input, created_at, available_at)
            select 'wf', '1', 'default', 'sleeping', '[]', now(), now() + interval '1 day'
            from generate_series(1, %s) g
            returning id, available_at)
        insert into pgflow.timers (run_id, kind, due_at, created_at)
        select id, 'start', available_at, now() from sleeping""", (GROWN // 10,))
    analyze(conn)


def sequential_scans(conn: Conn) -> dict[str, int]:
    """Sequential scans of the engine tables that ``conn``'s backend has not yet reported.

    On PostgreSQL 15 these pending counts may include earlier transactions of the
    session (they are flushed to the shared statistics about once a second), so
    callers compare two readings.
    """
    rows = conn.cursor(row_factory=dict_row).execute(
        "select relname, seq_scan from pg_stat_xact_user_tables"
        " where schemaname = 'pgflow' and relname = any(%s)", (list(ENGINE_TABLES),)).fetchall()
    return {row["relname"]: row["seq_scan"] for row in rows}


def scans_by(conn: Conn, call: Any) -> dict[str, int]:
    """Run ``call`` in one transaction of ``conn``; the sequential scans it made."""
    with conn.transaction():
        before = sequential_scans(conn)
        call()
        after = sequential_scans(conn)
    return {table: n - before.get(table, 0) for table, n in after.items()
            if n != before.get(table, 0)}


@pytest.mark.slow
def test_claim(conn, workers):
    worker = workers()
    for i in range(SMALL):
        start(conn, input=[i])
    analyze(conn)
    assert len(worker.claim(limit=5)) == 5  # plans made on the small tables
    grow(conn)
    assert scans_by(worker.db, lambda: worker.claim(limit=5)) == {}


@pytest.mark.slow
def test_checkpoints_and_completions(conn, workers):
    worker = workers()
    for i in range(SMALL):
        start(conn, input=[i])
    claims = worker.claim(limit=SMALL)
    analyze(conn)
    worker.complete_step(claims[0].run_id, claims[0].token, 0)
    worker.complete_run(claims[1].run_id, claims[1].token)
    grow(conn)

    def report() -> None:
        worker.complete_step(claims[2].run_id, claims[2].token, 0)
        worker.complete_run(claims[3].run_id, claims[3].token)
    assert scans_by(worker.db, report) == {}


@pytest.mark.slow
def test_firing_timers(dsn, conn):
    for i in range(SMALL):
        start(conn, input=[i], delay=timedelta(seconds=i + 1))
    analyze(conn)
    with psycopg.connect(dsn, autocommit=True) as scheduler:
        set_clock(conn, timedelta(seconds=SMALL // 2))
        assert fire_timers(scheduler) == SMALL // 2
        grow(conn)
        set_clock(conn, timedelta(minutes=5))
        assert scans_by(scheduler, lambda: fire_timers(scheduler)) == {}


def test_recovery(dsn, conn, workers):
    crashed = workers()
    for i in range(SMALL):
        start(conn, input=[i])
    crashed.claim(limit=10)
    analyze(conn)
    with psycopg.connect(dsn, autocommit=True) as survivor:
        assert recover(survivor) == 0
        crashed.lose_liveness_lock()
        grow(conn)
        assert scans_by(survivor, lambda: recover(survivor)) == {}
