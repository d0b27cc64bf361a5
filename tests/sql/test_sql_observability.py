"""Observability in SQL (sql/schema/14_observability.sql), the procedures called directly.

A run's trace context (``runs.traceparent``): given to ``pgflow.start_run``,
checked, inherited by children and map items, handed to the worker by
``claim_runs``. The queue figures a metrics scrape reads
(``pgflow.queue_metrics()``), and their plan on a large history.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from psycopg.types.json import Jsonb

from tests.support.sqlkit import (
    BAD_ARGUMENT,
    Conn,
    Worker,
    count,
    load_finished_runs,
    plan_nodes,
    raises_sqlstate,
    set_clock,
    start,
    worker_factory,
)

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def workers(dsn: str) -> Iterator[Callable[..., Worker]]:
    with worker_factory(dsn) as make:
        yield make


def start_traced(conn: Conn, traceparent: str | None, name: str = "wf") -> uuid.UUID:
    return conn.execute("select pgflow.start_run(%s, '[]'::jsonb, version => '1',"
                        " traceparent => %s)", (name, traceparent)).fetchone()[0]


def traceparent_of(conn: Conn, run_id: uuid.UUID) -> str | None:
    return conn.execute("select traceparent from pgflow.runs where id = %s",
                        (run_id,)).fetchone()[0]


def queue_metrics(conn: Conn) -> dict[tuple[str, str], tuple[int, float]]:
    return {(q, s): (n, age) for q, s, n, age in conn.execute(
        "select queue, status, runs, oldest_ready_seconds from pgflow.queue_metrics()")}


# -- the trace context ---------------------------------------------------------


def test_start_run_records_the_traceparent_and_the_claim_hands_it_over(conn, workers):
    worker = workers()
    run_id = start_traced(conn, TRACE)
    untraced = start_traced(conn, None)
    assert traceparent_of(conn, run_id) == TRACE
    assert traceparent_of(conn, untraced) is None
    rows = worker.db.execute(
        "select run_id, traceparent, claimed_at - ready_since, claimed_at"
        " from pgflow.claim_runs(%s, array['default'], array['wf'], array['1'], 10)",
        (worker.id,)).fetchall()
    by_run = {row[0]: row for row in rows}
    assert by_run[run_id][1] == TRACE
    assert by_run[untraced][1] is None
    for _, _, delay, claimed_at in rows:
        assert delay >= timedelta(0)
        assert claimed_at is not None


@pytest.mark.parametrize("bad", [
    "",
    "not-a-trace",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # uppercase
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
])
def test_a_malformed_traceparent_is_refused_and_nothing_is_written(conn, bad):
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        start_traced(conn, bad)
    assert "is not a W3C trace context" in str(exc.value)
    assert count(conn, "runs") == 0


def test_children_and_map_items_continue_their_parents_trace(conn, workers):
    worker = workers(workflows=(("wf", "1", "default"), ("child", "1", "default"),
                                ("item", "1", "items")))
    parent = start_traced(conn, TRACE)
    claim = worker.claim_one()
    assert claim.run_id == parent
    child = worker.db.execute(
        "select pgflow.start_child(%s, %s, 0, 'child', '[]'::jsonb, null, 'default', '1', null)",
        (parent, claim.token)).fetchone()[0]
    worker.db.execute("select pgflow.map(%s, %s, 1, 'item', %s, 'items', '1')",
                      (parent, claim.token, Jsonb([[1], [2], [3]])))
    items = [row[0] for row in conn.execute(
        "select id from pgflow.runs where parent_id = %s and name = 'item'", (parent,))]
    assert len(items) == 3
    assert traceparent_of(conn, child) == TRACE
    assert {traceparent_of(conn, item) for item in items} == {TRACE}


def test_a_child_of_an_untraced_run_has_no_trace(conn, workers):
    worker = workers(workflows=(("wf", "1", "default"), ("child", "1", "default")))
    parent = start_traced(conn, None)
    claim = worker.claim_one()
    child = worker.db.execute(
        "select pgflow.start_child(%s, %s, 0, 'child', '[]'::jsonb, null, 'default', '1', null)",
        (parent, claim.token)).fetchone()[0]
    assert traceparent_of(conn, child) is None


# -- queue figures ---------------------------------------------------------------


def test_queue_metrics_counts_unfinished_runs_by_status(conn, workers):
    worker = workers(queues=("default", "idle"))
    set_clock(conn, timedelta(0))
    for _ in range(3):
        start(conn)
    start(conn, delay=timedelta(hours=1))  # sleeping until then
    claimed = worker.claim(limit=1)
    assert len(claimed) == 1
    conn.execute("update pgflow.runs set held_by = 'queue:default' where id = ("
                 " select id from pgflow.runs where status = 'pending' limit 1)")
    load_finished_runs(conn, 50)  # history: not counted
    set_clock(conn, timedelta(seconds=90))  # the pending runs have waited 90 s
    figures = queue_metrics(conn)
    assert {key: n for key, (n, _) in figures.items()} == {
        ("default", "pending"): 1, ("default", "held"): 1, ("default", "running"): 1,
        ("default", "sleeping"): 1,
        ("idle", "pending"): 0,  # served by a worker: its series exists, at 0
    }
    oldest = figures[("default", "pending")][1]
    assert 90 <= oldest < 90 + 60  # ready since the start, 90 s ago on the engine clock
    assert figures[("idle", "pending")][1] == 0
    assert figures[("default", "held")][1] == 0  # parked runs are not "ready"
    assert figures[("default", "sleeping")][1] == 0


def test_queue_metrics_reads_only_unfinished_runs(conn, workers):
    """On 200,000 finished runs the scrape's query walks the status index, not the table."""
    workers()
    load_finished_runs(conn, 200_000)
    for _ in range(5):
        start(conn)
    conn.execute("analyze pgflow.runs")
    body = conn.execute("select prosrc from pg_proc where oid = 'pgflow.queue_metrics'::regproc"
                        ).fetchone()[0]
    plan = conn.execute(f"explain (format json) {body}").fetchone()[0][0]["Plan"]
    scans = [node for node in plan_nodes(plan) if node.get("Relation Name") == "runs"]
    assert scans, plan
    assert all(node["Node Type"] != "Seq Scan" for node in scans), plan
    assert {node.get("Index Name") for node in scans} & {"runs_status_created"}, plan
    assert queue_metrics(conn)[("default", "pending")][0] == 5


def test_queue_metrics_is_granted_to_workers_and_readers(conn):
    # The policy's roles (login roles that tests create and drop are members of them).
    granted = {row[0] for row in conn.execute(
        "select r.rolname from pg_roles r where r.rolname like 'pgflow_%' and not r.rolcanlogin"
        " and has_function_privilege(r.oid, 'pgflow.queue_metrics()', 'execute')")}
    assert granted == {"pgflow_worker", "pgflow_reader"}
