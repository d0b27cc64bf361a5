"""Workflows under flow control, for tests/processes/test_flow_control.py.

Each workflow has a queue of its own, so a test sets a queue's caps, pauses
it, or counts its runs without touching the others:

* ``per_customer`` (queue ``fc_customers``): ``Concurrency(2, key="customer")``;
  its one step logs the interval it executes in (see :func:`create_intervals`).
* ``fair_share`` (queue ``fc_fair``): ``Concurrency(1, key="customer")``, one
  short step: one customer's backlog against newcomers.
* ``limited_sleeper`` (queue ``fc_sleepers``): ``Concurrency(1, key="k")``;
  sleeps ``hours`` (durably) then does one step.
* ``rated`` (queue ``fc_rated``): one short step; the test gives the queue a rate.
* ``pausable`` (queue ``fc_paused``): one short step; the test pauses the queue.

The interval log is written on a connection of its own (autocommit, the
database clock ``clock_timestamp()``), so an execution's start is on record
before its body works, whatever happens to the worker afterwards.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Any

import psycopg

import pgflow
from tests.support.helpers import EFFECTS_DSN_ENV, effects_app
from tests.support.workflows.effects import record

_local = threading.local()


def create_intervals(conn: psycopg.Connection[Any]) -> None:
    """``public.intervals``: one row per execution of a logged step body.

    ``started_at`` is written before the body works, ``ended_at`` after it
    (database clock both); an execution cut short by a SIGKILL keeps a null end.
    """
    conn.execute("""
        create table if not exists public.intervals (
            id bigserial primary key,
            run_id text not null,
            key text not null,
            pid integer not null,
            started_at timestamptz not null default clock_timestamp(),
            ended_at timestamptz)""")


def _conn() -> psycopg.Connection[Any]:
    dsn = os.environ[EFFECTS_DSN_ENV]
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or getattr(_local, "dsn", None) != dsn:
        conn = psycopg.connect(dsn, autocommit=True, application_name=effects_app(os.getpid()))
        _local.conn, _local.dsn = conn, dsn
    return conn


def _nap(n: int) -> float:
    """50 to 150 ms, spread over n (deterministic, so a replay sleeps the same)."""
    return 0.05 + (n * 37 % 101) / 1000


@pgflow.step
def busy(run_id: str, customer: str, n: int) -> int:
    """Log this execution's interval around a short nap; returns its log row's id."""
    conn = _conn()
    row = conn.execute("insert into public.intervals (run_id, key, pid) values (%s, %s, %s)"
                       " returning id", (run_id, customer, os.getpid())).fetchone()
    assert row is not None
    time.sleep(_nap(n))
    conn.execute("update public.intervals set ended_at = clock_timestamp() where id = %s",
                 (row[0],))
    return int(row[0])


@pgflow.workflow(name="per_customer", queue="fc_customers",
                 concurrency=pgflow.Concurrency(limit=2, key="customer"))
def per_customer(ctx: pgflow.Context, customer: str, n: int) -> int:
    return busy(str(ctx.workflow_id), customer, n)


@pgflow.step
def short(n: int) -> int:
    time.sleep(0.02)
    return n


@pgflow.workflow(name="fair_share", queue="fc_fair",
                 concurrency=pgflow.Concurrency(limit=1, key="customer"))
def fair_share(ctx: pgflow.Context, customer: str, n: int) -> int:
    return short(n)


@pgflow.step
def after_nap(run_id: str) -> str:
    record(run_id, "after_nap")
    return "awake"


@pgflow.workflow(name="limited_sleeper", queue="fc_sleepers",
                 concurrency=pgflow.Concurrency(limit=1, key="k"))
def limited_sleeper(ctx: pgflow.Context, k: str, hours: int) -> str:
    if hours:
        ctx.sleep(timedelta(hours=hours))
    return after_nap(str(ctx.workflow_id))


@pgflow.step
def quick(n: int) -> int:
    return n


@pgflow.workflow(name="rated", queue="fc_rated")
def rated(ctx: pgflow.Context, n: int) -> int:
    return quick(n)


@pgflow.workflow(name="pausable", queue="fc_paused")
def pausable(ctx: pgflow.Context, n: int) -> int:
    return quick(n)
