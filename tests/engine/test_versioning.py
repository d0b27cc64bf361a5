"""Deploying changed workflow code: version routing, patches, the determinism guard, replay checks."""

from __future__ import annotations

import signal
from datetime import timedelta

import pytest

import pgflow
from pgflow.testing import advance_time, check_replay, check_replays
from tests.support.helpers import wait_for, wait_registered, wait_status
from tests.support.workflows.effects import record

DEPLOY = "tests.support.workflows.deploy."


def _replace(processes, conn, old, dsn, module):
    """A deploy: the old worker drains and exits, a worker with the new code starts."""
    old.send_signal(signal.SIGTERM)
    assert old.wait(30) == 0
    new = processes.worker(dsn, DEPLOY + module)
    wait_registered(conn, 1)
    return new


@pytest.mark.slow
def test_a_patch_keeps_runs_started_on_old_code_on_their_old_branch(dsn, conn, effects,
                                                                      processes):
    worker = processes.worker(dsn, DEPLOY + "pricing_v1")
    wait_registered(conn, 1)
    old_run = pgflow.start(conn, "pricing", "order-old")
    wait_status(conn, old_run, "sleeping")

    _replace(processes, conn, worker, dsn, "pricing_v1_patched")
    new_run = pgflow.start(conn, "pricing", "order-new")
    wait_status(conn, new_run, "sleeping")
    assert conn.execute("select patch, runs from pgflow.patches_in_use").fetchall() == [
        ("new-pricing", 1)]

    advance_time(conn, timedelta(hours=2))
    assert pgflow.result(conn, old_run, timeout=60) == "charged 100"
    assert pgflow.result(conn, new_run, timeout=60) == "charged 90"
    assert effects.per_step("order-old") == {"old_price": 1, "charge": 1}
    assert effects.per_step("order-new") == {"new_price": 1, "charge": 1}


@pytest.mark.slow
def test_reordered_steps_fail_the_run_and_retry_completes_it_on_fixed_code(dsn, conn, effects,
                                                                           processes):
    worker = processes.worker(dsn, DEPLOY + "reorder_ab")
    wait_registered(conn, 1)
    run_id = pgflow.start(conn, "reorder")
    wait_status(conn, run_id, "sleeping")

    worker = _replace(processes, conn, worker, dsn, "reorder_ba")  # the broken deploy
    advance_time(conn, timedelta(hours=2))
    with pytest.raises(pgflow.WorkflowFailed) as info:
        pgflow.result(conn, run_id, timeout=60)
    assert info.value.error_type == "pgflow.errors.NonDeterminismError"
    assert "step 'step_b' in the code but step 'step_a' in the journal" in info.value.message
    assert effects.per_step(run_id) == {"step_a": 1, "step_b": 1}  # nothing ran on the diverged path

    _replace(processes, conn, worker, dsn, "reorder_ab")  # the fix: the original code again
    pgflow.retry(conn, run_id)
    assert pgflow.result(conn, run_id, timeout=60) == "abc"
    assert effects.per_step(run_id) == {"step_a": 1, "step_b": 1, "step_c": 1}


@pytest.mark.slow
def test_each_worker_claims_only_its_own_version(dsn, conn, effects, processes):
    workers = {"1": processes.worker(dsn, DEPLOY + "versioned_v1"),
               "2": processes.worker(dsn, DEPLOY + "versioned_v2")}
    wait_registered(conn, 2)
    runs = {version: [conn.execute("select pgflow.start('versioned', '[]', version => %s)",
                                   (version,)).fetchone()[0] for _ in range(10)]
            for version in ("1", "2")}
    for version, ids in runs.items():
        for run_id in ids:
            assert pgflow.result(conn, run_id, timeout=60) == workers[version].pid
            assert effects.per_step(run_id) == {f"v{version}": 1}
    # with the version-2 worker gone, new version-2 runs are marked as unserved, not stolen
    workers["2"].send_signal(signal.SIGTERM)
    workers["2"].wait(30)
    wait_for(lambda: conn.execute("select count(*) from pgflow.workers").fetchone()[0] == 1)
    stranded = conn.execute("select pgflow.start('versioned', '[]', version => '2')").fetchone()[0]
    assert conn.execute("select id from pgflow.unserved_runs").fetchall() == [(stranded,)]
    assert pgflow.get(conn, stranded).status == "pending"


# --- replay checks (in-process) -------------------------------------------------------------


@pgflow.step
def check_a(run_id: str) -> str:
    record(run_id, "check_a")
    return "a"


@pgflow.step
def check_b(run_id: str) -> str:
    record(run_id, "check_b")
    return "b"


@pgflow.workflow(name="replay_check")
def replay_check(ctx: pgflow.Context, hours: int) -> str:
    run_id = str(ctx.workflow_id)
    out = check_a(run_id) + check_b(run_id)
    ctx.sleep(timedelta(hours=hours))
    return out


def _alternative(body) -> pgflow.Workflow:
    """Other code under the same name and version (not registered: a candidate deploy)."""
    return pgflow.Workflow(body, name="replay_check", version="1", queue="default", retry=None,
                           timeout=None)


def _reordered(ctx: pgflow.Context, hours: int) -> str:
    run_id = str(ctx.workflow_id)
    out = check_b(run_id) + check_a(run_id)
    ctx.sleep(timedelta(hours=hours))
    return out


def _patched(ctx: pgflow.Context, hours: int) -> str:
    run_id = str(ctx.workflow_id)
    if ctx.patched("greeting"):
        ctx.step("greet", lambda: "hi")
    out = check_a(run_id) + check_b(run_id)
    ctx.sleep(timedelta(hours=hours))
    return out


def _deprecated(ctx: pgflow.Context, hours: int) -> str:
    run_id = str(ctx.workflow_id)
    ctx.deprecate_patch("greeting")
    ctx.step("greet", lambda: "hi")
    out = check_a(run_id) + check_b(run_id)
    ctx.sleep(timedelta(hours=hours))
    return out


def test_check_replay_tells_which_deploys_are_safe(conn, effects, inprocess_worker):
    inprocess_worker.start([replay_check])
    sleeping = pgflow.start(conn, replay_check, 1)
    finished = pgflow.start(conn, replay_check, 0)
    assert pgflow.result(conn, finished, timeout=60) == "ab"
    wait_status(conn, sleeping, "sleeping")
    ran_before = effects.count()

    same = check_replay(conn, sleeping)
    assert (same.ok, same.replayed, same.journal) == (True, 2, 3)
    assert "#2" in same.next_call
    assert check_replay(conn, finished).ok

    reordered = check_replay(conn, sleeping, _alternative(_reordered))
    assert not reordered.ok and "'check_b' in the code but step 'check_a'" in reordered.error
    assert "does NOT replay" in str(reordered)
    assert check_replay(conn, sleeping, _alternative(_patched)).ok  # old runs: old branch

    results = check_replays(conn, _alternative(_reordered))
    assert [(r.run_id, r.ok) for r in results] == [(sleeping, False)]  # finished runs skipped
    assert effects.count() == ran_before  # checking ran nothing
    with pytest.raises(pgflow.RunNotFound):
        check_replay(conn, "00000000-0000-0000-0000-000000000000")


def test_patched_records_a_marker_and_deprecate_patch_retires_it(conn, inprocess_worker):
    patched = _alternative(_patched)
    inprocess_worker.start([patched])
    run_id = pgflow.start(conn, "replay_check", 1)
    wait_status(conn, run_id, "sleeping")
    assert [(s.kind, s.name) for s in pgflow.get(conn, run_id).steps][:2] == [
        ("patch", "greeting"), ("step", "greet")]
    assert conn.execute("select patch, runs from pgflow.patches_in_use").fetchall() == [
        ("greeting", 1)]
    # the next deploy deprecates the patch: runs with the marker still replay
    assert check_replay(conn, run_id, _alternative(_deprecated)).ok
    # and a version without any call about the patch would not
    without = check_replay(conn, run_id, _alternative(_reordered))
    assert not without.ok and "no longer calls ctx.patched" in without.error
