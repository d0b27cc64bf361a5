"""The ``pgflow`` command line, driven as a real subprocess (``python -m pgflow``).

Every failure a user can cause must end as exactly one line on stderr that
starts with ``pgflow: error:``, exit code 1, and never a traceback.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import pgflow
from pgflow import schema
from tests.support.cli import (
    assert_one_line_error,
    cli_env,
    ok,
    pgflow_cli,
    register_two_steps,
)
from tests.support.helpers import REPO, wait_registered, wait_status
from tests.support.workflows.simple import two_steps

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"
def as_url(conninfo: str, scheme: str = "postgresql") -> str:
    """``conninfo`` as a URL; a socket directory (the embedded server) goes in ?host=."""
    parts = conninfo_to_dict(conninfo)
    auth = parts.get("user", "postgres")
    host, port = parts.get("host", ""), parts.get("port", 5432)
    if host.startswith("/"):
        return f"{scheme}://{auth}@/{parts['dbname']}?host={quote(host)}&port={port}"
    return f"{scheme}://{auth}@{host}:{port}/{parts['dbname']}"


# --- error paths -----------------------------------------------------------------------

ERROR_CASES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    # (id, database, arguments before --dsn, expected fragments of the error line)
    ("start-malformed-json", "migrated", ("start", "two_steps", "--input", "[1, "),
     ("--input is not valid JSON",)),
    ("start-json-not-array-or-object", "migrated", ("start", "two_steps", "--input", "5"),
     ("--input must be a JSON array",)),
    ("start-json-string", "migrated", ("start", "two_steps", "--input", '"x"'),
     ("--input must be a JSON array",)),
    ("start-unknown-workflow", "migrated", ("start", "no_such_workflow", "--input", "[]"),
     ("unknown workflow 'no_such_workflow'",)),
    ("show-unknown-run", "migrated", ("show", "00000000-0000-4000-8000-000000000001"),
     ("unknown run 00000000-0000-4000-8000-000000000001",)),
    ("show-not-a-uuid", "migrated", ("show", "not-a-uuid"), ("not-a-uuid",)),
    ("list-bogus-status", "migrated", ("list", "--status", "bogus"),
     ("unknown status 'bogus'", "pending")),
    ("list-unreachable", "unreachable", ("list",), ("cannot connect to the database",)),
    ("start-unreachable", "unreachable", ("start", "two_steps", "--input", "[1]"),
     ("cannot connect to the database",)),
    ("show-unreachable", "unreachable", ("show", "00000000-0000-4000-8000-000000000001"),
     ("cannot connect to the database",)),
    ("migrate-unreachable", "unreachable", ("migrate",), ("cannot connect to the database",)),
    ("worker-unreachable", "unreachable", ("worker", "tests.support.workflows.simple"),
     ("cannot connect to the database",)),
    ("list-not-migrated", "empty", ("list",), ("pgflow migrate",)),
    ("start-not-migrated", "empty", ("start", "two_steps", "--input", "[1]"),
     ("pgflow migrate",)),
    ("show-not-migrated", "empty", ("show", "00000000-0000-4000-8000-000000000001"),
     ("pgflow migrate",)),
    ("worker-not-migrated", "empty", ("worker", "tests.support.workflows.simple"), ("pgflow migrate",)),
    ("worker-module-not-found", "migrated", ("worker", "tests.support.workflows.no_such_module"),
     ("cannot import module 'tests.support.workflows.no_such_module'",)),
    ("worker-no-workflows", "migrated", ("worker", "json"), ("no workflows",)),
]


@pytest.mark.parametrize(("database", "args", "fragments"),
                         [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES])
def test_error_is_one_line_on_stderr(request: pytest.FixtureRequest, database: str,
                                     args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    if database == "unreachable":
        target = UNREACHABLE
    else:
        target = request.getfixturevalue("dsn" if database == "migrated" else "empty_dsn")
    assert_one_line_error(pgflow_cli(*args, "--dsn", target), *fragments)


def test_worker_module_failing_at_import_is_one_line(dsn: str, tmp_path: Path) -> None:
    (tmp_path / "pgflow_cli_broken.py").write_text(
        'raise RuntimeError("boom\\nsecond line")\n', encoding="utf-8")
    (tmp_path / "pgflow_cli_syntax.py").write_text("def f(:\n", encoding="utf-8")
    env = cli_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    line = assert_one_line_error(pgflow_cli("worker", "pgflow_cli_broken", "--dsn", dsn, env=env),
                                 "RuntimeError", "boom second line")
    assert "\n" not in line
    assert_one_line_error(pgflow_cli("worker", "pgflow_cli_syntax", "--dsn", dsn, env=env),
                          "SyntaxError")


# --- migrate ---------------------------------------------------------------------------

def _version_rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("select to_regclass('pgflow.runs') is not null").fetchone() == (True,)
        return c.execute("select version_num from pgflow.alembic_version").fetchall()


@pytest.mark.slow
def test_migrate_prints_revision_and_is_idempotent(empty_dsn: str) -> None:
    head = schema.head_revision()
    first = ok(pgflow_cli("migrate", "--dsn", empty_dsn))
    assert first.strip() == f"pgflow schema is at revision {head}"
    again = ok(pgflow_cli("migrate", "--dsn", empty_dsn))
    assert again == first
    assert _version_rows(empty_dsn) == [(head,)]
    # and the migrated database is usable by the other commands
    assert ok(pgflow_cli("list", "--dsn", empty_dsn)).splitlines()[0].split() == \
        ["ID", "WORKFLOW", "STATUS", "CREATED", "KEY"]


@pytest.mark.slow
def test_two_concurrent_migrates_both_succeed(empty_dsn: str) -> None:
    head = schema.head_revision()
    procs = [subprocess.Popen([sys.executable, "-m", "pgflow", "migrate", "--dsn", empty_dsn],
                              cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.communicate(timeout=60), p.returncode) for p in procs]
    for (out, err), code in results:
        assert code == 0, f"exit {code}\n{out}\n{err}"
        assert "Traceback" not in out + err
        assert out.strip() == f"pgflow schema is at revision {head}"
    assert _version_rows(empty_dsn) == [(head,)]


# --- start / list / show ---------------------------------------------------------------

@pytest.mark.slow
def test_start_list_show(dsn: str, conn: psycopg.Connection[Any]) -> None:
    # not registered yet: the CLI refuses a workflow nobody serves
    assert_one_line_error(pgflow_cli("start", "two_steps", "--input", "[3]", "--dsn", dsn),
                          "unknown workflow 'two_steps'")
    register_two_steps(dsn)

    out = ok(pgflow_cli("start", "two_steps", "--input", "[3]", "--key", "order-7", "--dsn", dsn))
    run_id = uuid.UUID(out.strip())
    assert out == f"{run_id}\n"
    again = ok(pgflow_cli("start", "two_steps", "--input", "[3]", "--key", "order-7", "--dsn", dsn))
    assert again == out, "same idempotency key must give the same run"
    kwargs_run = uuid.UUID(ok(pgflow_cli("start", "two_steps", "--input", '{"n": 4}',
                                         "--dsn", dsn)).strip())
    assert kwargs_run != run_id
    rows = conn.execute("select id, name, status, key, input from pgflow.runs order by created_at"
                        ).fetchall()
    assert [r[:4] for r in rows] == [(run_id, "two_steps", "pending", "order-7"),
                                     (kwargs_run, "two_steps", "pending", None)]

    # list: a table, newest first
    table = ok(pgflow_cli("list", "--dsn", dsn)).splitlines()
    assert table[0].split() == ["ID", "WORKFLOW", "STATUS", "CREATED", "KEY"]
    assert len(table) == 3
    assert table[1].startswith(str(kwargs_run))
    assert table[2].startswith(str(run_id))
    assert "two_steps v1" in table[2] and "pending" in table[2]
    assert table[2].rstrip().endswith("order-7")

    # list --json: one JSON array, newest first, with input, output and error
    records = json.loads(ok(pgflow_cli("list", "--json", "--dsn", dsn)))
    assert [r["id"] for r in records] == [str(kwargs_run), str(run_id)]
    assert records[1] | {"created_at": None} == {
        "id": str(run_id), "name": "two_steps", "version": "1", "queue": "default",
        "status": "pending", "key": "order-7", "priority": 0, "parent_id": None,
        "created_at": None, "started_at": None, "finished_at": None, "input": [3],
        "output": None, "error": None, "unserved": False}

    # filters
    filtered = json.loads(ok(pgflow_cli("list", "--status", "pending", "--name", "two_steps",
                                        "--json", "--dsn", dsn)))
    assert {r["id"] for r in filtered} == {str(run_id), str(kwargs_run)}
    limited = ok(pgflow_cli("list", "--status", "pending", "--name", "two_steps", "--limit", "1",
                            "--dsn", dsn)).splitlines()
    assert len(limited) == 2 and limited[1].startswith(str(kwargs_run))
    for other in (("--status", "completed"), ("--name", "other_workflow")):
        assert json.loads(ok(pgflow_cli("list", *other, "--json", "--dsn", dsn))) == []

    # show: header, then the (still empty) step timeline
    shown = ok(pgflow_cli("show", str(run_id), "--dsn", dsn)).splitlines()
    assert shown[0] == f"run      {run_id}"
    assert shown[1] == "workflow two_steps v1  (queue default)"
    assert shown[2] == "status   pending"
    assert shown[3] == "key      order-7"
    assert "input    [3]" in shown
    assert shown[-1] == "(no steps recorded yet)"

    data = json.loads(ok(pgflow_cli("show", str(run_id), "--json", "--dsn", dsn)))
    assert data["id"] == str(run_id)
    assert data["name"] == "two_steps"
    assert data["status"] == "pending"
    assert data["key"] == "order-7"
    assert data["input"] == [3]
    assert data["steps"] == []


# --- DSN resolution --------------------------------------------------------------------

@pytest.mark.slow
def test_dsn_from_environment(dsn: str, conn: psycopg.Connection[Any]) -> None:
    run_id = pgflow.start(conn, two_steps, 1)

    def listed(env: dict[str, str], *args: str) -> list[str]:
        return [r["id"] for r in json.loads(ok(pgflow_cli("list", "--json", *args, env=env)))]

    # PGFLOW_DSN when --dsn is absent
    assert listed(cli_env(PGFLOW_DSN=dsn)) == [str(run_id)]
    # DATABASE_URL when neither is set; SQLAlchemy-style URLs are accepted
    assert listed(cli_env(DATABASE_URL=as_url(dsn, "postgresql+psycopg"))) == [str(run_id)]
    # precedence: --dsn over PGFLOW_DSN over DATABASE_URL
    assert listed(cli_env(PGFLOW_DSN=dsn, DATABASE_URL=UNREACHABLE)) == [str(run_id)]
    assert listed(cli_env(PGFLOW_DSN=UNREACHABLE, DATABASE_URL=UNREACHABLE),
                  "--dsn", dsn) == [str(run_id)]
    assert_one_line_error(pgflow_cli("list", env=cli_env(PGFLOW_DSN=UNREACHABLE, DATABASE_URL=dsn)),
                          "cannot connect to the database")


# --- end to end ------------------------------------------------------------------------

@pytest.mark.slow
def test_worker_runs_a_started_workflow_and_stops_on_sigterm(dsn, conn, effects, processes):
    worker = processes.worker(dsn, "tests.support.workflows.simple", concurrency=2)
    wait_registered(conn, 1)

    run_id = uuid.UUID(ok(pgflow_cli("start", "two_steps", "--input", "[3]", "--dsn", dsn)).strip())
    wait_status(conn, run_id, "completed")
    assert effects.per_step(run_id) == {"first": 1, "second": 1}

    shown = ok(pgflow_cli("show", str(run_id), "--dsn", dsn)).splitlines()
    assert "status   completed" in shown
    assert "output   8" in shown
    header = next(i for i, line in enumerate(shown) if line.startswith("SEQ"))
    assert shown[header].split() == ["SEQ", "STEP", "STATUS", "ATTEMPTS", "STARTED", "DURATION",
                                     "ERROR"]
    steps = [line.split() for line in shown[header + 1:]]
    assert [s[:4] for s in steps] == [["0", "first", "completed", "1"],
                                      ["1", "second", "completed", "1"]]
    assert all(s[-1] == "ms" for s in steps), shown
    data = json.loads(ok(pgflow_cli("show", str(run_id), "--json", "--dsn", dsn)))
    assert data["output"] == 8
    assert [(s["name"], s["status"]) for s in data["steps"]] == [("first", "completed"),
                                                                 ("second", "completed")]

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, processes.log_of(worker)
    assert "Traceback" not in processes.log_of(worker)


@pytest.mark.parametrize(("args", "fragment"), [
    (["list", "--limit", "0"], "--limit"),
    (["show"], "Missing argument"),
    (["worker", "-c", "0", "tests.support.workflows.simple"], "--concurrency"),
    (["no-such-command"], "No such command"),
    (["start", "x", "--no-such-option"], "No such option"),
])
def test_usage_errors_are_one_line_with_exit_2(args: list[str], fragment: str) -> None:
    assert_one_line_error(pgflow_cli(*args), fragment, exit_code=2)


@pytest.mark.slow
def test_retry_resumes_a_failed_run_and_refuses_others(dsn: str, conn: psycopg.Connection[Any]
                                                       ) -> None:
    register_two_steps(dsn)
    run_id = ok(pgflow_cli("start", "two_steps", "--input", "[1]", "--dsn", dsn)).strip()
    assert_one_line_error(pgflow_cli("retry", run_id, "--dsn", dsn), "only failed runs")
    conn.execute("update pgflow.runs set status = 'failed', finished_at = now(),"
                 " error = '{\"type\": \"X\", \"message\": \"boom\"}' where id = %s", (run_id,))
    assert "resume" in ok(pgflow_cli("retry", run_id, "--dsn", dsn))
    assert conn.execute("select status, error from pgflow.runs where id = %s",
                        (run_id,)).fetchone() == ("pending", None)
    assert_one_line_error(pgflow_cli("retry", "00000000-0000-0000-0000-000000000000",
                                     "--dsn", dsn), "unknown run")
    assert_one_line_error(pgflow_cli("retry", "not-a-uuid", "--dsn", dsn), "not a run id")


# --- signal / cancel -------------------------------------------------------------------

def _started_two_steps(dsn: str, conn: psycopg.Connection[Any]) -> str:
    """A pending (never claimed) run of two_steps, started in SQL: its id as text."""
    register_two_steps(dsn)
    row = conn.execute("select pgflow.start('two_steps', '[1]'::jsonb)").fetchone()
    assert row is not None
    return str(row[0])


def _finish(conn: psycopg.Connection[Any], run_id: str) -> None:
    conn.execute("update pgflow.runs set status = 'completed', output = '1', finished_at = now()"
                 " where id = %s", (run_id,))


def _mailbox(conn: psycopg.Connection[Any], run_id: str) -> list[tuple[Any, ...]]:
    return conn.execute("select name, payload, consumed_seq from pgflow.signals where run_id = %s"
                        " order by id", (run_id,)).fetchall()


@pytest.mark.slow
def test_signal_queues_the_payload_for_the_run(dsn: str, conn: psycopg.Connection[Any]) -> None:
    run_id = _started_two_steps(dsn, conn)
    out = ok(pgflow_cli("signal", run_id, "approve", "--payload", '{"by": "ann", "n": [1, 2]}',
                        "--dsn", dsn))
    assert out.strip() == f"signal 'approve' sent to run {run_id}"
    ok(pgflow_cli("signal", run_id, "ping", "--dsn", dsn))  # no --payload: JSON null
    assert _mailbox(conn, run_id) == [("approve", {"by": "ann", "n": [1, 2]}, None),
                                      ("ping", None, None)]
    assert conn.execute("select status from pgflow.runs where id = %s", (run_id,)).fetchone() == (
        "pending",)


@pytest.mark.slow
def test_signal_refuses_bad_json_unknown_and_finished_runs(dsn: str,
                                                           conn: psycopg.Connection[Any]) -> None:
    run_id = _started_two_steps(dsn, conn)
    assert_one_line_error(pgflow_cli("signal", run_id, "approve", "--payload", "{nope",
                                     "--dsn", dsn), "--payload is not valid JSON")
    unknown = "00000000-0000-4000-8000-000000000002"
    assert_one_line_error(pgflow_cli("signal", unknown, "approve", "--dsn", dsn),
                          f"unknown run {unknown}")
    _finish(conn, run_id)
    assert_one_line_error(pgflow_cli("signal", run_id, "approve", "--payload", "1", "--dsn", dsn),
                          run_id, "completed")
    assert _mailbox(conn, run_id) == []


@pytest.mark.slow
def test_cancel_ends_a_pending_run_and_reports_finished_and_unknown_ones(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    run_id = _started_two_steps(dsn, conn)
    out = ok(pgflow_cli("cancel", run_id, "--dsn", dsn))
    assert out.strip() == f"cancellation of run {run_id} requested"
    # it never ran: cancelled at once
    assert conn.execute("select status, cancel_requested, finished_at is not null from pgflow.runs"
                        " where id = %s", (run_id,)).fetchone() == ("cancelled", True, True)
    again = ok(pgflow_cli("cancel", run_id, "--dsn", dsn))
    assert again.strip() == f"run {run_id} had already finished"

    done = _started_two_steps(dsn, conn)
    _finish(conn, done)
    assert "had already finished" in ok(pgflow_cli("cancel", done, "--dsn", dsn))
    assert conn.execute("select status, cancel_requested from pgflow.runs where id = %s",
                        (done,)).fetchone() == ("completed", False)
    unknown = "00000000-0000-4000-8000-000000000003"
    assert_one_line_error(pgflow_cli("cancel", unknown, "--dsn", dsn), f"unknown run {unknown}")
    assert_one_line_error(pgflow_cli("cancel", "not-a-uuid", "--dsn", dsn), "not a run id")


# --- list filters: --key, --since, --unserved -----------------------------------------

def _start_sql(conn: psycopg.Connection[Any], name: str = "two_steps", **params: Any) -> str:
    """A run started in SQL (pgflow.start's named parameters): its id as text."""
    named = "".join(f", {p} => %({p})s" for p in params)
    row = conn.execute(f"select pgflow.start(%(name)s, '[1]'::jsonb{named})",
                       {"name": name, **params}).fetchone()
    assert row is not None
    return str(row[0])


def _statuses(conn: psycopg.Connection[Any], *run_ids: str) -> list[str]:
    return [conn.execute("select status from pgflow.runs where id = %s", (rid,)).fetchone()[0]
            for rid in run_ids]


def _listed(*args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run ids printed by ``list --json ARGS``, in order."""
    return [r["id"] for r in json.loads(ok(pgflow_cli("list", "--json", *args, env=env)))]


@pytest.mark.slow
def test_list_filters_by_key_and_since(dsn: str, conn: psycopg.Connection[Any]) -> None:
    register_two_steps(dsn)
    ages = {"now": None, "m90": "90 minutes", "d3": "3 days", "d10": "10 days"}
    ids = {label: _start_sql(conn, key=f"k-{label}") for label in ages}
    for label, age in ages.items():
        if age is not None:
            conn.execute("update pgflow.runs set created_at = now() - %s::interval where id = %s",
                         (age, ids[label]))

    def expect(*labels: str) -> list[str]:  # newest first, as list prints them
        return [ids[label] for label in labels]

    assert _listed("--key", "k-d3", "--dsn", dsn) == expect("d3")
    assert _listed("--key", "k-d3", "--since", "2h", "--dsn", dsn) == []
    assert _listed("--since", "30m", "--dsn", dsn) == expect("now")
    assert _listed("--since", "2h", "--dsn", dsn) == expect("now", "m90")
    assert _listed("--since", "7d", "--dsn", dsn) == expect("now", "m90", "d3")
    now = datetime.now(timezone.utc)
    # an ISO date/time with an offset
    assert _listed("--since", (now - timedelta(days=2)).isoformat(), "--dsn", dsn) == \
        expect("now", "m90")
    # a bare date: midnight, local time
    assert _listed("--since", (now - timedelta(days=5)).date().isoformat(), "--dsn", dsn) == \
        expect("now", "m90", "d3")
    # a naive date/time is local time (here UTC+5: read as UTC it would be 2 h in the future)
    naive = (now + timedelta(hours=5) - timedelta(hours=3)).replace(tzinfo=None)
    assert _listed("--since", naive.isoformat(timespec="seconds"), "--dsn", dsn,
                   env=cli_env(TZ="XYZ-5")) == expect("now", "m90")
    assert_one_line_error(pgflow_cli("list", "--since", "yesterday", "--dsn", dsn),
                          "--since 'yesterday'", "30m")


@pytest.mark.slow
def test_list_unserved_marks_runs_no_live_worker_can_serve(dsn: str,
                                                           conn: psycopg.Connection[Any]) -> None:
    register_two_steps(dsn)  # a worker row serving two_steps v1 on queue default
    served = _start_sql(conn)
    v2 = _start_sql(conn, version="2")
    other_queue = _start_sql(conn, queue="elsewhere")
    finished_v2 = _start_sql(conn, version="2")
    _finish(conn, finished_v2)

    rows = {line.split()[0]: line for line in
            ok(pgflow_cli("list", "--dsn", dsn)).splitlines()[1:]}
    assert set(rows) == {served, v2, other_queue, finished_v2}
    assert "two_steps v2  pending  (no worker for v2)" in rows[v2]
    assert "two_steps v1  pending  (no worker for v1)" in rows[other_queue]
    assert "(no worker" not in rows[served] and "pending" in rows[served]
    assert "(no worker" not in rows[finished_v2] and "completed" in rows[finished_v2]

    unserved = ok(pgflow_cli("list", "--unserved", "--dsn", dsn)).splitlines()
    assert unserved[0].split() == ["ID", "WORKFLOW", "STATUS", "CREATED", "KEY"]
    assert {line.split()[0] for line in unserved[1:]} == {v2, other_queue}
    assert all("(no worker for v" in line for line in unserved[1:])
    # the same runs as the view pgflow.unserved_runs
    assert {str(r[0]) for r in conn.execute("select id from pgflow.unserved_runs")} == \
        {v2, other_queue}

    records = {r["id"]: r for r in json.loads(ok(pgflow_cli("list", "--json", "--dsn", dsn)))}
    assert {rid: r["unserved"] for rid, r in records.items()} == {
        served: False, v2: True, other_queue: True, finished_v2: False}
    assert records[v2]["version"] == "2"


# --- bulk cancel / retry ---------------------------------------------------------------

def pgflow_cli_no_tty(*args: str) -> subprocess.CompletedProcess[str]:
    """Like :func:`pgflow_cli`, with stdin not a terminal (so it can never prompt)."""
    return subprocess.run([sys.executable, "-m", "pgflow", *args], cwd=REPO, env=cli_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          check=False)


def pgflow_cli_tty(*args: str, answer: str, prompt: bytes = b"[y/N]",
                   timeout: float = 60) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal; type ``answer`` once ``prompt`` shows.

    Returns the exit code and everything written to the terminal.
    """
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pgflow", *args], cwd=REPO,
                                env=cli_env(TERM="dumb"), stdin=slave, stdout=slave,
                                stderr=slave, close_fds=True)
    finally:
        os.close(slave)
    output = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not answered and prompt in output:
                os.write(master, answer.encode() + b"\n")
                answered = True
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child has exited and closed the terminal
                break
            if not chunk:
                break
            output += chunk
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = output.decode(errors="replace").replace("\r\n", "\n")
    assert answered, f"no prompt {prompt!r} seen:\n{text}"
    return code, text


@pytest.mark.slow
def test_bulk_cancel_by_filter(dsn: str, conn: psycopg.Connection[Any]) -> None:
    register_two_steps(dsn)
    pending = [_start_sql(conn), _start_sql(conn)]
    sleeping = _start_sql(conn, delay=timedelta(hours=1))
    other_name = _start_sql(conn, "other_flow", version="1")
    completed = _start_sql(conn)
    _finish(conn, completed)
    bystanders = [sleeping, other_name, completed]
    before = _statuses(conn, *bystanders)
    assert before == ["sleeping", "pending", "completed"]
    selection = ("--status", "pending", "--name", "two_steps", "--dsn", dsn)

    # no --yes and no terminal to ask: refused, nothing done
    assert_one_line_error(pgflow_cli_no_tty("cancel", *selection),
                          "2 run(s) match", "--yes")
    assert _statuses(conn, *pending) == ["pending", "pending"]

    # a run id and filters together; neither: refused
    assert_one_line_error(pgflow_cli_no_tty("cancel", pending[0], "--name", "two_steps", "--yes",
                                            "--dsn", dsn), "not both")
    assert_one_line_error(pgflow_cli_no_tty("cancel", "--yes", "--dsn", dsn),
                          "give a run id, or filters", "cancel")
    assert _statuses(conn, *pending) == ["pending", "pending"]

    out = ok(pgflow_cli_no_tty("cancel", *selection, "--yes"))
    assert out.strip() == "cancellation requested for 2 run(s)"
    assert _statuses(conn, *pending) == ["cancelled", "cancelled"]
    assert _statuses(conn, *bystanders) == before

    # now nothing matches (finished runs are never selected)
    assert_one_line_error(pgflow_cli_no_tty("cancel", *selection, "--yes"),
                          "no run matches", "nothing to cancel")
    assert _statuses(conn, *bystanders) == before


@pytest.mark.slow
def test_bulk_cancel_asks_on_a_terminal(dsn: str, conn: psycopg.Connection[Any]) -> None:
    register_two_steps(dsn)
    pending = [_start_sql(conn), _start_sql(conn)]
    other_name = _start_sql(conn, "other_flow", version="1")
    selection = ("cancel", "--name", "two_steps", "--dsn", dsn)

    code, text = pgflow_cli_tty(*selection, answer="n")
    assert code == 1, text
    assert "Cancel 2 unfinished run(s)?" in text
    assert "pgflow: error: not confirmed" in text and "Traceback" not in text
    assert _statuses(conn, *pending, other_name) == ["pending", "pending", "pending"]

    code, text = pgflow_cli_tty(*selection, answer="y")
    assert code == 0, text
    assert "cancellation requested for 2 run(s)" in text and "Traceback" not in text
    assert _statuses(conn, *pending, other_name) == ["cancelled", "cancelled", "pending"]


@pytest.mark.slow
def test_bulk_retry_resumes_only_failed_runs(dsn: str, conn: psycopg.Connection[Any]) -> None:
    register_two_steps(dsn)
    failed = [_start_sql(conn), _start_sql(conn)]
    other_failed = _start_sql(conn, "other_flow", version="1")
    pending = _start_sql(conn)
    cancelled = _start_sql(conn)
    conn.execute("select pgflow.cancel(%s)", (cancelled,))
    conn.execute("""update pgflow.runs set status = 'failed', finished_at = now(),
                    error = '{"type": "X", "message": "m"}' where id = any(%s::uuid[])""",
                 ([*failed, other_failed],))
    bystanders = [other_failed, pending, cancelled]
    assert _statuses(conn, *bystanders) == ["failed", "pending", "cancelled"]

    assert_one_line_error(pgflow_cli_no_tty("retry", "--name", "two_steps", "--dsn", dsn),
                          "2 run(s) match", "--yes")
    assert_one_line_error(pgflow_cli_no_tty("retry", "--status", "pending", "--yes",
                                            "--dsn", dsn), "only failed runs can be retried")
    # no id and no filter: refused, even with --yes (not "every failed run")
    assert_one_line_error(pgflow_cli_no_tty("retry", "--yes", "--dsn", dsn),
                          "give a run id, or filters", "retry")
    assert _statuses(conn, *failed) == ["failed", "failed"]
    assert _statuses(conn, *bystanders) == ["failed", "pending", "cancelled"]

    out = ok(pgflow_cli_no_tty("retry", "--name", "two_steps", "--yes", "--dsn", dsn))
    assert out.strip() == "2 run(s) will resume from their last checkpoint"
    assert conn.execute("select status, error, finished_at from pgflow.runs"
                        " where id = any(%s::uuid[])", (failed,)).fetchall() == \
        [("pending", None, None)] * 2
    assert _statuses(conn, *bystanders) == ["failed", "pending", "cancelled"]
    assert_one_line_error(pgflow_cli_no_tty("retry", "--name", "two_steps", "--yes",
                                            "--dsn", dsn), "no run matches", "nothing to retry")
