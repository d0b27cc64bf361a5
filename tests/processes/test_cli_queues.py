"""``pgflow queues``, ``pgflow queue ...`` and why ``pgflow show``/``list`` say a run waits.

The commands run as a real subprocess; what they did is read back through
another connection. The situations that hold a run back are made directly:
workers are registered rows that claim with ``pgflow.claim_runs``
(``tests/support/sqlkit.py``), no worker process. Every mistake is one line
on stderr, a non-zero exit, and nothing written.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow import flow
from tests.support.cli import assert_one_line_error, ok, pgflow_cli
from tests.support.sqlkit import Worker, start, worker_factory

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"
HEADER = ["NAME", "CONCURRENCY", "RATE", "STATE", "PENDING", "HELD", "RUNNING", "SLEEPING",
          "WAITING"]
PARAMS = [{"name": "c", "kind": "positional", "required": True}]


@pytest.fixture
def workers(dsn: str) -> Iterator[Callable[..., Worker]]:
    with worker_factory(dsn) as make:
        yield make


def limited(make: Callable[..., Worker], key: str | None) -> Worker:
    """A worker of 'wf' (queue default) announcing Concurrency(1, key)."""
    return make(announce={"wf": {"params": PARAMS, "concurrency": {"limit": 1, "key": key}}})


def _settings(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("select name, concurrency, rate_limit, rate_per, paused"
                        " from pgflow.queue_settings order by name").fetchall()


def _queues(dsn: str) -> dict[str, list[str]]:
    """The table of ``pgflow queues``, by name (cells split on runs of spaces)."""
    lines = ok(pgflow_cli("queues", "--dsn", dsn)).splitlines()
    assert re.split(r"\s{2,}", lines[0]) == HEADER
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines[1:])}


def _listed(dsn: str) -> dict[str, str]:
    """``pgflow list``: each run's line, by id."""
    return {line.split()[0]: line
            for line in ok(pgflow_cli("list", "--dsn", dsn)).splitlines()[1:]}


def _held_line(dsn: str, run_id: uuid.UUID) -> str | None:
    """The ``held`` line of ``pgflow show RUN`` (None if there is none), after the status."""
    shown = ok(pgflow_cli("show", str(run_id), "--dsn", dsn)).splitlines()
    assert shown[2] == "status   pending", shown
    held = [line for line in shown if line.startswith("held ")]
    if held:
        assert shown[3] == held[0], shown
    return held[0].removeprefix("held").strip() if held else None


# --- error paths -----------------------------------------------------------------------

ERROR_CASES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    # (id, database, arguments before --dsn, expected fragments of the error line)
    ("rate-no-window", "migrated", ("queue", "set", "q", "--rate", "100"),
     ("rate '100' is not LIMIT/WINDOW", "100/1m")),
    ("rate-unknown-unit", "migrated", ("queue", "set", "q", "--rate", "100/1w"),
     ("rate '100/1w'",)),
    ("rate-text", "migrated", ("queue", "set", "q", "--rate", "fast"), ("rate 'fast'",)),
    ("rate-zero-limit", "migrated", ("queue", "set", "q", "--rate", "0/1m"),
     ("rate limit must be between 1 and 100000, got 0",)),
    ("rate-too-high", "migrated", ("queue", "set", "q", "--rate", "100001/1h"),
     ("rate limit must be between 1 and 100000, got 100001",)),
    ("rate-zero-window", "migrated", ("queue", "set", "q", "--rate", "5/0s"),
     ("rate limit window (per) must be positive",)),
    ("concurrency-zero", "migrated", ("queue", "set", "q", "--concurrency", "0"),
     ("queue concurrency must be between 1 and 100000, got 0",)),
    ("concurrency-negative", "migrated", ("queue", "set", "q", "--concurrency", "-3"),
     ("queue concurrency must be between 1 and 100000, got -3",)),
    ("concurrency-too-high", "migrated", ("queue", "set", "q", "--concurrency", "100001"),
     ("queue concurrency must be between 1 and 100000, got 100001",)),
    # a good option does not make a bad one pass
    ("good-concurrency-bad-rate", "migrated",
     ("queue", "set", "q", "--concurrency", "5", "--rate", "5/fortnight"), ("rate '5/fortnight'",)),
    ("set-empty-name", "migrated", ("queue", "set", "", "--concurrency", "5"),
     ("queue must be a non-empty string",)),
    ("set-blank-name", "migrated", ("queue", "set", "   "), ("queue must be a non-empty string",)),
    ("set-long-name", "migrated", ("queue", "set", "q" * 201, "--concurrency", "5"),
     ("queue must be at most 200 characters, got 201",)),
    ("pause-empty-name", "migrated", ("queue", "pause", ""), ("queue must be a non-empty string",)),
    ("pause-long-name", "migrated", ("queue", "pause", "q" * 201),
     ("queue must be at most 200 characters",)),
    ("resume-empty-name", "migrated", ("queue", "resume", ""),
     ("queue must be a non-empty string",)),
    ("queues-unreachable", "unreachable", ("queues",), ("cannot connect to the database",)),
    ("set-unreachable", "unreachable", ("queue", "set", "q", "--concurrency", "2"),
     ("cannot connect to the database",)),
    ("pause-unreachable", "unreachable", ("queue", "pause", "q"),
     ("cannot connect to the database",)),
    ("queues-not-migrated", "empty", ("queues",), ("pgflow migrate",)),
    ("pause-not-migrated", "empty", ("queue", "pause", "q"), ("pgflow migrate",)),
]


@pytest.mark.parametrize(("database", "args", "fragments"),
                         [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES])
def test_error_is_one_line_on_stderr_and_writes_nothing(
        request: pytest.FixtureRequest, database: str, args: tuple[str, ...],
        fragments: tuple[str, ...]) -> None:
    if database == "unreachable":
        assert_one_line_error(pgflow_cli(*args, "--dsn", UNREACHABLE), *fragments)
        return
    target = request.getfixturevalue("dsn" if database == "migrated" else "empty_dsn")
    assert_one_line_error(pgflow_cli(*args, "--dsn", target), *fragments)
    if database == "migrated":
        with psycopg.connect(target, autocommit=True) as conn:
            assert _settings(conn) == []
            assert conn.execute("select count(*) from pgflow.slots").fetchone() == (0,)


@pytest.mark.parametrize(("args", "fragment"), [
    (["queue", "set"], "Missing argument"),
    (["queue", "pause"], "Missing argument"),
    (["queue", "set", "q", "--concurrency", "many"], "'--concurrency'"),
    (["queue", "set", "q", "--rate"], "'--rate' requires an argument"),
    (["queue", "no-such-verb", "q"], "No such command"),
])
def test_usage_errors_are_one_line_with_exit_2(args: list[str], fragment: str) -> None:
    assert_one_line_error(pgflow_cli(*args), fragment, exit_code=2)


def test_help_lists_the_queue_commands() -> None:
    commands = ok(pgflow_cli("--help")).split("Commands:")[1]
    assert {line.split()[0] for line in commands.splitlines() if line.strip()} >= {
        "queues", "queue"}
    verbs = ok(pgflow_cli("queue", "--help")).split("Commands:")[1]
    assert [line.split()[0] for line in verbs.splitlines() if line.strip()] == [
        "set", "pause", "resume"]


# --- set / pause / resume ----------------------------------------------------------------

def test_set_prints_the_resulting_caps_and_an_omitted_option_removes_its_cap(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    out = ok(pgflow_cli("queue", "set", "emails", "--concurrency", "20", "--rate", "100/1m",
                        "--dsn", dsn))
    assert out == "queue 'emails': concurrency 20, rate 100/1m\n"
    assert _settings(conn) == [("emails", 20, 100, timedelta(minutes=1), False)]
    assert conn.execute("select count(*) filter (where scope = 'queue:emails'),"
                        " count(*) filter (where scope = 'rate:emails') from pgflow.slots"
                        ).fetchone() == (20, 100)

    # only --rate: the concurrency cap goes (the API's None), and the output says so
    out = ok(pgflow_cli("queue", "set", "emails", "--rate", "10/s", "--dsn", dsn))
    assert out == "queue 'emails': concurrency no cap, rate 10/1s\n"
    assert _settings(conn) == [("emails", None, 10, timedelta(seconds=1), False)]

    # nothing: no cap at all
    out = ok(pgflow_cli("queue", "set", "emails", "--dsn", dsn))
    assert out == "queue 'emails': concurrency no cap, rate no limit\n"
    assert _settings(conn) == [("emails", None, None, None, False)]
    assert conn.execute("select count(*) from pgflow.slots").fetchone() == (0,)


def test_pause_and_resume(dsn: str, conn: psycopg.Connection[Any]) -> None:
    pgflow.set_queue(conn, "emails", concurrency=3)
    assert ok(pgflow_cli("queue", "pause", "emails", "--dsn", dsn)) == "queue 'emails' paused\n"
    assert _settings(conn) == [("emails", 3, None, None, True)]
    # setting caps keeps the pause, and says so
    assert ok(pgflow_cli("queue", "set", "emails", "--concurrency", "4", "--dsn", dsn)) == \
        "queue 'emails': concurrency 4, rate no limit (paused)\n"
    assert ok(pgflow_cli("queue", "resume", "emails", "--dsn", dsn)) == \
        "queue 'emails' resumed\n"
    assert _settings(conn) == [("emails", 4, None, None, False)]


@pytest.mark.slow  # several CLI processes
def test_pause_a_queue_never_set_and_resume_one_never_paused(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    ok(pgflow_cli("queue", "pause", "later", "--dsn", dsn))
    assert _settings(conn) == [("later", None, None, None, True)]
    assert ok(pgflow_cli("queue", "resume", "other", "--dsn", dsn)) == "queue 'other' resumed\n"
    assert _settings(conn) == [("later", None, None, None, True)]  # nothing created


# --- list queues -------------------------------------------------------------------------

@pytest.mark.slow  # several CLI processes
def test_queues_lists_caps_state_and_runs_by_state(dsn: str, conn: psycopg.Connection[Any],
                                                   workers: Callable[..., Worker]) -> None:
    empty = ok(pgflow_cli("queues", "--dsn", dsn))
    assert empty.startswith("no queues") and len(empty.splitlines()) == 1
    assert json.loads(ok(pgflow_cli("queues", "--json", "--dsn", dsn))) == []

    w = limited(workers, key=None)  # 'wf' on queue default, one executing at a time
    running = start(conn, input=["a"])
    start(conn, input=["b"])
    start(conn, input=["c"])
    assert [c.run_id for c in w.claim(10)] == [running]  # the two others parked
    start(conn, input=["d"])  # pending, not looked at yet
    pgflow.set_queue(conn, "emails", concurrency=20,
                     rate_limit=pgflow.RateLimit(100, per=timedelta(minutes=1)))
    pgflow.pause_queue(conn, "emails")

    rows = _queues(dsn)
    assert list(rows) == ["default", "emails"]  # by name
    assert rows["default"] == ["default", "-", "-", "active", "3", "2", "1", "0", "0"]
    assert rows["emails"] == ["emails", "20", "100/1m", "paused", "0", "0", "0", "0", "0"]

    records = json.loads(ok(pgflow_cli("queues", "--json", "--dsn", dsn)))
    assert records == [
        {"name": "default", "concurrency": None, "rate_limit": None, "rate_per": None,
         "paused": False, "pending": 3, "held": 2, "running": 1, "sleeping": 0, "waiting": 0},
        {"name": "emails", "concurrency": 20, "rate_limit": 100, "rate_per": 60.0,
         "paused": True, "pending": 0, "held": 0, "running": 0, "sleeping": 0, "waiting": 0}]


# --- why a pending run waits: show and list -----------------------------------------------

def _paused(conn: psycopg.Connection[Any], workers: Callable[..., Worker]) -> uuid.UUID:
    workers()
    pgflow.pause_queue(conn, "default")
    return start(conn, input=["a"])


def _queue_full(conn: psycopg.Connection[Any], workers: Callable[..., Worker]) -> uuid.UUID:
    w = workers()
    pgflow.set_queue(conn, "default", concurrency=1)
    first, second = start(conn, input=["a"]), start(conn, input=["b"])
    assert [c.run_id for c in w.claim(10)] == [first]  # holds the queue's only slot
    return second


def _rate_spent(conn: psycopg.Connection[Any], workers: Callable[..., Worker]) -> uuid.UUID:
    w = workers()
    pgflow.set_queue(conn, "default", rate_limit=pgflow.RateLimit(1, per=timedelta(hours=1)))
    first, second = start(conn, input=["a"]), start(conn, input=["b"])
    assert [c.run_id for c in w.claim(10)] == [first]  # the hour's only start
    return second


def _workflow_limit(conn: psycopg.Connection[Any], workers: Callable[..., Worker]) -> uuid.UUID:
    w = limited(workers, key=None)
    first, second = start(conn, input=["a"]), start(conn, input=["b"])
    assert [c.run_id for c in w.claim(10)] == [first]
    return second


def _key_limit(conn: psycopg.Connection[Any], workers: Callable[..., Worker]) -> uuid.UUID:
    w = limited(workers, key="c")
    first, second, other = (start(conn, input=["c42"]), start(conn, input=["c42"]),
                            start(conn, input=["c7"]))
    assert {c.run_id for c in w.claim(10)} == {first, other}
    return second


HELD_CASES = [
    ("queue-paused", _paused, None, "queue default is paused"),
    ("queue-full", _queue_full, None, "queue default is at its concurrency cap (1 executing)"),
    ("rate-spent", _rate_spent, None, "queue default has spent its rate limit (1/1h)"),
    ("workflow-limit", _workflow_limit, "workflow:wf", "concurrency limit of workflow wf"),
    ("key-limit", _key_limit, 'key:["wf", "c42"]', "concurrency limit of wf for key c42"),
]


@pytest.mark.parametrize(("make", "held_by", "reason"), [case[1:] for case in HELD_CASES],
                         ids=[case[0] for case in HELD_CASES])
def test_show_and_list_say_why_a_pending_run_is_held(
        dsn: str, conn: psycopg.Connection[Any], workers: Callable[..., Worker],
        make: Callable[..., uuid.UUID], held_by: str | None, reason: str) -> None:
    run_id = make(conn, workers)
    assert conn.execute("select status, held_by from pgflow.runs where id = %s",
                        (run_id,)).fetchone() == ("pending", held_by)
    assert flow.why_pending(conn, run_id) == reason
    assert _held_line(dsn, run_id) == reason

    rows = _listed(dsn)
    assert re.split(r"\s{2,}", rows[str(run_id)])[2:4] == ["pending", "(held)"]
    others = [line for rid, line in rows.items() if rid != str(run_id)]
    assert not any("(held)" in line for line in others), rows  # runs that are not held


@pytest.mark.slow  # several CLI processes
def test_show_json_and_several_reasons_at_once(dsn: str, conn: psycopg.Connection[Any],
                                               workers: Callable[..., Worker]) -> None:
    run_id = _workflow_limit(conn, workers)
    pgflow.pause_queue(conn, "default")
    both = "concurrency limit of workflow wf; queue default is paused"
    assert _held_line(dsn, run_id) == both
    data = json.loads(ok(pgflow_cli("show", str(run_id), "--json", "--dsn", dsn)))
    assert (data["status"], data["held"]) == ("pending", both)


@pytest.mark.slow  # several CLI processes
def test_a_run_free_to_go_is_not_marked(dsn: str, conn: psycopg.Connection[Any],
                                        workers: Callable[..., Worker]) -> None:
    w = workers()
    # caps with room left: neither the queue's slot nor its rate is used up
    pgflow.set_queue(conn, "default", concurrency=2,
                     rate_limit=pgflow.RateLimit(5, per=timedelta(hours=1)))
    running, pending = start(conn, input=["a"]), start(conn, input=["b"])
    assert [c.run_id for c in w.claim(1)] == [running]
    assert _held_line(dsn, pending) is None
    data = json.loads(ok(pgflow_cli("show", str(running), "--json", "--dsn", dsn)))
    assert (data["status"], data["held"]) == ("running", None)
    assert not any("(held)" in line for line in _listed(dsn).values())


def test_why_pending_for_many_runs_and_odd_keys(conn: psycopg.Connection[Any],
                                               workers: Callable[..., Worker]) -> None:
    w = limited(workers, key="c")
    runs = {key: [start(conn, input=[key]) for _ in range(2)]
            for key in ("plain", 'with "quotes", commas', 7)}
    w.claim(10)
    parked = {key: pair[1] for key, pair in runs.items()}
    assert flow.why_pending_runs(conn, [r for pair in runs.values() for r in pair]) == {
        parked["plain"]: "concurrency limit of wf for key plain",
        parked['with "quotes", commas']: 'concurrency limit of wf for key with "quotes", commas',
        parked[7]: "concurrency limit of wf for key 7"}
    # not pending, unknown, none asked: nothing to explain
    assert flow.why_pending(conn, runs["plain"][0]) is None
    assert flow.why_pending(conn, uuid.uuid4()) is None
    assert flow.why_pending_runs(conn, []) == {}
