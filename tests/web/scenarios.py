"""Runs in every state, made through the engine's procedures (no Python worker needed).

:func:`make_history` drives :class:`tests.support.sqlkit.Worker` the way a
worker would: a completed run with two steps, a run whose step failed twice
(two back-offs) before succeeding, a failed run with a traceback, a run
asleep, a run waiting for a signal with a signal in its mailbox and
published state, a parent with a child, a pending run held by a paused
queue, a cancelled run, and a run whose input is an XSS probe.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

import pgflow
from tests.support import sqlkit

XSS = "<img src=x onerror=alert(1)>"
WORKFLOWS = (("wf", "1", "default"), ("billing", "1", "payments"), ("xss", "1", "default"))
ERROR = {"type": "ValueError", "message": "card <declined>",
         "traceback": 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: <b>boom</b>'}


@dataclass
class History:
    completed: uuid.UUID
    retried: uuid.UUID
    failed: uuid.UUID
    sleeping: uuid.UUID
    waiting: uuid.UUID
    parent: uuid.UUID
    child: uuid.UUID
    held: uuid.UUID
    cancelled: uuid.UUID
    xss: uuid.UUID

    def all(self) -> list[uuid.UUID]:
        return list(vars(self).values())


def _claim(worker: sqlkit.Worker, run_id: uuid.UUID) -> sqlkit.Claim:
    claim = worker.claim_one()
    assert claim.run_id == run_id, "the scenario claims the run it just made ready"
    return claim


def make_history(dsn: str) -> History:
    worker = sqlkit.Worker(dsn, queues=("default", "payments"), workflows=WORKFLOWS)
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            return _make(c, worker)
    finally:
        worker.close()


def _make(c: psycopg.Connection[Any], w: sqlkit.Worker) -> History:
    start = sqlkit.start
    completed = start(c, "wf", ["ana"], key="order-1")
    cl = _claim(w, completed)
    w.complete_step(completed, cl.token, 0, "charge", output={"charge": "ch_1"})
    w.complete_step(completed, cl.token, 1, "ship", output=True)
    w.complete_run(completed, cl.token, output={"ok": True})

    retried = start(c, "wf", ["bob"], key="order-2")
    cl = _claim(w, retried)
    w.fail_step(retried, cl.token, 0, "charge", max_attempts=5)
    sqlkit.advance_time(c, timedelta(seconds=5))
    cl = _claim(w, retried)
    w.fail_step(retried, cl.token, 0, "charge", max_attempts=5)
    sqlkit.advance_time(c, timedelta(seconds=5))
    cl = _claim(w, retried)
    w.complete_step(retried, cl.token, 0, "charge", output="ch_2")
    w.complete_run(retried, cl.token, output="done")

    failed = pgflow.start(c, "billing", customer="c-1", queue="payments", key="bill-1",
                          concurrency_key="c-1")
    cl = _claim(w, failed)
    w.fail_step(failed, cl.token, 0, "charge", error=ERROR, retryable=False)
    w.fail_run(failed, cl.token, error=ERROR)

    sleeping = start(c, "wf", ["carl"])
    cl = _claim(w, sleeping)
    w.sleep(sleeping, cl.token, 0, "nap", duration=timedelta(hours=1))

    waiting = start(c, "wf", ["dora"])
    cl = _claim(w, waiting)
    c.execute("select pgflow.set_state(%s, %s, 'stage', %s)", (waiting, cl.token,
                                                             Jsonb("awaiting <review>")))
    c.execute("select pgflow.wait_signal(%s, %s, 0, 'approve', null)", (waiting, cl.token))
    c.execute("select pgflow.signal(%s, 'note', %s)", (waiting, Jsonb({"by": XSS})))

    parent = start(c, "wf", ["eve"])
    cl = _claim(w, parent)
    child = c.execute("select pgflow.start_child(%s, %s, 0, 'wf', %s, null, 'default', '1', null)",
                      (parent, cl.token, Jsonb(["kid"]))).fetchone()[0]
    w.complete_run(parent, cl.token, output=None)

    c.execute("select pgflow.pause_queue('payments')")
    held = pgflow.start(c, "billing", customer="c-2", queue="payments")

    cancelled = start(c, "wf", ["fay"], delay=timedelta(hours=2))
    c.execute("select pgflow.cancel(%s)", (cancelled,))

    xss = start(c, "xss", [XSS], key=XSS)
    return History(completed, retried, failed, sleeping, waiting, parent, child, held,
                   cancelled, xss)
