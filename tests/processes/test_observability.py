"""A real ``pgflow worker`` process seen from outside: its ``/metrics`` and its log lines.

The metrics are read as Prometheus reads them (an HTTP GET of ``/metrics``,
parsed with ``prometheus_client``'s own parser) and compared with exact counts
of what the test made happen: runs completed and failed, step attempts by
outcome, claims. The logs are the worker's stdout and stderr, line by line.
Deadlines only bound a hang; nothing here measures a speed.

The workflows are in ``tests/support/workflows/observed.py``.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import pgflow
from pgflow.metrics import SERIES
from tests.support.cli import assert_one_line_error, pgflow_cli
from tests.support.helpers import Effects, Processes, wait_for, wait_registered, wait_status
from tests.support.workflows.observed import bad, good, meeter, waiter

MODULE = "tests.support.workflows.observed"
GOOD_RUNS = 7
BAD_RUNS = 3  # obs_explode: Retry(max_attempts=2), so 2 attempts and 2 claims a run
WAITERS = 2
MEETERS = 20
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


# --- scraping --------------------------------------------------------------------------

def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> list[Sample]:
    """Every sample of one GET of the worker's ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


def _series(samples: Iterable[Sample], name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples called ``name``, keyed by the values of ``labels`` (which must be all
    their labels)."""
    found: dict[tuple[str, ...], float] = {}
    for sample in samples:
        if sample.name == name:
            assert set(sample.labels) == set(labels), sample
            key = tuple(sample.labels[label] for label in labels)
            assert key not in found, f"two samples {name}{sample.labels}"
            found[key] = sample.value
    return found


def _one(samples: Iterable[Sample], name: str) -> float:
    values = _series(samples, name)
    assert set(values) == {()}, f"{name}: {values}"
    return values[()]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _declared_labels(name: str) -> tuple[str, ...]:
    """The labels ``pgflow.metrics.SERIES`` declares for sample ``name`` (a counter's or a
    histogram's ``_created`` sample has those of its ``_total`` or ``_count``)."""
    base = name.removesuffix("_created")
    for candidate in (name, base + "_total", base + "_count"):
        if candidate in SERIES:
            return SERIES[candidate]
    raise AssertionError(f"{name} is not a declared series")


def _assert_bounded_labels(samples: Iterable[Sample]) -> None:
    """pgflow's samples are the series ``pgflow.metrics.SERIES`` declares, with its labels,
    and no sample names a run: no ``run_id`` label, no label value that is a UUID."""
    pgflow_samples = 0
    for sample in samples:
        assert "run_id" not in sample.labels, sample
        assert not any(_is_uuid(value) for value in sample.labels.values()), sample
        if sample.name.startswith("pgflow_"):
            assert set(sample.labels) == set(_declared_labels(sample.name)), sample
            pgflow_samples += 1
    assert pgflow_samples, "no pgflow series at all"


def _metrics_worker(processes: Processes, dsn: str, *args: str, concurrency: int = 10,
                    env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """A worker of the observed workflows serving /metrics on 127.0.0.1; once it answers."""
    port = _free_port()
    proc = processes.worker(dsn, MODULE, concurrency=concurrency, extra_env=env,
                            extra_args=("--metrics-port", str(port),
                                        "--metrics-host", "127.0.0.1", *args))

    def answers() -> list[Sample] | None:
        assert proc.poll() is None, f"the worker exited\n{processes.log_of(proc)}"
        try:
            return _scrape(port)
        except (urllib.error.URLError, ConnectionError):
            return None

    wait_for(answers, timeout=60, what=f"/metrics on port {port}")
    return proc, port


def _statuses(conn: psycopg.Connection[Any], run_ids: Iterable[uuid.UUID]) -> list[str]:
    return [row[0] for row in conn.execute(
        "select status from pgflow.runs where id = any(%s) order by id", (list(run_ids),))]


def _ready_age(conn: psycopg.Connection[Any], run_id: uuid.UUID) -> float:
    """Seconds since ``run_id`` became ready, on the engine's clock."""
    row = conn.execute("select extract(epoch from pgflow.now() - available_at)::float8"
                       " from pgflow.runs where id = %s", (run_id,)).fetchone()
    assert row is not None
    return float(row[0])


def _wait_for_scrape(port: int, finished: int, what: str) -> list[Sample]:
    """A scrape that counts ``finished`` ended runs or more, and none in flight."""
    def settled() -> list[Sample] | None:
        samples = _scrape(port)
        ended = sum(_series(samples, "pgflow_runs_finished_total", "workflow", "status").values())
        in_flight = _series(samples, "pgflow_worker_runs_in_flight")
        return samples if ended >= finished and in_flight == {(): 0.0} else None

    return wait_for(settled, timeout=60, interval=0.2, what=what)


# --- metrics ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_scrape_counts_what_a_live_worker_did(dsn: str, conn: psycopg.Connection[Any],
                                                processes: Processes,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker serving /metrics; 7 runs complete in two steps, 3 fail after two attempts,
    2 wait for a signal, 1 sits on a queue no worker serves.

    Midway (the waiters suspended, the backlog unclaimed) the queue gauges show the 2
    waiting runs and the backlog, its age between two readings of the database taken
    before and after the scrape, and nothing is in flight. At the end every counter is
    exact, series by series: runs finished by status, step executions by outcome
    (completed 7 + 7; retrying 3 and failed 3; the waiters' step 2), as many durations
    as executions, and every claim counted once (a good run is claimed once, a failing
    run twice: its retry is claimed again, a waiter twice: before and after its signal);
    nothing in flight, no run ready on a served queue. No series has a label that names
    a run.
    """
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    _, port = _metrics_worker(processes, dsn)
    wait_registered(conn, 1)

    waiters = [pgflow.start(conn, waiter) for _ in range(WAITERS)]
    wait_for(lambda: _statuses(conn, waiters) == ["waiting"] * WAITERS, timeout=60,
             what="both waiters waiting")
    backlog = pgflow.start(conn, good, "backlog", queue="obs_unserved")
    age_before = _ready_age(conn, backlog)
    midway = _scrape(port)
    age_after = _ready_age(conn, backlog)

    _assert_bounded_labels(midway)
    assert _series(midway, "pgflow_queue_runs", "queue", "status") == {
        ("obs", "pending"): 0, ("obs_multi", "pending"): 0, ("obs_wait", "pending"): 0,
        ("obs_wait", "waiting"): WAITERS, ("obs_unserved", "pending"): 1}
    oldest = _series(midway, "pgflow_queue_oldest_ready_seconds", "queue")
    assert age_before <= oldest.pop(("obs_unserved",)) <= age_after
    assert oldest == {("obs",): 0, ("obs_multi",): 0, ("obs_wait",): 0}
    assert _one(midway, "pgflow_worker_runs_in_flight") == 0  # a suspended run is not
    assert _series(midway, "pgflow_claim_delay_seconds_count", "queue") == {
        ("obs_wait",): WAITERS}
    assert _series(midway, "pgflow_runs_finished_total", "workflow", "status") == {}

    with conn.transaction():
        goods = [pgflow.start(conn, good, f"order-{n}") for n in range(GOOD_RUNS)]
        bads = [pgflow.start(conn, bad, f"bad-{n}") for n in range(BAD_RUNS)]
    for run_id in waiters:
        pgflow.signal(conn, run_id, "go", "now")
    wait_for(lambda: (_statuses(conn, goods + waiters) == ["completed"] * (GOOD_RUNS + WAITERS)
                      and _statuses(conn, bads) == ["failed"] * BAD_RUNS),
             timeout=60, what="every run finished")
    final = _wait_for_scrape(port, GOOD_RUNS + BAD_RUNS + WAITERS, "the finished runs scraped")

    _assert_bounded_labels(final)
    steps = _series(final, "pgflow_steps_total", "workflow", "step", "outcome")
    assert {
        "runs": _series(final, "pgflow_runs_finished_total", "workflow", "status"),
        "steps": steps,
        "durations": _series(final, "pgflow_step_duration_seconds_count", "workflow", "step"),
        "claims": _series(final, "pgflow_claim_delay_seconds_count", "queue"),
    } == {
        "runs": {("obs_good", "completed"): GOOD_RUNS, ("obs_bad", "failed"): BAD_RUNS,
                 ("obs_waiter", "completed"): WAITERS},
        "steps": {("obs_good", "obs_charge", "completed"): GOOD_RUNS,
                  ("obs_good", "obs_ship", "completed"): GOOD_RUNS,
                  ("obs_bad", "obs_explode", "retrying"): BAD_RUNS,
                  ("obs_bad", "obs_explode", "failed"): BAD_RUNS,
                  ("obs_waiter", "obs_after_signal", "completed"): WAITERS},
        "durations": {("obs_good", "obs_charge"): GOOD_RUNS, ("obs_good", "obs_ship"): GOOD_RUNS,
                      ("obs_bad", "obs_explode"): 2 * BAD_RUNS,
                      ("obs_waiter", "obs_after_signal"): WAITERS},
        "claims": {("obs",): GOOD_RUNS + 2 * BAD_RUNS, ("obs_wait",): 2 * WAITERS},
    }
    buckets = _series(final, "pgflow_step_duration_seconds_bucket", "workflow", "step", "le")
    counts = _series(final, "pgflow_step_duration_seconds_count", "workflow", "step")
    assert {key[:2]: n for key, n in buckets.items() if key[2] == "+Inf"} == counts
    assert _one(final, "pgflow_worker_runs_in_flight") == 0
    assert _series(final, "pgflow_queue_runs", "queue", "status") == {
        ("obs", "pending"): 0, ("obs_multi", "pending"): 0, ("obs_wait", "pending"): 0,
        ("obs_unserved", "pending"): 1}
    oldest = _series(final, "pgflow_queue_oldest_ready_seconds", "queue")
    assert oldest.pop(("obs_unserved",)) >= age_after
    assert oldest == {("obs",): 0, ("obs_multi",): 0, ("obs_wait",): 0}


@pytest.mark.slow
def test_claim_delay_is_labelled_with_the_queue_the_run_was_claimed_from(
        dsn: str, conn: psycopg.Connection[Any], processes: Processes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of obs_good (whose default queue is ``obs``) started on ``obs_alt``, by a
    worker that serves ``obs_alt`` only: their claims count under ``queue="obs_alt"``,
    the queue they waited in, and nothing under ``obs``, a queue this worker does not
    serve."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    _, port = _metrics_worker(processes, dsn, "--queue", "obs_alt")
    wait_registered(conn, 1)
    runs = [pgflow.start(conn, good, f"alt-{n}", queue="obs_alt") for n in range(2)]
    wait_for(lambda: _statuses(conn, runs) == ["completed"] * 2, timeout=60,
             what="the obs_alt runs completed")
    final = _wait_for_scrape(port, 2, "the obs_alt runs scraped")

    assert _series(final, "pgflow_runs_finished_total", "workflow", "status") == {
        ("obs_good", "completed"): 2}
    assert _series(final, "pgflow_claim_delay_seconds_count", "queue") == {("obs_alt",): 2}
    assert _series(final, "pgflow_queue_runs", "queue", "status") == {("obs_alt", "pending"): 0}


@pytest.mark.slow
def test_workers_sharing_a_multiprocess_dir_are_summed_by_the_one_endpoint(
        dsn: str, conn: psycopg.Connection[Any], effects: Effects, processes: Processes,
        tmp_path: Path) -> None:
    """Two workers (concurrency 1 each) with one empty ``PROMETHEUS_MULTIPROC_DIR``, only the
    first serving /metrics; 20 runs of obs_meeter.

    Both workers execute runs, deterministically: the first run's step holds its worker
    until a step of another process has started (``obs_meet``), which only the other
    worker can do. The effects log says which process executed each run. The one
    endpoint counts all 20 runs and their 20 steps, not only its own process's share,
    and nothing in flight once they are done.
    """
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {MULTIPROC_ENV: str(shared)}
    served, port = _metrics_worker(processes, dsn, concurrency=1, env=env)
    other = processes.worker(dsn, MODULE, concurrency=1, extra_env=env)
    wait_registered(conn, 2)

    with conn.transaction():
        runs = [pgflow.start(conn, meeter) for _ in range(MEETERS)]
    wait_for(lambda: _statuses(conn, runs) == ["completed"] * MEETERS, timeout=60,
             what=f"{MEETERS} completed runs")
    by_pid = dict(conn.execute("select pid, count(*) from public.effects"
                               " where step = 'obs_meet' group by pid").fetchall())
    assert set(by_pid) == {served.pid, other.pid}, by_pid  # both executed runs
    assert sum(by_pid.values()) == MEETERS == effects.count(step="obs_meet")  # each once

    final = _wait_for_scrape(port, by_pid[served.pid], "the served worker's runs scraped")
    assert {
        "runs": _series(final, "pgflow_runs_finished_total", "workflow", "status"),
        "steps": _series(final, "pgflow_steps_total", "workflow", "step", "outcome"),
    } == {
        "runs": {("obs_meeter", "completed"): MEETERS},
        "steps": {("obs_meeter", "obs_meet", "completed"): MEETERS},
    }, f"runs executed by pid: {by_pid} (served: {served.pid})"
    assert _one(final, "pgflow_worker_runs_in_flight") == 0
    assert _series(final, "pgflow_claim_delay_seconds_count", "queue") == {
        ("obs_multi",): MEETERS}


# --- logs ------------------------------------------------------------------------------

def _run_good_and_bad(conn: psycopg.Connection[Any], processes: Processes,
                      worker: subprocess.Popen[bytes], tag: str) -> tuple[uuid.UUID, uuid.UUID, str]:
    """One obs_good and one obs_bad run to their ends, then the worker drained and
    stopped; returns their ids and everything the worker printed."""
    wait_registered(conn, 1)
    good_id = pgflow.start(conn, good, f"order-{tag}")
    bad_id = pgflow.start(conn, bad, f"bad-{tag}")
    wait_status(conn, good_id, "completed")
    wait_status(conn, bad_id, "failed")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, processes.log_of(worker)
    return good_id, bad_id, processes.log_of(worker)


@pytest.mark.slow
def test_json_logs_are_one_object_a_line_with_the_run_context(
        dsn: str, conn: psycopg.Connection[Any], processes: Processes) -> None:
    """``--log-format json``: every line the worker prints, from start to drained exit, is
    a JSON object with time (ISO 8601, with its zone), level, logger and message.

    The application's own record inside a step carries the run's id, workflow, step and
    attempt (1, and 2 for the retried attempt of obs_explode); records outside a run carry
    none of them. The failing run logs each failed attempt at WARNING and its failure at
    ERROR; no record about a failure is at INFO or below, and the completing run logs
    nothing at WARNING or above.
    """
    worker = processes.worker(dsn, MODULE, extra_args=("--log-format", "json"))
    good_id, bad_id, output = _run_good_and_bad(conn, processes, worker, "j")

    records = []
    for line in output.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        assert datetime.fromisoformat(record["time"]).utcoffset() is not None, line
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        if "step" in record or "attempt" in record:
            assert {"run_id", "workflow", "step", "attempt"} <= set(record), line
        if "run_id" in record:
            assert "workflow" in record, line
        records.append(record)
    assert any("registered" in r["message"] and "run_id" not in r for r in records), output

    def app(message: str) -> list[tuple[Any, ...]]:
        return [(r["level"], r.get("run_id"), r.get("workflow"), r.get("step"), r.get("attempt"))
                for r in records if r["logger"] == "app" and r["message"] == message]

    assert app("charging order-j") == [("INFO", str(good_id), "obs_good", "obs_charge", 1)]
    assert app("exploding bad-j") == [("INFO", str(bad_id), "obs_bad", "obs_explode", 1),
                                      ("INFO", str(bad_id), "obs_bad", "obs_explode", 2)]

    about_bad = [(r["level"], r["message"]) for r in records
                 if r.get("run_id") == str(bad_id) and r["logger"] != "app"]
    assert [level for level, _ in about_bad] == ["WARNING", "WARNING", "ERROR"], about_bad
    assert about_bad[0][1].startswith("step obs_explode (attempt 1) failed, will be retried")
    assert about_bad[1][1].startswith("step obs_explode (attempt 2) failed after")
    assert about_bad[2][1].startswith(f"run {bad_id} failed: StepFailed: "), about_bad
    assert all(r["workflow"] == "obs_bad" for r in records if r.get("run_id") == str(bad_id))

    quiet = ("DEBUG", "INFO")
    assert [r for r in records if r["level"] in quiet and "fail" in r["message"].lower()] == []
    assert [r for r in records
            if r.get("run_id") == str(good_id) and r["level"] not in quiet] == []


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) "
                       r"(?P<logger>[\w.]+): (?P<message>.*?)(?: \[(?P<context>[^\]]*)\])?$")


@pytest.mark.slow
def test_text_logs_end_with_the_run_context(dsn: str, conn: psycopg.Connection[Any],
                                            processes: Processes) -> None:
    """The default text format: a step's own log line ends with
    ``[run_id=… workflow=… step=… attempt=…]`` (attempt 2 on the retried attempt), the
    run's failure line with ``[run_id=… workflow=…]``, and a line outside any run with
    no brackets at all."""
    worker = processes.worker(dsn, MODULE)
    good_id, bad_id, output = _run_good_and_bad(conn, processes, worker, "t")

    lines = output.splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), output

    def context(logger: str, message: str) -> list[str | None]:
        return [m["context"] for m in map(TEXT_LINE.match, lines)
                if m and m["logger"] == logger and m["message"].startswith(message)]

    assert context("app", "charging order-t") == [
        f"run_id={good_id} workflow=obs_good step=obs_charge attempt=1"]
    assert context("app", "exploding bad-t") == [
        f"run_id={bad_id} workflow=obs_bad step=obs_explode attempt={n}" for n in (1, 2)]
    assert context("pgflow.worker", f"run {bad_id} failed") == [
        f"run_id={bad_id} workflow=obs_bad"]
    registered = context("pgflow.worker", "worker ")
    assert registered and set(registered) == {None}, output


# --- command line ----------------------------------------------------------------------

def _no_worker_registered(conn: psycopg.Connection[Any]) -> bool:
    return conn.execute("select count(*) from pgflow.workers").fetchone()[0] == 0


def test_unknown_log_format_is_one_error_line(dsn: str, conn: psycopg.Connection[Any]) -> None:
    """``--log-format xml``: one error line naming the option and the value, exit 1, and no
    worker started."""
    assert_one_line_error(pgflow_cli("worker", MODULE, "--log-format", "xml", "--dsn", dsn),
                          "--log-format", "xml")
    assert _no_worker_registered(conn)


def test_metrics_port_in_use_is_one_error_line(dsn: str, conn: psycopg.Connection[Any]) -> None:
    """``--metrics-port`` on a port the test is listening on (on every address, as the
    endpoint's default host): one error line naming the address and port, exit 1, and no
    worker started."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = assert_one_line_error(
            pgflow_cli("worker", MODULE, "--metrics-port", str(port), "--dsn", dsn,
                       timeout=30), f"0.0.0.0:{port}")
    assert "metrics" in line
    assert _no_worker_registered(conn)


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_metrics_port_out_of_range_is_a_usage_error(port: str, dsn: str,
                                                    conn: psycopg.Connection[Any]) -> None:
    """A ``--metrics-port`` outside 1..65535 is a usage error (exit 2, one line naming the
    option), and no worker starts."""
    assert_one_line_error(pgflow_cli("worker", MODULE, "--metrics-port", port, "--dsn", dsn,
                                     timeout=30), "--metrics-port", exit_code=2)
    assert _no_worker_registered(conn)
