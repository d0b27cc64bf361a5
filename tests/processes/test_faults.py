"""Database-side faults while a worker is mid-step."""

from __future__ import annotations

import signal

import pytest

import pgflow
from tests.support import invariants
from tests.support.helpers import wait_for, wait_registered, wait_status
from tests.support.workflows.provisioning import provision_order

pytestmark = pytest.mark.slow
PROVISIONING = [("step", "charge_card"), ("step", "create_account"), ("step", "send_welcome")]


def test_worker_connections_terminated_mid_step(dsn, conn, effects, processes):
    worker = processes.worker(dsn, "tests.support.workflows.provisioning",
                              extra_env={"PGFLOW_TEST_BLOCK_SECONDS": "1.5"})
    wait_registered(conn, 1)
    run_id = pgflow.start(conn, provision_order, "cust-t", 100)
    wait_for(lambda: effects.count(run_id, "create_account") == 1, timeout=60,
             what="step 2 running")

    terminated = conn.execute(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity"
        " where datname = current_database() and pid <> pg_backend_pid()"
        "   and backend_type = 'client backend'").fetchone()[0]
    assert terminated >= 2  # the worker's listener and pool connections (and effects log)

    wait_status(conn, run_id, "completed", timeout=60)
    assert worker.poll() is None, processes.log_of(worker)
    counts = effects.per_step(run_id)
    # checkpointed steps never ran again; step 2 ran once or twice (at least once)
    assert counts["charge_card"] == 1 and counts["send_welcome"] == 1, counts
    assert counts["create_account"] in (1, 2), counts
    steps = pgflow.get(conn, run_id).steps
    assert [(s.name, s.status) for s in steps] == [
        ("charge_card", "completed"), ("create_account", "completed"),
        ("send_welcome", "completed")]
    invariants.check(conn, expected_runs=1, journal=lambda _: PROVISIONING,
                     disturbed=invariants.Disturbed(cut_off={worker.pid}))


def test_a_frozen_worker_is_declared_dead_and_its_late_reports_are_refused(dsn, conn, effects,
                                                                           processes):
    frozen = processes.worker(dsn, "tests.support.workflows.provisioning",
                              extra_env={"PGFLOW_TEST_BLOCK_SECONDS": "3"})
    wait_registered(conn, 1)
    run_id = pgflow.start(conn, provision_order, "cust-f", 300)
    wait_for(lambda: effects.count(run_id, "create_account") == 1, timeout=60,
             what="step 2 running")
    frozen.send_signal(signal.SIGSTOP)  # alive, connected, holding its lock: but silent

    # A survivor that declares a worker dead after 2 s without a heartbeat takes the run over.
    processes.worker(dsn, "tests.support.workflows.provisioning", extra_args=("--stale-after", "2"))
    wait_status(conn, run_id, "completed", timeout=60)
    frozen.send_signal(signal.SIGCONT)  # its step finishes, and it tries to checkpoint it

    wait_for(lambda: "abandoned" in processes.log_of(frozen), timeout=60,
             what="the frozen worker's report refused")
    assert "lease lost" in processes.log_of(frozen)
    assert frozen.poll() is None, "it lives on, re-registered under a new id"
    steps = pgflow.get(conn, run_id).steps
    assert [(s.name, s.status, s.attempts) for s in steps] == [
        ("charge_card", "completed", 1), ("create_account", "completed", 1),
        ("send_welcome", "completed", 1)]
    # step 2 ran in both workers (it was never checkpointed by the frozen one); 1 and 3 once
    assert effects.per_step(run_id) == {"charge_card": 1, "create_account": 2, "send_welcome": 1}
    invariants.check(conn, expected_runs=1, journal=lambda _: PROVISIONING,
                     disturbed=invariants.Disturbed(frozen={frozen.pid}))
