"""Traces across a crash: a worker killed with SIGKILL mid-run, another replays the run.

The workflow (``tests/support/workflows/traced.py``) exports each ended span
to a file at once. The first worker runs ``reserve`` (checkpointed) and is
killed inside ``ship``; the second replays ``reserve`` from its checkpoint and
runs ``ship``. The trace then holds exactly one ``reserve`` span (a replay
makes none) and one ``ship`` span (the killed attempt never ended), all in the
trace the run was started with, each under a ``pgflow.run`` span of the
worker that ran it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

import pgflow
from tests.support.helpers import wait_for, wait_registered
from tests.support.workflows.traced import GATE_ENV, SPANS_ENV

pytestmark = pytest.mark.slow

MODULE = "tests.support.workflows.traced"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_status(conn: Any, run_id: Any, name: str) -> str | None:
    row = conn.execute("select status from pgflow.steps where run_id = %s and name = %s",
                       (run_id, name)).fetchone()
    return row[0] if row else None


def test_a_replay_after_sigkill_emits_no_span_for_the_checkpointed_step(
        dsn, conn, processes, tmp_path):
    spans_file, gate = tmp_path / "spans.jsonl", tmp_path / "gate"
    env = {SPANS_ENV: str(spans_file), GATE_ENV: str(gate)}
    first = processes.worker(dsn, MODULE, extra_env=env)
    wait_registered(conn, 1)
    run_id = conn.execute("select pgflow.start_run('traced_shipping', '[\"o-1\"]'::jsonb,"
                          " traceparent => %s)", (TRACEPARENT,)).fetchone()[0]

    # reserve is checkpointed when ship begins (its checkpoint is sent before ship acts).
    wait_for(lambda: step_status(conn, run_id, "reserve") == "completed", timeout=60,
             what="reserve checkpointed")
    wait_for(lambda: any(s["name"] == "pgflow.step reserve" for s in read_spans(spans_file)),
             timeout=60, what="the reserve span exported")
    first.send_signal(signal.SIGKILL)
    first.wait(30)

    gate.touch()
    processes.worker(dsn, MODULE, extra_env=env)
    assert pgflow.result(conn, run_id, timeout=120) == "shipped (reserved o-1)"
    wait_for(lambda: any(s["name"] == "pgflow.run traced_shipping"
                         for s in read_spans(spans_file)), timeout=60, what="the run span")

    spans = read_spans(spans_file)
    names = sorted(s["name"] for s in spans)
    # The killed worker's run span and its ship span never ended: never exported.
    assert names == ["pgflow.run traced_shipping", "pgflow.step reserve", "pgflow.step ship"]
    assert {s["trace_id"] for s in spans} == {TRACE_ID}
    by_name = {s["name"]: s for s in spans}
    run, reserve, ship = (by_name["pgflow.run traced_shipping"], by_name["pgflow.step reserve"],
                          by_name["pgflow.step ship"])
    assert reserve["pid"] == first.pid and ship["pid"] == run["pid"] != first.pid
    assert ship["parent_id"] == run["span_id"]
    assert run["parent_id"] == TRACEPARENT.split("-")[2]  # under the caller's span
    assert reserve["parent_id"] != run["span_id"]  # under the killed worker's run span
    assert run["attributes"]["pgflow.run_id"] == str(run_id)
    assert run["attributes"]["pgflow.outcome"] == "completed"
