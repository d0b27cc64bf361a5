"""Fault injection with real processes and real PostgreSQL, each ending with the invariant check.

- the chaos loop: 500 ten-call runs while two workers are SIGKILLed at random
  and restarted;
- PostgreSQL restarted (fast shutdown) under load, on a private cluster:
  the same worker processes reconnect, LISTEN again, and lose nothing;
- the scheduler leader killed (after a freeze) while timers are due.

Each prints its figures (kills, restarts, runs, durations) past pytest's
capture, so they show in a plain CI log.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow import schema
from tests.support import invariants, pgcluster
from tests.support.helpers import Processes, scheduler_leader_pid, wait_for, wait_registered
from tests.support.workflows import chaos

MODULE = "tests.support.workflows.chaos"
pytestmark = pytest.mark.slow
REPORT_LABEL = "faults"  # the prefix of the figures `report` prints

CHAOS_RUNS = 500
CHAOS_CONCURRENCY = 6
KILL_EVERY = (1.0, 3.0)  # seconds between kills of one worker, at random
# ...and never this many completed runs (at random in the range) without a kill, whatever
# the machine's speed: one that gets through the runs quickly still sees MIN_KILLS kills.
KILL_EVERY_RUNS = (20, 40)
MIN_KILLS = 10
CHAOS_LIMIT = 75.0  # seconds of killing at most; then the last workers finish in peace
SETTLE_TIMEOUT = 150.0  # seconds for the survivors to finish: bounds a hang, not a speed
EARLY_SIGNALS = 3  # one run in this many gets its signal with its start


def _counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return dict(conn.execute("select status, count(*) from pgflow.runs group by status").fetchall())


def _sessions(conn: psycopg.Connection[Any]) -> str:
    """Who guards the wake-ups (advisory class 7366506) and what every other session of
    the database last did: what a test that lost a wake-up prints."""
    rows = conn.execute(
        "select a.pid, a.application_name, a.state, a.backend_start, a.state_change,"
        " (select count(*) from pg_locks l where l.pid = a.pid and l.locktype = 'advisory'"
        "  and l.classid = 7366506 and l.granted) as guards,"
        " left(a.query, 120)"
        " from pg_stat_activity a where a.datname = current_database()"
        " and a.pid <> pg_backend_pid() order by a.backend_start").fetchall()
    return "\n".join(" | ".join(str(v) for v in row) for row in rows)


def _start_chaos_runs(conn: psycopg.Connection[Any], count: int,
                      rng: random.Random) -> dict[uuid.UUID, int]:
    """``count`` chaos runs in one transaction; every EARLY_SIGNALS-th gets its signal at once."""
    runs: dict[uuid.UUID, int] = {}
    with conn.transaction():
        for n in range(count):
            run_id = pgflow.start(conn, chaos.chaos, n, n % 2, round(rng.uniform(0.05, 0.4), 2),
                                  key=f"chaos:{n}")
            runs[run_id] = n
            if n % EARLY_SIGNALS == 0:  # lands in the mailbox before the run waits
                pgflow.signal(conn, run_id, chaos.SIGNAL, {"go": n})
    return runs


class Signaller:
    """Sends each run its one signal: when it waits, or at a random moment before."""

    def __init__(self, runs: dict[uuid.UUID, int], rng: random.Random) -> None:
        self.runs = runs
        self.rng = rng
        self.unsent = {r for r, n in runs.items() if n % EARLY_SIGNALS != 0}
        self.sent = len(runs) - len(self.unsent)

    def tick(self, conn: psycopg.Connection[Any]) -> None:
        if not self.unsent:
            return
        waiting = {row[0] for row in conn.execute(
            "select s.run_id from pgflow.steps s where s.kind = 'signal' and s.status = 'waiting'"
            " and s.run_id = any(%s)", (list(self.unsent),))}
        early = {r for r in self.unsent if self.rng.random() < 0.02}  # racing the run itself
        for run_id in waiting | early:
            pgflow.signal(conn, run_id, chaos.SIGNAL, {"go": self.runs[run_id]})
            self.unsent.discard(run_id)
            self.sent += 1


def _chaos_check(conn: psycopg.Connection[Any], runs: dict[uuid.UUID, int],
                 disturbed: invariants.Disturbed) -> invariants.Summary:
    inputs = {str(r): n for r, n in runs.items()}
    return invariants.check(
        conn, disturbed=disturbed, run_ids=runs, expected_runs=len(runs),
        journal=lambda run: chaos.journal(inputs[str(run["id"])] % 2),
        output=lambda run: chaos.expected_output(inputs[str(run["id"])],
                                                 inputs[str(run["id"])] % 2))


def test_chaos_loop_workers_sigkilled_at_random(dsn, conn, processes, report):
    rng = random.Random()
    invariants.prepare_effects(conn)
    disturbed = invariants.Disturbed()
    slots = [processes.worker(dsn, MODULE, concurrency=CHAOS_CONCURRENCY) for _ in range(2)]
    wait_registered(conn, 2)
    started = time.monotonic()
    runs = _start_chaos_runs(conn, CHAOS_RUNS, rng)
    signaller = Signaller(runs, rng)
    next_kill = [started + rng.uniform(*KILL_EVERY) for _ in slots]
    next_kill_at_runs, turn = rng.randint(*KILL_EVERY_RUNS), 0
    kills, snapshots, next_snapshot = 0, 0, started + 2.0

    while (completed := _counts(conn).get("completed", 0)) < CHAOS_RUNS:
        now = time.monotonic()
        if now - started > CHAOS_LIMIT:
            break
        if completed >= next_kill_at_runs:  # no kill for that many runs: one in turn, now
            next_kill[turn], turn = now, 1 - turn
        for i, proc in enumerate(slots):
            if now >= next_kill[i]:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                disturbed.kill(conn, proc.pid)
                kills += 1
                slots[i] = processes.worker(dsn, MODULE, concurrency=CHAOS_CONCURRENCY)
                next_kill[i] = time.monotonic() + rng.uniform(*KILL_EVERY)
                next_kill_at_runs = completed + rng.randint(*KILL_EVERY_RUNS)
        signaller.tick(conn)
        if now >= next_snapshot:  # mid-chaos: nothing doubled, nothing stuck so far
            invariants.check(conn, status=None, disturbed=disturbed, run_ids=runs)
            snapshots, next_snapshot = snapshots + 1, time.monotonic() + 2.0
        time.sleep(0.05)
    chaos_seconds = time.monotonic() - started

    # The survivors (never killed) finish whatever is left.
    def finished() -> bool:
        signaller.tick(conn)
        return _counts(conn).get("completed", 0) == CHAOS_RUNS
    try:
        wait_for(finished, timeout=SETTLE_TIMEOUT, interval=0.1,
                 what=f"{CHAOS_RUNS} completed runs")
    finally:
        total = time.monotonic() - started
        summary = _chaos_check(conn, runs, disturbed)
        report("chaos", runs=len(runs), kills=kills, restarts=kills, mid_checks=snapshots,
               chaos_s=f"{chaos_seconds:.1f}", total_s=f"{total:.1f}",
               signals=signaller.sent, step_executions=summary.executions,
               repeated_executions=summary.repeated)
    assert kills >= MIN_KILLS, f"only {kills} kills: the loop did not exercise recovery"
    assert all(p.poll() is None for p in slots), "the last workers are alive"


def test_postgres_fast_restart_mid_load(processes, report):
    try:
        cluster_cm = pgcluster.private_cluster()
        cluster = cluster_cm.__enter__()
    except pgcluster.Unavailable as exc:
        pytest.skip(f"no private PostgreSQL cluster possible: {exc}")
    try:
        _restart_scenario(cluster, processes, report)
    finally:
        processes.kill_all()
        cluster_cm.__exit__(None, None, None)


def _connect_retrying(dsn: str) -> psycopg.Connection[Any]:
    return wait_for(lambda: _try_connect(dsn), timeout=60, interval=0.1, what="the server back")


def _try_connect(dsn: str) -> psycopg.Connection[Any] | None:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=2)
    except psycopg.OperationalError:
        return None


def _restart_scenario(cluster: pgcluster.Cluster, processes: Processes,
                      report: Callable[..., None]) -> None:
    dsn = cluster.dsn
    schema.migrate(dsn)
    rng = random.Random()
    count = 150
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        invariants.prepare_effects(conn)
        # Workers that never poll (within the test): every pick-up below comes from a
        # NOTIFY, so the runs completing at all show that LISTEN is back after the restart.
        workers = [processes.worker(dsn, MODULE, concurrency=CHAOS_CONCURRENCY,
                                    extra_env={"PGFLOW_TEST_POLL_INTERVAL": "3600"})
                   for _ in range(2)]
        wait_registered(conn, 2)
        started = time.monotonic()
        runs = _start_chaos_runs(conn, count, rng)
        signaller = Signaller(runs, rng)
        wait_for(lambda: (signaller.tick(conn), _counts(conn).get("completed", 0))[1]
                 >= count // 3, timeout=120, interval=0.05, what="a third of the runs completed")
        at_restart = _counts(conn)
        ids_before = {r[0] for r in conn.execute("select id from pgflow.workers")}
        conn.close()

        t0 = time.monotonic()
        cluster.restart("fast")
        restart_s = time.monotonic() - t0
        conn = _connect_retrying(dsn)

        def settled() -> bool:
            signaller.tick(conn)
            return _counts(conn).get("completed", 0) == count
        wait_for(settled, timeout=SETTLE_TIMEOUT, interval=0.1, what=f"{count} completed runs")
        load_s = time.monotonic() - started

        assert all(w.poll() is None for w in workers), \
            "\n".join(processes.log_of(w)[-2000:] for w in workers)
        # Both re-registered by themselves: the same processes, under new ids, each
        # holding its liveness lock again (the old registrations were recovered).
        live = ("select w.id, w.pid from pgflow.workers w where exists (select 1 from pg_locks l"
                " where l.locktype = 'advisory' and l.granted and l.classid = 7366502"
                " and l.objid = w.lock_key and l.objsubid = 2 and l.database = (select d.oid"
                " from pg_database d where d.datname = current_database()))")
        wait_for(lambda: sorted(r[1] for r in conn.execute(live)) == sorted(w.pid for w in workers)
                 and len(list(conn.execute("select 1 from pgflow.workers"))) == 2,
                 timeout=60, what="both workers registered again, and only them")
        assert not ids_before & {r[0] for r in conn.execute(live)}
        summary = _chaos_check(conn, runs, invariants.Disturbed(
            cut_off={w.pid for w in workers}))

        # LISTEN is back: idle workers that never poll pick each new run up on its
        # NOTIFY (no pick-up at all would time out). The latencies are reported, not bounded.
        latencies = []
        for n in range(5):
            run_id = pgflow.start(conn, chaos.ping, n)
            try:
                assert pgflow.result(conn, run_id, timeout=60) == f"pong:{n}"
            except TimeoutError:
                row = conn.execute("select status, lease_owner, lease_token, held_by from pgflow.runs"
                                   " where id = %s", (run_id,)).fetchone()
                logs = "\n".join(processes.log_of(w)[-3000:] for w in workers)
                raise AssertionError(f"ping {n} not done, run (status, lease_owner, lease_token, held_by)"
                                     f" {row}; wake guards and sessions:\n{_sessions(conn)}"
                                     f"\nworker logs:\n{logs}") from None
            latencies.append(conn.execute(
                "select extract(epoch from started_at - created_at) from pgflow.runs"
                " where id = %s", (run_id,)).fetchone()[0])
        invariants.check(conn, disturbed=invariants.Disturbed(cut_off={w.pid for w in workers}),
                         expected_runs=count + 5)
        report("postgres restart", runs=count + 5, restarts=1,
               completed_before_restart=at_restart.get("completed", 0),
               restart_s=f"{restart_s:.2f}", load_s=f"{load_s:.1f}",
               repeated_executions=summary.repeated,
               pickup_ms_after=[round(float(x) * 1000) for x in latencies])
    finally:
        conn.close()



def test_scheduler_leader_killed_while_timers_are_due(dsn, conn, processes, report):
    invariants.prepare_effects(conn)
    disturbed = invariants.Disturbed()
    workers = [processes.worker(dsn, MODULE) for _ in range(2)]
    wait_registered(conn, 2)
    rounds, per_round, takeovers, due_at_kill = 3, 40, [], []
    runs: dict[uuid.UUID, int] = {}
    started = time.monotonic()
    for r in range(rounds):
        leader = wait_for(lambda: scheduler_leader_pid(conn), timeout=60, what="a scheduler leader")
        victim = next(w for w in workers if w.pid == leader)
        batch = {}
        with conn.transaction():
            for i in range(per_round):
                n = r * per_round + i
                run_id = pgflow.start(conn, chaos.chaos, n, n % 2, 0.3, key=f"leader:{n}")
                pgflow.signal(conn, run_id, chaos.SIGNAL, {"go": n})
                batch[run_id] = n
        runs.update(batch)
        # The leader has runs of this round in flight when it freezes; from then on
        # nobody fires timers (it keeps the lock), so they pile up and come due.
        wait_for(lambda ids=[str(i) for i in batch], pid=victim.pid: conn.execute(
            "select count(*) from public.effects where pid = %s and run_id = any(%s)",
            (pid, ids)).fetchone()[0] > 0, timeout=60, what="the leader working on the round")
        victim.send_signal(signal.SIGSTOP)
        wait_for(lambda ids=list(batch): conn.execute(
            "select count(*) from pgflow.timers where run_id = any(%s)",
            (ids,)).fetchone()[0] >= per_round // 4, timeout=60, what="the round's runs asleep")
        # sleeps of 0.3 s: those timers come due while nobody fires them
        due = wait_for(lambda: conn.execute(
            "select count(*) from pgflow.timers where due_at <= pgflow.now()").fetchone()[0],
            timeout=60, what="timers due at the kill")
        due_at_kill.append(due)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        disturbed.kill(conn, victim.pid)
        killed = time.monotonic()
        survivor = next(w for w in workers if w is not victim)
        # The survivor leads once the victim's lock has gone with its connection, and fires
        # what came due. How fast is reported, not bounded: these deadlines bound a hang.
        wait_for(lambda pid=survivor.pid: scheduler_leader_pid(conn) == pid, timeout=60,
                 what="a new leader")
        wait_for(lambda: conn.execute(
            "select count(*) from pgflow.timers where due_at <= pgflow.now() - interval '1 second'"
        ).fetchone()[0] == 0, timeout=60, what="the due timers fired")
        takeovers.append(round(time.monotonic() - killed, 2))
        workers = [survivor, processes.worker(dsn, MODULE)]
        wait_for(lambda: _counts(conn).get("completed", 0) == len(runs), timeout=120,
                 what=f"round {r + 1} completed")
    summary = _chaos_check(conn, runs, disturbed)
    lateness = conn.execute(
        "select max(extract(epoch from s.finished_at - (s.output ->> 'until')::timestamptz))"
        " from pgflow.steps s where s.kind = 'sleep'").fetchone()[0]
    report("scheduler leader kill", runs=len(runs), kills=rounds, restarts=rounds,
           timers_due_at_kill=due_at_kill, takeover_and_fire_s=takeovers,
           worst_timer_lateness_s=f"{float(lateness):.2f}",
           total_s=f"{time.monotonic() - started:.1f}",
           repeated_executions=summary.repeated)

