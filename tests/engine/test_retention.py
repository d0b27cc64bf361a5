"""Retention: pgflow.purge / `pgflow purge` delete old finished runs with all their rows."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

import pgflow
from tests.support.helpers import REPO, wait_status
from tests.support.workflows.effects import record

TABLES = ("steps", "step_attempts", "signals", "run_state", "timers")


@pgflow.step(retry=pgflow.Retry(max_attempts=2, initial_interval=0.01))
def flaky_once(run_id: str) -> str:
    if record(run_id, "flaky_once") == 1:
        raise RuntimeError("first attempt fails")
    return "ok"


@pgflow.workflow(name="retained")
def retained(ctx: pgflow.Context, nap_days: int) -> str:
    ctx.set_state("stage", "started")
    out = flaky_once(str(ctx.workflow_id))
    ctx.sleep(timedelta(days=nap_days))
    return out


def _rows(conn, run_ids) -> dict[str, int]:
    ids = [str(r) for r in run_ids]
    counts = {t: conn.execute(f"select count(*) from pgflow.{t} where run_id::text = any(%s)",
                              (ids,)).fetchone()[0] for t in TABLES}
    counts["runs"] = conn.execute("select count(*) from pgflow.runs where id::text = any(%s)",
                                  (ids,)).fetchone()[0]
    return counts


def test_purge_deletes_old_finished_runs_in_batches_and_nothing_else(conn, effects,
                                                                      inprocess_worker):
    inprocess_worker.start([retained])
    old = []
    for _ in range(5):
        with conn.transaction():  # a signal nobody reads, left in the mailbox
            old.append(pgflow.start(conn, retained, 0))
            pgflow.signal(conn, old[-1], "unread", {"kept": "in the mailbox"})
    for run_id in old:
        assert pgflow.result(conn, run_id, timeout=60) == "ok"
    assert set(_rows(conn, old).values()) != {0}
    sleeper = pgflow.start(conn, retained, 100)   # unfinished: never purged
    wait_status(conn, sleeper, "sleeping")
    # purge ages runs by real time: make these 31 days old the only way it sees
    conn.execute("update pgflow.runs set finished_at = finished_at - interval '31 days',"
                 " created_at = created_at - interval '31 days' where id = any(%s)", (old,))
    recent = pgflow.start(conn, retained, 0)      # finished, but recently
    assert pgflow.result(conn, recent, timeout=60) == "ok"
    kept_before = _rows(conn, [sleeper, recent])

    batches = []
    while deleted := conn.execute("select pgflow.purge(interval '30 days', 2)").fetchone()[0]:
        batches.append(deleted)
    assert batches == [2, 2, 1]
    assert _rows(conn, old) == dict.fromkeys([*TABLES, "runs"], 0)
    assert _rows(conn, [sleeper, recent]) == kept_before


def test_purge_rejects_bad_arguments(conn):
    for args in ("interval '-1 day', 10", "interval '1 day', 0"):
        with pytest.raises(Exception, match="must"):
            conn.execute(f"select pgflow.purge({args})")


def test_the_purge_command(dsn, conn):
    conn.execute("""
        insert into pgflow.runs (name, version, queue, status, input, output, created_at,
                                 available_at, started_at, finished_at)
        select 'old', '1', 'default', 'completed', '[]', 'null', t, t, t, t
        from generate_series(1, 25) g, lateral (select now() - interval '40 days' as t) x""")
    # Tick records of a schedule: one old (purged), one recent (kept).
    conn.execute("""select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'],
                    '[{"name": "old", "version": "1", "queue": "default"}]')""")
    conn.execute("select pgflow.create_schedule('s', 'old', cron => '0 * * * *')")
    conn.execute("""
        insert into pgflow.schedule_ticks (schedule_id, scheduled_time, outcome, recorded_at)
        values ('s', now() - interval '40 days', 'missed', now() - interval '40 days'),
               ('s', now() - interval '1 day', 'skipped', now() - interval '1 day')""")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pgflow", "purge", *args, "--dsn", dsn],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    done = cli("--older-than", "30d", "--batch", "10")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("purged 25 run(s) that finished more than 30d ago"
                                   " and 1 schedule tick record(s)")
    assert conn.execute("select count(*) from pgflow.runs").fetchone()[0] == 0
    assert conn.execute("select outcome from pgflow.schedule_ticks").fetchall() == [("skipped",)]
    bad = cli("--older-than", "a while")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("pgflow: error: --older-than 'a while'")
