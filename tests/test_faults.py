"""Database-side faults while a worker is mid-step."""

from __future__ import annotations

import pytest

import pgflow
from tests.helpers import wait_for, wait_registered, wait_status
from tests.workflows.provisioning import provision_order

pytestmark = pytest.mark.slow


def test_worker_connections_terminated_mid_step(dsn, conn, effects, processes):
    worker = processes.worker(dsn, "tests.workflows.provisioning",
                              extra_env={"PGFLOW_TEST_BLOCK_SECONDS": "1.5"})
    wait_registered(conn, 1)
    run_id = pgflow.start(conn, provision_order, "cust-t", 100)
    wait_for(lambda: effects.count(run_id, "create_account") == 1, what="step 2 running")

    terminated = conn.execute(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity"
        " where datname = current_database() and pid <> pg_backend_pid()"
        "   and backend_type = 'client backend'").fetchone()[0]
    assert terminated >= 2  # the worker's listener and pool connections (and effects log)

    wait_status(conn, run_id, "completed", timeout=30)
    assert worker.poll() is None, processes.log_of(worker)
    counts = effects.per_step(run_id)
    # checkpointed steps never ran again; step 2 ran once or twice (at least once)
    assert counts["charge_card"] == 1 and counts["send_welcome"] == 1, counts
    assert counts["create_account"] in (1, 2), counts
    steps = pgflow.get(conn, run_id).steps
    assert [(s.name, s.status) for s in steps] == [
        ("charge_card", "completed"), ("create_account", "completed"),
        ("send_welcome", "completed")]
