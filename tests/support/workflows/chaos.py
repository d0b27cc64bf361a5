"""Ten-call runs for the fault-injection tests: steps, short sleeps and a signal wait.

Every step body logs one row to ``public.effects`` (run, step, pid, time)
before it works for a few milliseconds, so a SIGKILL often lands inside a
body. The log write carries an execution id and is retried through a lost
connection (a restarted server, a terminated backend), so one execution is
one row, never zero or two: the invariant checker counts on that.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import psycopg

import pgflow
from tests.support.helpers import effects_app

SIGNAL = "go"
BODY_SECONDS = 0.05
LOG_RETRY_SECONDS = 30.0

# The durable calls of a run, by variant: seven steps, two sleeps, one signal wait.
LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("step", "step", "sleep", "step", "signal", "step", "step", "sleep", "step", "step"),
    ("step", "signal", "step", "step", "sleep", "step", "step", "step", "sleep", "step"),
)

_local = threading.local()

# PGFLOW_TEST_POLL_INTERVAL sets the claim loop's poll (seconds) of a worker process that
# imports this module. An hour leaves NOTIFY the only way an idle worker picks a run up
# within a test, so a test can check that LISTEN works without timing the pick-up.
if "PGFLOW_TEST_POLL_INTERVAL" in os.environ:
    import pgflow.worker

    _defaults = pgflow.worker.Worker.__init__.__kwdefaults__
    assert "poll_interval" in _defaults, "pgflow.Worker takes no poll_interval keyword"
    _defaults["poll_interval"] = float(os.environ["PGFLOW_TEST_POLL_INTERVAL"])


def journal(variant: int) -> list[tuple[str, str]]:
    """The journal a run of ``variant`` ends with: ``[(kind, name), ...]``."""
    names = {"step": None, "sleep": "sleep", "signal": SIGNAL}
    return [(kind, names[kind] or f"s{seq}") for seq, kind in enumerate(LAYOUTS[variant])]


def expected_output(n: int, variant: int) -> dict[str, Any]:
    steps = [f"{name}:{n}" for kind, name in journal(variant) if kind == "step"]
    return {"steps": steps, "signal": {"go": n}}


def record(run_id: str, step: str) -> None:
    """Log one execution of ``step``: exactly one row, whatever happens to the connection."""
    exec_id = uuid.uuid4()
    deadline = time.monotonic() + LOG_RETRY_SECONDS
    while True:
        try:
            conn = getattr(_local, "conn", None)
            if conn is None or conn.closed:
                conn = _local.conn = psycopg.connect(
                    os.environ["PGFLOW_TEST_EFFECTS_DSN"], autocommit=True, connect_timeout=5,
                    application_name=effects_app(os.getpid()))
            conn.execute("insert into public.effects (run_id, step, pid, exec_id)"
                         " values (%s, %s, %s, %s) on conflict (exec_id) do nothing",
                         (run_id, step, os.getpid(), exec_id))
            return
        except psycopg.OperationalError:
            _local.conn = None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def body(run_id: str, name: str, n: int) -> str:
    record(run_id, name)
    time.sleep(BODY_SECONDS)
    return f"{name}:{n}"


@pgflow.workflow(name="chaos")
def chaos(ctx: pgflow.Context, n: int, variant: int, nap: float) -> dict[str, Any]:
    run_id = str(ctx.workflow_id)
    results: list[str] = []
    got = None
    for kind, name in journal(variant):
        if kind == "step":
            results.append(ctx.step(name, body, run_id, name, n))
        elif kind == "sleep":
            ctx.sleep(nap)
        else:
            got = ctx.wait_for_signal(SIGNAL)
    return {"steps": results, "signal": got}


@pgflow.workflow(name="ping")
def ping(ctx: pgflow.Context, n: int) -> str:
    """One step: how fast an idle worker picks up a new run."""
    return ctx.step("pong", body, str(ctx.workflow_id), "pong", n)
