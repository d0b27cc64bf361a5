"""Group commit in a real worker: concurrent runs share their checkpoints' transactions."""

from __future__ import annotations

import pgflow
from tests.helpers import wait_for
from tests.workflows.simple import two_steps

RUNS = 300


def test_concurrent_runs_share_report_batches_and_each_is_recorded_once(conn, effects,
                                                                        inprocess_worker):
    with conn.transaction():
        run_ids = [pgflow.start(conn, two_steps, n) for n in range(RUNS)]
    worker = inprocess_worker.start([two_steps], concurrency=32)

    def all_completed() -> bool:
        row = conn.execute("select count(*) from pgflow.runs where status = 'completed'").fetchone()
        return row[0] == RUNS

    wait_for(all_completed, timeout=120, interval=0.2, what=f"{RUNS} runs completed")
    outputs = dict(conn.execute("select id, output from pgflow.runs").fetchall())
    assert outputs == {rid: (n + 1) * 2 for n, rid in enumerate(run_ids)}
    journal = conn.execute("select run_id, seq, count(*) from pgflow.steps"
                           " group by 1, 2 having count(*) <> 1").fetchall()
    assert journal == []
    assert conn.execute("select count(*) from pgflow.steps").fetchone()[0] == 2 * RUNS
    assert effects.count() == 2 * RUNS  # every step body ran once

    reporter = worker._reporter
    # Two reports a run (the first step's checkpoint; the completion carrying the second).
    assert reporter.reports == 2 * RUNS
    # 32 runs in flight: reports wait for the batch on its way and leave together.
    assert reporter.batches < reporter.reports / 2, (reporter.batches, reporter.reports)
