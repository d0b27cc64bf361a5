"""``pgflow worker -p N``: a supervisor, its worker processes, restarts, drains, one endpoint.

Real processes throughout: the supervisor is the ``pgflow worker`` command; its
children are found through ``/proc`` (their parent pid) and through
``pgflow.workers`` (their registrations). Deadlines only bound a hang.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pgflow
from tests.support.helpers import EFFECTS_DSN_ENV, REPO, wait_for
from tests.support.workflows.simple import two_steps
from tests.support.workflows.supervised import three_slow_steps

pytestmark = pytest.mark.slow

MODULE = "tests.support.workflows.simple"
SLOW = "tests.support.workflows.supervised"


def supervisor(dsn: str, processes: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), EFFECTS_DSN_ENV: dsn, "PYTHONUNBUFFERED": "1"}
    env.pop("PGFLOW_DSN", None)
    return subprocess.Popen([sys.executable, "-m", "pgflow", "worker", MODULE, SLOW, "--dsn", dsn,
                             "-p", str(processes), "-c", "4", *extra],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture
def supervised() -> Any:
    started: list[subprocess.Popen[bytes]] = []

    def start(dsn: str, processes: int, *extra: str) -> subprocess.Popen[bytes]:
        proc = supervisor(dsn, processes, *extra)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        kids = children(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def cmdline(pid: int) -> list[str]:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")


def registered(conn: psycopg.Connection[Any]) -> list[int]:
    return sorted(row[0] for row in conn.execute("select pid from pgflow.workers"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_two_processes_share_the_work_and_one_is_the_scheduler_candidate(
        dsn, conn, effects, supervised):
    proc = supervised(dsn, 2)
    wait_for(lambda: len(registered(conn)) == 2, timeout=60, what="two registered processes")
    kids = children(proc.pid)
    assert registered(conn) == kids  # the supervisor itself runs no worker
    schedulers = [pid for pid in kids if "--no-scheduler" not in cmdline(pid)]
    assert len(schedulers) == 1
    for pid in kids:
        assert "--dsn" not in cmdline(pid)  # the DSN travels in the environment

    run_ids = [pgflow.start(conn, two_steps, n) for n in range(40)]
    for run_id in run_ids:
        assert pgflow.result(conn, run_id, timeout=120) == (run_ids.index(run_id) + 1) * 2
    assert effects.count() == 80  # each step once

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    wait_for(lambda: not any(alive(pid) for pid in kids), timeout=30, what="children gone")
    assert registered(conn) == []  # drained and unregistered


def test_a_killed_process_is_started_again_and_the_runs_go_on(dsn, conn, effects, supervised):
    proc = supervised(dsn, 2)
    wait_for(lambda: len(registered(conn)) == 2, timeout=60, what="two registered processes")
    victim = children(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(proc.pid)) == 2 and victim not in children(proc.pid),
             timeout=60, what="a new process in place of the killed one")
    wait_for(lambda: sorted(registered(conn)) == children(proc.pid), timeout=60,
             what="the new process registered, the dead one recovered")
    run_ids = [pgflow.start(conn, two_steps, n) for n in range(10)]
    for run_id in run_ids:
        pgflow.result(conn, run_id, timeout=120)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0  # a restarted child does not make the drain fail


def test_a_killed_supervisor_takes_its_processes_with_it(dsn, conn, supervised):
    proc = supervised(dsn, 2)
    wait_for(lambda: len(registered(conn)) == 2, timeout=60, what="two registered processes")
    kids = children(proc.pid)
    proc.kill()
    proc.wait(30)
    wait_for(lambda: not any(alive(pid) for pid in kids), timeout=30,
             what="the children killed with their supervisor (no orphan)")


def test_one_endpoint_serves_the_sum_of_the_processes(dsn, conn, effects, supervised):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = supervised(dsn, 2, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    wait_for(lambda: len(registered(conn)) == 2, timeout=60, what="two registered processes")
    run_ids = [pgflow.start(conn, two_steps, n) for n in range(30)]
    for run_id in run_ids:
        pgflow.result(conn, run_id, timeout=120)
    worked = {row[0] for row in conn.execute("select distinct pid from public.effects")}

    def finished() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(s.value for family in text_string_to_metric_families(text)
                   for s in family.samples
                   if s.name == "pgflow_runs_finished_total"
                   and s.labels.get("status") == "completed")

    wait_for(lambda: finished() == 30, timeout=30, what="30 completed runs on the endpoint")
    print(f"processes that ran steps: {len(worked)}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def leased_by(conn: psycopg.Connection[Any], pid: int) -> list[Any]:
    """The runs the worker process ``pid`` holds."""
    return [row[0] for row in conn.execute(
        "select r.id from pgflow.runs r join pgflow.workers w on w.id = r.lease_owner"
        " where w.pid = %s and r.status = 'running'", (pid,))]


def executions(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    return {(run, step): n for run, step, n in conn.execute(
        "select run_id, step, count(*) from public.effects group by 1, 2")}


def test_a_child_killed_mid_load_is_restarted_and_its_runs_recovered(
        dsn, conn, effects, supervised):
    proc = supervised(dsn, 2)
    wait_for(lambda: len(registered(conn)) == 2, timeout=60, what="two registered processes")
    run_ids = [pgflow.start(conn, three_slow_steps) for _ in range(24)]
    first = children(proc.pid)
    wait_for(lambda: any(leased_by(conn, pid) for pid in first), timeout=60,
             what="a process holding runs")
    victim = next(pid for pid in first if leased_by(conn, pid))
    held = leased_by(conn, victim)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(proc.pid)) == 2 and victim not in children(proc.pid),
             timeout=60, what="a new process in place of the killed one")
    for run_id in run_ids:
        assert pgflow.result(conn, run_id, timeout=180) == [0, 1, 2]
    counts = executions(conn)
    for run_id in run_ids:  # every step ran; only the killed process's steps may have run twice
        for step in ("step 0", "step 1", "step 2"):
            n = counts.get((str(run_id), step), 0)
            assert n == 1 or (n == 2 and run_id in held), (run_id, step, n)
    print(f"runs held by the killed process: {len(held)}, all recovered")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def test_sigterm_mid_load_drains_every_process_and_nothing_runs_twice(
        dsn, conn, effects, supervised):
    proc = supervised(dsn, 2)
    wait_for(lambda: len(registered(conn)) == 2, timeout=60, what="two registered processes")
    run_ids = [pgflow.start(conn, three_slow_steps) for _ in range(24)]
    wait_for(lambda: effects.count() >= 6, timeout=60, what="steps under way")
    kids = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    wait_for(lambda: not any(alive(pid) for pid in kids), timeout=30, what="children gone")
    assert registered(conn) == []
    unfinished = conn.execute("select count(*) from pgflow.runs where status <> 'completed'"
                              ).fetchone()[0]
    assert unfinished > 0  # the drain stopped mid-load: runs were given back, not finished
    assert conn.execute("select count(*) from pgflow.runs where status = 'running'"
                        ).fetchone()[0] == 0  # none left leased to a drained process

    after = supervised(dsn, 2)  # a new supervisor finishes what was given back
    for run_id in run_ids:
        assert pgflow.result(conn, run_id, timeout=180) == [0, 1, 2]
    assert set(executions(conn).values()) == {1}  # every step of every run ran exactly once
    assert len(executions(conn)) == 3 * len(run_ids)
    after.send_signal(signal.SIGTERM)
    assert after.wait(60) == 0
