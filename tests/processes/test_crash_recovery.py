"""A worker killed mid-step: finished steps never run again, the run completes."""

from __future__ import annotations

import signal
import time

import pytest

import pgflow
from tests.support.helpers import wait_for, wait_registered, wait_status
from tests.support.workflows.provisioning import provision_order

MODULE = "tests.support.workflows.provisioning"
pytestmark = pytest.mark.slow


def test_sigkill_in_step_two_then_a_new_worker_resumes(dsn, conn, effects, processes):
    first = processes.worker(dsn, MODULE)
    wait_registered(conn, 1)
    run_id = pgflow.start(conn, provision_order, "cust-1", 1299)

    wait_for(lambda: effects.count(run_id, "create_account") == 1, timeout=60,
             what="step 2 running")
    first.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL

    processes.worker(dsn, MODULE)
    wait_status(conn, run_id, "completed", timeout=60)

    assert effects.per_step(run_id) == {"charge_card": 1, "create_account": 2, "send_welcome": 1}
    run = pgflow.get(conn, run_id)
    assert [(s.name, s.status) for s in run.steps] == [
        ("charge_card", "completed"), ("create_account", "completed"),
        ("send_welcome", "completed")]
    assert run.output == {"charge": "ch_1299", "account": "acct_cust-1"}


def test_sigkill_with_two_workers_the_survivor_takes_over(dsn, conn, effects, processes):
    # Nobody is declared dead for silence within the test (an hour): the survivor can only
    # take over because the killed worker's liveness lock went with its connection.
    workers = [processes.worker(dsn, MODULE, extra_args=("--stale-after", "3600"))
               for _ in range(2)]
    wait_registered(conn, 2)
    run_id = pgflow.start(conn, provision_order, "cust-2", 500)

    wait_for(lambda: effects.count(run_id, "create_account") == 1, timeout=60,
             what="step 2 running")
    pid = conn.execute("select pid from public.effects where run_id = %s and step = 'create_account'",
                       (str(run_id),)).fetchone()[0]
    victim = next(w for w in workers if w.pid == pid)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)

    wait_status(conn, run_id, "completed", timeout=60)  # bounds a hang, not a speed
    recovered_in = time.monotonic() - killed_at
    print(f"survivor completed the run {recovered_in:.2f}s after the kill")
    assert effects.per_step(run_id) == {"charge_card": 1, "create_account": 2, "send_welcome": 1}
    survivor = next(w for w in workers if w is not victim)
    assert survivor.poll() is None, "the survivor kept running"
    pids = {row[0] for row in conn.execute(
        "select pid from public.effects where run_id = %s and at > (select at from public.effects"
        " where run_id = %s and step = 'create_account' order by at limit 1)",
        (str(run_id), str(run_id)))}
    assert pids == {survivor.pid}


def test_sigterm_during_a_step_finishes_it_and_exits_zero(dsn, conn, effects, processes):
    worker = processes.worker(dsn, MODULE, extra_env={"PGFLOW_TEST_BLOCK_SECONDS": "2"})
    wait_registered(conn, 1)
    run_id = pgflow.start(conn, provision_order, "cust-3", 700)

    wait_for(lambda: effects.count(run_id, "create_account") == 1, timeout=60,
             what="step 2 running")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, processes.log_of(worker)

    # The interrupted step finished and was checkpointed; the run was given back.
    run = pgflow.get(conn, run_id)
    assert [(s.name, s.status) for s in run.steps] == [
        ("charge_card", "completed"), ("create_account", "completed")]
    assert run.status == "pending"
    assert conn.execute("select count(*) from pgflow.workers").fetchone()[0] == 0

    processes.worker(dsn, MODULE)
    wait_status(conn, run_id, "completed", timeout=60)
    assert effects.per_step(run_id) == {"charge_card": 1, "create_account": 1, "send_welcome": 1}
