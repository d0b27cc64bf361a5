"""A side-effect log for test steps: each real execution of a step body adds a row.

Counting rows tells how often a step body actually ran, which is what
"never runs again" and "runs exactly once" are about.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg

from tests.support.helpers import effects_app

_local = threading.local()


def _conn() -> psycopg.Connection[Any]:
    dsn = os.environ["PGFLOW_TEST_EFFECTS_DSN"]
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or getattr(_local, "dsn", None) != dsn:
        conn = psycopg.connect(dsn, autocommit=True, application_name=effects_app(os.getpid()))
        _local.conn, _local.dsn = conn, dsn
    return conn


def record(run_id: str, step: str) -> int:
    """Log one execution of ``step`` in ``run_id``; return how many there were so far."""
    try:
        return _record(run_id, step)
    except psycopg.OperationalError:  # the test terminated our connection: once more
        _local.conn = None
        return _record(run_id, step)


def _record(run_id: str, step: str) -> int:
    row = _conn().execute(
        "with ins as (insert into public.effects (run_id, step, pid) values (%s, %s, %s))"
        " select count(*) + 1 from public.effects where run_id = %s and step = %s",
        (run_id, step, os.getpid(), run_id, step)).fetchone()
    assert row is not None
    return int(row[0])


def executions(run_id: str, step: str) -> int:
    """How many executions of ``step`` in ``run_id`` are logged so far."""
    row = _conn().execute("select count(*) from public.effects where run_id = %s and step = %s",
                          (run_id, step)).fetchone()
    assert row is not None
    return int(row[0])
