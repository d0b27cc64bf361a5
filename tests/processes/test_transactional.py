"""Transactional steps with real worker processes: SIGKILL at random points, a frozen worker.

The step books an order: one row ``(run_id, worker_pid)`` in
``public.orders_booked``, a table without a unique constraint, inserted on the
connection of the transaction that also writes the step's checkpoint (see
``tests/support/workflows/transactional.py``). Every execution also logs, on an
autocommit connection of its own, that it began and that its insert was done;
so the tests show executions whose insert was rolled back, and prove that
whatever was killed or frozen, each run's booking committed exactly once.

Each test prints its figures past pytest's capture.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

import pgflow
from tests.support import invariants
from tests.support.helpers import Processes, wait_for, wait_registered, wait_status
from tests.support.workflows import transactional as tx

MODULE = "tests.support.workflows.transactional"
pytestmark = pytest.mark.slow
REPORT_LABEL = "transactional"  # the prefix of the figures `report` prints

CONCURRENCY = 2
MAX_KILLS = 30
KILL_FOR = 40.0  # seconds of killing at most; then the last worker finishes in peace
RANDOM_LIFE = (0.05, 0.4)  # seconds a worker works before its kill, at random...
RUNS_A_LIFE = 20  # ...and never more than runs // RUNS_A_LIFE runs completed (at least 2),
# whatever the machine's speed: a fast one is killed as often per run as a slow one
SETTLE_TIMEOUT = 120.0  # seconds for the last worker to finish: bounds a hang, not a speed


def _one(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def _completed(conn: psycopg.Connection[Any]) -> int:
    return int(_one(conn, "select count(*) from pgflow.runs where status = 'completed'"))


def _began(conn: psycopg.Connection[Any], pid: int) -> bool:
    return bool(_one(conn, "select exists (select 1 from public.effects where pid = %s)", (pid,)))


def _committed_unfinished(conn: psycopg.Connection[Any], pid: int) -> int:
    """Runs whose booking ``pid`` committed and which have not completed (yet)."""
    return int(_one(conn, """
        select count(*) from public.orders_booked o join pgflow.runs r on r.id::text = o.run_id
        where o.worker_pid = %s and r.status <> 'completed'""", (pid,)))


def _orphans(conn: psycopg.Connection[Any], pid: int) -> int:
    """Runs still leased to a worker other than ``pid`` (a killed one: not recovered yet)."""
    return int(_one(conn, """
        select count(*) from pgflow.runs r
        where r.status = 'running' and not exists (
            select 1 from pgflow.workers w where w.id = r.lease_owner and w.pid = %s)""", (pid,)))


def _open_inserts(conn: psycopg.Connection[Any], pid: int) -> int:
    """Inserts ``pid`` has done whose row is not committed (yet): its transaction is open."""
    return int(_one(conn, """
        select count(*) from public.tx_marks m
        where m.pid = %s and m.phase = 'inserted'
          and not exists (select 1 from public.orders_booked o
                          where o.run_id = m.run_id and o.worker_pid = m.pid)""", (pid,)))


@dataclass
class Killing:
    kills: int = 0
    aimed: int = 0  # kills aimed at a transaction seen open (insert done, no commit)
    aimed_after: int = 0  # kills aimed at a run seen booked (committed) and not completed
    seconds: float = 0.0


def _kill_at_random(dsn: str, conn: psycopg.Connection[Any], processes: Processes, runs: int,
                    disturbed: invariants.Disturbed, rng: random.Random) -> Killing:
    """Start a worker, let it work, SIGKILL it; again, until the runs are done or the limits.

    One kill in four is aimed inside the transaction: it waits until the worker has a
    booking inserted and not committed, then kills at once, so some executions surely
    die between their insert and their commit. One in four is aimed after the commit:
    at a run the worker has booked and not yet completed. The others come after a
    random time (or a few runs completed), one of them only once the worker has
    recovered the runs of the workers killed before it, so re-executions die too; they
    fall where they fall: before the insert, inside the step, between it and the commit,
    after the commit.
    """
    killing = Killing()
    cap = max(2, runs // RUNS_A_LIFE)
    started = time.monotonic()
    while (killing.kills < MAX_KILLS and time.monotonic() - started < KILL_FOR
           and _completed(conn) < runs):
        worker = processes.worker(dsn, MODULE, concurrency=CONCURRENCY)
        wait_for(lambda w=worker: _began(conn, w.pid) or _completed(conn) == runs,
                 timeout=60, what="the new worker executing a step")
        if not _began(conn, worker.pid):
            break  # nothing left to kill it in; it stays, and is the last worker
        kind = killing.kills % 4
        try:
            if kind == 0:
                wait_for(lambda w=worker: _open_inserts(conn, w.pid) > 0, timeout=15,
                         interval=0.002, what="a booking inserted and not committed")
                killing.aimed += 1
            elif kind == 1:
                wait_for(lambda w=worker: _committed_unfinished(conn, w.pid) > 0, timeout=15,
                         interval=0.002, what="a run booked and not completed")
                killing.aimed_after += 1
            else:
                if kind == 3:  # its heartbeat recovers the killed workers' runs
                    wait_for(lambda w=worker: _orphans(conn, w.pid) == 0, timeout=30,
                             what="the killed workers' runs recovered")
                until = time.monotonic() + rng.uniform(*RANDOM_LIFE)
                done = _completed(conn) + rng.randint(1, cap)
                wait_for(lambda u=until, d=done: time.monotonic() > u or _completed(conn) >= d,
                         timeout=30, interval=0.005, what="the worker's life")
        except AssertionError:
            pass  # the worker found no more work: killed all the same
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(10) == -signal.SIGKILL
        disturbed.kill(conn, worker.pid)
        killing.kills += 1
    killing.seconds = time.monotonic() - started
    return killing


def _check_exactly_once(conn: psycopg.Connection[Any], run_ids: list[uuid.UUID], step: str,
                        disturbed: invariants.Disturbed) -> dict[str, int]:
    """Assert every run completed with exactly one booking; return the figures."""
    ids = [str(r) for r in run_ids]
    statuses = dict(conn.execute(
        "select status, count(*) from pgflow.runs group by status").fetchall())
    assert statuses == {"completed": len(ids)}, statuses

    rows = conn.execute("select run_id, count(*), min(id), min(worker_pid)"
                        " from public.orders_booked group by run_id").fetchall()
    per_run = {run_id: n for run_id, n, _, _ in rows}
    assert sorted(per_run) == sorted(ids), "a booking for every run, and only for those"
    doubled = {run_id: n for run_id, n in per_run.items() if n != 1}
    assert not doubled, f"runs booked more than once: {doubled}"
    booked = {run_id: row_id for run_id, _, row_id, _ in rows}
    booked_by = {run_id: pid for run_id, _, _, pid in rows}

    # The journal: the transactional step completed once (one attempt), then the plain one;
    # the checkpointed result is the id of the row committed with it.
    journals: dict[str, list[tuple[Any, ...]]] = {}
    for run_id, seq, kind, name, status, attempts in conn.execute(
            "select run_id::text, seq, kind, name, status, attempts from pgflow.steps"
            " order by run_id, seq"):
        journals.setdefault(run_id, []).append((seq, kind, name, status, attempts))
    wrong = {r: journals.get(r) for r in ids if journals.get(r) != [
        (0, "step", step, "completed", 1), (1, "step", "ship", "completed", 1)]}
    assert not wrong, f"unexpected journals: {dict(list(wrong.items())[:5])}"
    outputs = dict(conn.execute("select id::text, output from pgflow.runs").fetchall())
    assert outputs == booked, "each run's output is the id of the row its checkpoint committed"

    invariants.check(conn, expected_runs=len(ids), disturbed=disturbed,
                     journal=lambda _: [("step", step), ("step", "ship")],
                     output=lambda run: booked[str(run["id"])])

    # Inserts that did not commit: each belongs to a killed worker.
    inserted = dict(conn.execute("select pid, count(*) from public.tx_marks"
                                 " where phase = 'inserted' group by pid").fetchall())
    committed = dict(conn.execute("select worker_pid, count(*) from public.orders_booked"
                                  " group by worker_pid").fetchall())
    lost_by = {pid: n - committed.get(pid, 0) for pid, n in inserted.items()
               if n != committed.get(pid, 0)}
    assert set(lost_by) <= set(disturbed.killed), (
        f"inserts rolled back in workers never killed: {lost_by}")
    assert all(n > 0 for n in lost_by.values()), lost_by
    executions = int(_one(conn, "select count(*) from public.effects where step = %s", (step,)))
    inserts = sum(inserted.values())
    last_ship = dict(conn.execute(
        "select distinct on (run_id) run_id, pid from public.effects where step = 'ship'"
        " order by run_id, at desc, id desc").fetchall())
    return {
        "step_executions": executions,
        "executions_lost": executions - len(ids),
        "inserts": inserts,
        "inserts_rolled_back": inserts - len(ids),
        "kills_inside_a_transaction": len(lost_by),
        # the booking committed by a worker killed before the run ended: the next one
        # replayed it from the journal and went on with ship
        "runs_resumed_after_commit": sum(1 for r in ids if last_ship.get(r) != booked_by[r]),
    }


def _sigkill_scenario(dsn: str, conn: psycopg.Connection[Any], processes: Processes,
                      report: Callable[..., None], workflow: Any, step: str, runs: int) -> None:
    tx.prepare(conn)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    with conn.transaction():
        run_ids = [pgflow.start(conn, workflow, n) for n in range(runs)]
    disturbed = invariants.Disturbed()
    started = time.monotonic()

    killing = _kill_at_random(dsn, conn, processes, runs, disturbed, rng)
    last = [p for p in processes.procs if p.poll() is None]
    if not last:
        last = [processes.worker(dsn, MODULE, concurrency=CONCURRENCY)]
    wait_for(lambda: _completed(conn) == runs, timeout=SETTLE_TIMEOUT,
             what=f"all {runs} runs completed; logs: "
                  + "\n".join(processes.log_of(p)[-2000:] for p in last))
    assert all(p.poll() is None for p in last), "the last worker kept running"

    figures = _check_exactly_once(conn, run_ids, step, disturbed)
    report(f"SIGKILL at random, {workflow.name}",
           runs=runs, kills=killing.kills, aimed_inside=killing.aimed,
           aimed_after_commit=killing.aimed_after, **figures,
           killing_s=f"{killing.seconds:.1f}", total_s=f"{time.monotonic() - started:.1f}",
           seed=seed)
    assert killing.kills >= 5, "the workers were hardly killed"
    assert figures["inserts_rolled_back"] >= 1, (
        "no execution died between its insert and its commit: the test tested nothing")
    assert figures["runs_resumed_after_commit"] >= 1, (
        "no worker died after a booking committed and before its run completed")


def test_sigkill_at_random_points_over_200_runs_books_each_order_exactly_once(
        dsn, conn, processes, report):
    """200 runs of a ``def`` workflow whose ``def`` transactional step inserts a row, while
    workers are SIGKILLed at random moments (inside the step, between its insert and its
    commit, after the commit): every run completes with exactly one row, its journal holds
    the step completed once, and the inserts of the killed executions were rolled back."""
    _sigkill_scenario(dsn, conn, processes, report, tx.orders, "book", 200)


@pytest.mark.parametrize(("workflow", "step"), [
    pytest.param(tx.orders_async_step, "book_async", id="def-workflow-async-step"),
    pytest.param(tx.orders_async, "book_async", id="async-workflow-async-step"),
    pytest.param(tx.orders_async_sync_step, "book", id="async-workflow-def-step"),
])
def test_sigkill_at_random_points_other_workflow_and_step_kinds(
        dsn, conn, processes, report, workflow, step):
    """The same over 50 runs for the other pairings of workflow and transactional step
    (``def``/``async def``): each runs the step and its checkpoint in one transaction."""
    _sigkill_scenario(dsn, conn, processes, report, workflow, step, 50)


def test_a_frozen_workers_transactional_writes_roll_back_with_its_refused_checkpoint(
        dsn, conn, processes, report, tmp_path):
    """A worker frozen (SIGSTOP) inside a transactional step, after its insert, past the
    heartbeat limit: a second worker takes the run over and completes it, its own insert not
    blocked by the frozen one's. Resumed (SIGCONT), the frozen worker's checkpoint is
    refused and its insert rolled back with it: exactly one row, the second worker's. The
    frozen worker logs the refusal, lives on, and exits cleanly on SIGTERM."""
    tx.prepare(conn)
    release = tmp_path / "release"
    frozen = processes.worker(dsn, MODULE, concurrency=2)
    wait_registered(conn, 1)
    run_id = pgflow.start(conn, tx.frozen_order, str(release))
    rid = str(run_id)

    wait_for(lambda: _one(conn, "select count(*) from public.tx_marks where run_id = %s"
                                " and pid = %s and phase = 'inserted'", (rid, frozen.pid)) == 1,
             timeout=60, what="the first worker's insert done")
    frozen.send_signal(signal.SIGSTOP)  # inside the transaction: alive, connected, silent
    frozen_at = time.monotonic()
    assert _one(conn, "select count(*) from public.orders_booked where run_id = %s",
                (rid,)) == 0, "the frozen worker's insert is not committed"
    assert _one(conn, "select count(*) from pg_stat_activity where datname = current_database()"
                      " and state = 'idle in transaction'") >= 1

    # A worker that declares another dead after 2 s without a heartbeat takes the run over.
    second = processes.worker(dsn, MODULE, extra_args=("--stale-after", "2"))
    wait_status(conn, run_id, "completed", timeout=60)
    taken_over_s = time.monotonic() - frozen_at
    rows = conn.execute("select worker_pid from public.orders_booked where run_id = %s",
                        (rid,)).fetchall()
    assert rows == [(second.pid,)]

    frozen.send_signal(signal.SIGCONT)
    release.touch()  # the frozen execution's step returns and it tries to checkpoint
    wait_for(lambda: "abandoned" in processes.log_of(frozen), timeout=60,
             what="the frozen worker's checkpoint refused")
    log = processes.log_of(frozen)
    assert "lease lost" in log, log[-3000:]
    assert "rolled back" in log, log[-3000:]
    # Its transaction is over (rolled back): nothing idles in a transaction any more.
    wait_for(lambda: _one(conn, "select count(*) from pg_stat_activity where datname ="
                                " current_database() and state = 'idle in transaction'") == 0,
             timeout=30, what="no transaction left open")

    rows = conn.execute("select worker_pid from public.orders_booked where run_id = %s",
                        (rid,)).fetchall()
    assert rows == [(second.pid,)], "the frozen worker's insert was rolled back"
    inserted = sorted(pid for (pid,) in conn.execute(
        "select pid from public.tx_marks where run_id = %s and phase = 'inserted'", (rid,)))
    assert inserted == sorted([frozen.pid, second.pid]), "both executions inserted"
    run = pgflow.get(conn, run_id)
    assert run.status == "completed"
    assert [(s.name, s.status, s.attempts) for s in run.steps] == [
        ("book_then_wait", "completed", 1), ("ship", "completed", 1)]
    assert run.output == _one(conn, "select id from public.orders_booked where run_id = %s",
                              (rid,))
    invariants.check(conn, expected_runs=1, disturbed=invariants.Disturbed(frozen={frozen.pid}),
                     journal=lambda _: [("step", "book_then_wait"), ("step", "ship")])

    assert frozen.poll() is None, "the frozen worker lives on"
    assert second.poll() is None
    frozen.send_signal(signal.SIGTERM)
    try:
        code = frozen.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, processes.log_of(frozen)[-3000:]
    refusal = next(line for line in log.splitlines() if "abandoned" in line)
    report("frozen worker", taken_over_s=f"{taken_over_s:.1f}", rows=len(rows),
           executions=len(inserted), refusal=refusal[refusal.index("abandoned"):][:240])
