"""Two worker processes racing over the same queue."""

from __future__ import annotations

import pytest

import pgflow
from tests.support.helpers import wait_for, wait_registered
from tests.support.workflows.simple import two_steps

pytestmark = pytest.mark.slow

RUNS = 1000


def test_two_workers_drain_1000_runs_each_exactly_once(dsn, conn, effects, processes):
    workers = [processes.worker(dsn, "tests.support.workflows.simple", concurrency=8) for _ in range(2)]
    wait_registered(conn, 2)  # both serve before the runs exist: neither starts late to the race
    with conn.transaction():
        run_ids = [pgflow.start(conn, two_steps, n) for n in range(RUNS)]

    def completed() -> bool:
        row = conn.execute("select count(*) from pgflow.runs where status = 'completed'").fetchone()
        return row[0] == RUNS

    wait_for(completed, timeout=180, interval=0.5, what=f"{RUNS} runs completed")

    outputs = dict(conn.execute("select id, output from pgflow.runs").fetchall())
    assert outputs == {rid: (n + 1) * 2 for n, rid in enumerate(run_ids)}
    # every step body ran once, and was checkpointed once
    duplicates = conn.execute(
        "select run_id, step, count(*) from public.effects group by 1, 2 having count(*) <> 1"
    ).fetchall()
    assert duplicates == []
    assert effects.count() == 2 * RUNS
    assert conn.execute("select count(*) from pgflow.steps").fetchone()[0] == 2 * RUNS
    # both workers took part
    pids = {row[0] for row in conn.execute("select distinct pid from public.effects")}
    assert pids == {w.pid for w in workers}
