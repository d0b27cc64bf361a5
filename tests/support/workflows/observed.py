"""Workflows whose metrics and logs tests/processes/test_observability.py reads.

* ``obs_good`` (queue ``obs``): two steps, ``obs_charge`` (logs ``charging <order>``
  on the ``app`` logger) and ``obs_ship``; completes.
* ``obs_bad`` (queue ``obs``): one step, ``obs_explode``, that logs ``exploding
  <order>`` and raises, with ``Retry(max_attempts=2)`` and a short back-off: the
  run ends failed after exactly two attempts.
* ``obs_waiter`` (queue ``obs_wait``): waits for the signal ``go``, then one step.
* ``obs_meeter`` (queue ``obs_multi``): one step, ``obs_meet``, that logs its
  execution in ``public.effects`` (with the worker's pid), then waits until
  executions of two different processes are logged (30 s at most). Two
  workers of concurrency 1 each therefore both execute at least one run: the
  first run claimed holds its worker until the other worker claims a second.
"""

from __future__ import annotations

import logging
import os
import time

import psycopg

import pgflow
from tests.support.helpers import EFFECTS_DSN_ENV
from tests.support.workflows.effects import record

MEET_TIMEOUT = 30.0  # seconds obs_meet waits for another process (bounds a hang)

app_log = logging.getLogger("app")


class Exploded(Exception):
    """What ``obs_explode`` raises, every attempt."""


@pgflow.step(name="obs_charge")
def charge(order: str) -> str:
    app_log.info("charging %s", order)
    return f"charged {order}"


@pgflow.step(name="obs_ship")
def ship(order: str) -> str:
    return f"shipped {order}"


@pgflow.step(name="obs_explode",
             retry=pgflow.Retry(max_attempts=2, initial_interval=0.05, max_interval=0.05))
def explode(order: str) -> str:
    app_log.info("exploding %s", order)
    raise Exploded(f"no luck for {order}")


@pgflow.workflow(name="obs_good", queue="obs")
def good(ctx: pgflow.Context, order: str) -> str:
    charge(order)
    return ship(order)


@pgflow.workflow(name="obs_bad", queue="obs")
def bad(ctx: pgflow.Context, order: str) -> str:
    return explode(order)


@pgflow.step(name="obs_after_signal")
def after_signal(payload: str) -> str:
    return f"got {payload}"


@pgflow.workflow(name="obs_waiter", queue="obs_wait")
def waiter(ctx: pgflow.Context) -> str:
    return after_signal(ctx.wait_for_signal("go"))


@pgflow.step(name="obs_meet")
def meet(run_id: str) -> int:
    """Log this execution, then wait for one logged by another process; returns our pid."""
    record(run_id, "obs_meet")
    with psycopg.connect(os.environ[EFFECTS_DSN_ENV], autocommit=True) as conn:
        deadline = time.monotonic() + MEET_TIMEOUT
        while time.monotonic() < deadline:
            row = conn.execute("select count(distinct pid) from public.effects"
                               " where step = 'obs_meet'").fetchone()
            if row is not None and row[0] >= 2:
                break
            time.sleep(0.02)
    return os.getpid()


@pgflow.workflow(name="obs_meeter", queue="obs_multi")
def meeter(ctx: pgflow.Context) -> int:
    return meet(str(ctx.workflow_id))
