"""Workflows whose first step is transactional: it books an order in the application's table.

``book`` inserts one row ``(run_id, worker_pid)`` into ``public.orders_booked``
on the connection pgflow hands it, inside the transaction that also writes the
step's checkpoint; ``ship``, a plain step, follows. The table has no unique
constraint, so a booking committed twice would show as two rows.

Outside that transaction, on an autocommit connection of their own, the steps
log what they do: ``public.effects`` gets a row when a step body begins (see
:mod:`tests.support.workflows.effects`) and ``public.tx_marks`` one when
``book``'s insert is done and its transaction still open. So a test sees every
execution, including those whose insert a kill rolled back.

How long ``book`` keeps its transaction open after the insert depends on the
run's number ``n`` (``PAUSES``): long enough, on some runs, for a test to kill
a worker between the insert and the commit on purpose.

``book_then_wait`` (the frozen-worker case) blocks after its insert, on its
first execution in a run only, until a file appears.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

import pgflow
from tests.support.helpers import EFFECTS_DSN_ENV, effects_app
from tests.support.workflows.effects import record

# Seconds book's transaction stays open after its insert, by n % 4, and how it waits:
# in the database (pg_sleep: the server is busy in the transaction) or in Python.
PAUSES: tuple[tuple[float, str], ...] = ((0.15, "python"), (0.005, "pg_sleep"),
                                         (0.005, "python"), (0.0, "none"))
WAIT_LIMIT = 120.0  # book_then_wait gives up after this long (a test that failed)

_local = threading.local()


def prepare(conn: psycopg.Connection[Any]) -> None:
    """Create the application's table and the logs (``conn`` in autocommit)."""
    conn.execute("""
        create table public.orders_booked (
            id bigserial primary key,
            run_id text not null,
            worker_pid integer not null,
            booked_at timestamptz not null default clock_timestamp());
        create table public.tx_marks (
            id bigserial primary key,
            run_id text not null,
            pid integer not null,
            phase text not null,
            at timestamptz not null default clock_timestamp());
        create table if not exists public.effects (
            id bigserial primary key,
            run_id text not null,
            step text not null,
            pid integer not null,
            at timestamptz not null default clock_timestamp(),
            exec_id uuid unique)""")


def _marks() -> psycopg.Connection[Any]:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ[EFFECTS_DSN_ENV], autocommit=True,
                               application_name=effects_app(os.getpid()))
        _local.conn = conn
    return conn


def mark(run_id: str, phase: str) -> None:
    """Log, outside the step's transaction, that this process reached ``phase`` in ``run_id``."""
    _marks().execute("insert into public.tx_marks (run_id, pid, phase) values (%s, %s, %s)",
                     (run_id, os.getpid(), phase))


INSERT = ("insert into public.orders_booked (run_id, worker_pid) values (%s, %s)"
          " returning id")


@pgflow.step(transactional=True)
def book(conn: psycopg.Connection[Any], run_id: str, n: int) -> int:
    record(run_id, "book")
    row = conn.execute(INSERT, (run_id, os.getpid())).fetchone()
    assert row is not None
    mark(run_id, "inserted")
    pause, how = PAUSES[n % len(PAUSES)]
    if how == "pg_sleep":
        conn.execute("select pg_sleep(%s)", (pause,))
    elif how == "python":
        time.sleep(pause)
    return int(row[0])


@pgflow.step(transactional=True)
async def book_async(conn: psycopg.AsyncConnection[Any], run_id: str, n: int) -> int:
    await asyncio.to_thread(record, run_id, "book_async")
    cur = await conn.execute(INSERT, (run_id, os.getpid()))
    row = await cur.fetchone()
    assert row is not None
    await asyncio.to_thread(mark, run_id, "inserted")
    pause, how = PAUSES[n % len(PAUSES)]
    if how == "pg_sleep":
        await conn.execute("select pg_sleep(%s)", (pause,))
    elif how == "python":
        await asyncio.sleep(pause)
    return int(row[0])


@pgflow.step
def ship(run_id: str, booked: int) -> str:
    record(run_id, "ship")
    time.sleep(0.01)  # a window for a kill after book committed and before the run ends
    return f"shipped {booked}"


@pgflow.workflow(name="tx_orders")
def orders(ctx: pgflow.Context, n: int) -> int:
    """``def`` workflow, ``def`` transactional step."""
    run_id = str(ctx.workflow_id)
    booked = book(run_id, n)
    ship(run_id, booked)
    return booked


@pgflow.workflow(name="tx_orders_async_step")
def orders_async_step(ctx: pgflow.Context, n: int) -> int:
    """``def`` workflow, ``async def`` transactional step."""
    run_id = str(ctx.workflow_id)
    booked = book_async(run_id, n)
    ship(run_id, booked)
    return booked


@pgflow.workflow(name="tx_orders_async")
async def orders_async(ctx: pgflow.Context, n: int) -> int:
    """``async def`` workflow, ``async def`` transactional step."""
    run_id = str(ctx.workflow_id)
    booked = await book_async(run_id, n)
    await ship(run_id, booked)
    return booked


@pgflow.workflow(name="tx_orders_async_sync_step")
async def orders_async_sync_step(ctx: pgflow.Context, n: int) -> int:
    """``async def`` workflow, ``def`` transactional step."""
    run_id = str(ctx.workflow_id)
    booked = await book(run_id, n)
    await ship(run_id, booked)
    return booked


@pgflow.step(transactional=True)
def book_then_wait(conn: psycopg.Connection[Any], run_id: str, release: str) -> int:
    """Insert, then (first execution of the run only) wait for the file ``release``."""
    executions = record(run_id, "book_then_wait")
    row = conn.execute(INSERT, (run_id, os.getpid())).fetchone()
    assert row is not None
    mark(run_id, "inserted")
    if executions == 1:
        deadline = time.monotonic() + WAIT_LIMIT
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return int(row[0])


@pgflow.workflow(name="tx_frozen")
def frozen_order(ctx: pgflow.Context, release: str) -> int:
    run_id = str(ctx.workflow_id)
    booked = book_then_wait(run_id, release)
    ship(run_id, booked)
    return booked
