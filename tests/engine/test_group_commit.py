"""Group commit in a real worker: concurrent runs share their checkpoints' transactions."""

from __future__ import annotations

import psycopg

import pgflow
from pgflow.reporter import Reporter
from tests.support.helpers import wait_for
from tests.support.workflows.simple import two_steps

RUNS = 300
CONCURRENCY = 32


def test_concurrent_runs_share_report_batches_and_each_is_recorded_once(dsn, conn, effects,
                                                                        inprocess_worker,
                                                                        monkeypatch):
    submitted = []  # every report handed to a reporter of this process
    submit = Reporter._submit

    async def counted(self, report):
        submitted.append(report)
        return await submit(self, report)

    monkeypatch.setattr(Reporter, "_submit", counted)
    with psycopg.connect(dsn) as blocker:
        # No checkpoint can commit until the lock goes: the first reports of the runs in
        # flight pile up behind the batches already on their way, whatever the speed.
        blocker.execute("lock table pgflow.steps in share mode")
        with conn.transaction():
            run_ids = [pgflow.start(conn, two_steps, n) for n in range(RUNS)]
        worker = inprocess_worker.start([two_steps], concurrency=CONCURRENCY)
        wait_for(lambda: len(submitted) >= CONCURRENCY, timeout=60,
                 what=f"the first checkpoints of {CONCURRENCY} runs submitted")
        assert conn.execute("select count(*) from pgflow.steps").fetchone()[0] == 0
        blocker.rollback()

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
    assert reporter.reports == len(submitted) == 2 * RUNS
    # The first checkpoints held up by the lock left in at most three batches (at most two
    # on their way, then every report that came meanwhile, together); any other report
    # took at most one batch of its own. How much more they shared is reported, not bounded.
    print(f"{reporter.reports} reports in {reporter.batches} batches")
    assert reporter.batches <= reporter.reports - (CONCURRENCY - 3), (
        reporter.batches, reporter.reports)
