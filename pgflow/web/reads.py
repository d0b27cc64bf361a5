"""What the pages read: every statement the dashboard runs that is not the runs list.

Plain reads of pgflow's tables and views, schema-qualified and parametrised,
so that a login with only the ``pgflow_reader`` role can serve every page.
Each function takes a connection (from the dashboard's pool) and returns
plain data for the templates and the JSON API.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pgflow import client, flow, models
from pgflow.worker import STALE_AFTER

__all__ = ["Overview", "RunDetail", "overview", "queues", "run_detail", "schedules", "workers"]

RECENT_FAILURES = 10
MAX_CHILDREN = 200
MAX_SIGNALS = 200
FAILURE_HOURS = 24
# Where a worker's liveness lock lives (sql/schema/02_tables.sql, pgflow.workers).
WORKER_LOCK_CLASS = 7366502


def _dicts(cur: Any) -> list[dict[str, Any]]:
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def engine_now(conn: Any) -> datetime:
    """The engine clock (``pgflow.now()``): the time every engine timestamp is written in."""
    value: datetime = conn.execute("select pgflow.now()").fetchone()[0]
    return value


# -- overview -----------------------------------------------------------------

UNFINISHED = ("pending", "running", "sleeping", "waiting")
FINISHED = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Overview:
    now: datetime
    counts: dict[str, int]  # unfinished: all of them; finished: in the last FAILURE_HOURS
    failures_by_hour: list[tuple[datetime, int]]  # the last FAILURE_HOURS hours, oldest first
    recent_failures: list[dict[str, Any]]
    estimated_total: int | None  # every run in the table, the planner's estimate

    @property
    def unfinished(self) -> dict[str, int]:
        return {s: self.counts[s] for s in UNFINISHED}

    @property
    def finished(self) -> dict[str, int]:
        return {s: self.counts[s] for s in FINISHED}


def overview(conn: Any) -> Overview:
    """Counts that cost what the live work and the last day cost, not what history does.

    Unfinished runs are counted exactly (``runs_status_created``); finished ones over
    the last day (``runs_finished``); the whole table only as the planner estimates it.
    """
    now = engine_now(conn)
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = end - timedelta(hours=FAILURE_HOURS)
    counts = dict.fromkeys((*UNFINISHED, *FINISHED), 0)
    for status, n in conn.execute(
            "select r.status, count(*) from pgflow.runs r where r.status = any(%s)"
            " group by r.status", (list(UNFINISHED),)):
        counts[status] = int(n)
    for status, n in conn.execute(
            "select r.status, count(*) from pgflow.runs r where r.finished_at >= %s"
            " group by r.status", (now - timedelta(hours=FAILURE_HOURS),)):
        counts[status] = int(n)
    by_hour = dict.fromkeys((start + timedelta(hours=i) for i in range(FAILURE_HOURS)), 0)
    rows = conn.execute(
        "select date_trunc('hour', r.finished_at, 'UTC') as hour, count(*) from pgflow.runs r"
        " where r.finished_at >= %s and r.finished_at < %s and r.status = 'failed'"
        " group by 1", (start, end))
    for hour, n in rows:
        if hour in by_hour:
            by_hour[hour] = int(n)
    recent = _dicts(conn.execute(
        "select r.id, r.name, r.finished_at, left(r.error ->> 'type', 200) as error_type,"
        " left(r.error ->> 'message', 300) as error_message from pgflow.runs r"
        " where r.status = 'failed' order by r.created_at desc limit %s", (RECENT_FAILURES,)))
    estimate = conn.execute("select c.reltuples::bigint from pg_catalog.pg_class c"
                            " where c.oid = 'pgflow.runs'::regclass").fetchone()[0]
    return Overview(now, counts, sorted(by_hour.items()), recent,
                    int(estimate) if estimate is not None and estimate >= 0 else None)


# -- one run ------------------------------------------------------------------

@dataclass(frozen=True)
class RunDetail:
    run: models.Run
    now: datetime
    extra: dict[str, Any]  # the columns pgflow.get does not return
    attempts: dict[int, list[dict[str, Any]]]  # failed attempts by step seq
    waits: list[dict[str, Any]]  # pgflow.waits: what the run waits for, until when
    signals: list[dict[str, Any]]
    state: list[dict[str, Any]]
    children: list[dict[str, Any]]
    children_total: int
    held: str | None  # why a pending run is not claimed now
    unserved: bool  # unfinished, and no registered worker has its (name, version) on its queue


def run_detail(conn: Any, run_id: uuid.UUID) -> RunDetail:
    """The run (``pgflow.get``, as ``pgflow show``) and everything the run page shows of it."""
    run = client.get(conn, run_id)
    extra = _dicts(conn.execute(
        "select r.concurrency_key, r.schedule_id, r.scheduled_time, r.cancel_requested,"
        " r.continued_as, r.available_at, r.timeout, r.lease_owner, r.held_by"
        " from pgflow.runs r where r.id = %s", (run_id,)))
    attempts: dict[int, list[dict[str, Any]]] = {}
    for a in _dicts(conn.execute(
            "select a.seq, a.attempt, a.error, a.started_at, a.finished_at"
            " from pgflow.step_attempts a where a.run_id = %s order by a.seq, a.attempt, a.id",
            (run_id,))):
        attempts.setdefault(a["seq"], []).append(a)
    waits = _dicts(conn.execute(
        "select w.kind, w.seq, w.step, w.due_at from pgflow.waits w where w.run_id = %s"
        " order by w.due_at", (run_id,)))
    signals = _dicts(conn.execute(
        "select s.id, s.name, s.payload, s.sent_at, s.consumed_seq from pgflow.signals s"
        " where s.run_id = %s order by s.id limit %s", (run_id, MAX_SIGNALS)))
    state = _dicts(conn.execute(
        "select s.key, s.value, s.updated_at from pgflow.run_state s where s.run_id = %s"
        " order by s.key", (run_id,)))
    children = _dicts(conn.execute(
        "select c.id, c.name, c.status, c.created_at, c.finished_at from pgflow.runs c"
        " where c.parent_id = %s order by c.parent_seq, c.parent_index, c.created_at limit %s",
        (run_id, MAX_CHILDREN)))
    total = len(children)
    if total == MAX_CHILDREN:
        total = int(conn.execute("select count(*) from pgflow.runs c where c.parent_id = %s",
                                 (run_id,)).fetchone()[0])
    held = flow.why_pending(conn, run_id) if run.status == "pending" else None
    return RunDetail(run, engine_now(conn), extra[0] if extra else {}, attempts, waits, signals,
                     state, children, total, held, bool(unserved(conn, [run_id])))


def unserved(conn: Any, run_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Those of ``run_ids`` that no registered worker can serve (view ``pgflow.unserved_runs``)."""
    if not run_ids:
        return set()
    return {row[0] for row in conn.execute(
        "select u.id from pgflow.unserved_runs u where u.id = any(%s)", (run_ids,))}


def current_wait(detail: RunDetail) -> str | None:
    """What an unfinished run waits for now, in words (None: it does not wait)."""
    run = detail.run
    if run.finished:
        return None
    if run.status == "pending":
        return detail.held or "ready: waiting for a worker to claim it"
    if run.status == "running":
        return "executing on a worker"
    open_steps = [s for s in run.steps if s.open]
    step = open_steps[-1] if open_steps else None
    due = min((w["due_at"] for w in detail.waits if w["kind"] != "deadline"), default=None)
    until = f" until {due:%Y-%m-%d %H:%M:%S} UTC" if due else ""
    if step is None:
        return f"{run.status}{until}" if run.status != "sleeping" else f"delayed start{until}"
    if step.kind == "sleep":
        return f"sleeping (step {step.name}){until}"
    if step.status == "retrying":
        return f"retry back-off of step {step.name} before attempt {step.attempts + 1}{until}"
    if step.kind == "signal":
        return f"waiting for signal {step.name!r}" + (f" (timeout{until})" if until else "")
    if step.kind == "map":
        remaining = step.output.get("remaining") if isinstance(step.output, dict) else None
        return f"waiting for the items of map {step.name}" + (
            f" ({remaining} to go)" if remaining is not None else "")
    if step.kind == "child":
        child = step.output.get("run_id") if isinstance(step.output, dict) else None
        return f"waiting for child run {child}" if child else "waiting for a child run"
    return f"{step.status} at step {step.name}{until}"


# -- schedules, queues, workers ----------------------------------------------

SCHEDULE_COLUMNS = ("id", "workflow", "cron", "every", "timezone", "queue", "overlap", "paused",
                    "declared", "next_fire_at", "last_fired_at", "start_at", "end_at")


def schedules(conn: Any) -> list[dict[str, Any]]:
    return _dicts(conn.execute(
        f"select {', '.join('s.' + c for c in SCHEDULE_COLUMNS)} from pgflow.schedules s"
        " order by s.id"))


def queues(conn: Any) -> list[flow.QueueInfo]:
    return flow.list_queues(conn)


def queue_holds(q: flow.QueueInfo) -> list[str]:
    """Why the queue's pending runs may wait, from its settings and counts, in words."""
    notes = []
    if q.paused and q.pending:
        notes.append(f"paused: none of its {q.pending} pending run(s) is claimed")
    elif q.paused:
        notes.append("paused: nothing is claimed")
    if q.concurrency is not None and q.running >= q.concurrency:
        notes.append(f"at its cap: {q.running} of {q.concurrency} executing")
    if q.held:
        notes.append(f"{q.held} run(s) held by a workflow's concurrency limit")
    return notes


def workers(conn: Any) -> list[dict[str, Any]]:
    """Registered workers, with heartbeat age and whether their liveness lock is held.

    A worker holds a session advisory lock for as long as its connection lives:
    a held lock means the process is up; a stale heartbeat with no lock means
    it died and recovery will give its runs back.
    """
    rows = _dicts(conn.execute(
        "select w.id, w.hostname, w.pid, w.queues, w.workflows, w.started_at, w.heartbeat_at,"
        " clock_timestamp() - w.heartbeat_at as heartbeat_age,"
        " exists (select 1 from pg_catalog.pg_locks l where l.locktype = 'advisory'"
        "   and l.classid = %s and l.objid = w.lock_key and l.granted"
        "   and l.database = (select d.oid from pg_catalog.pg_database d"
        "                     where d.datname = current_database())) as lock_held,"
        " (select count(*) from pgflow.runs r where r.status = 'running'"
        "   and r.lease_owner = w.id) as running"
        " from pgflow.workers w order by w.hostname, w.pid", (WORKER_LOCK_CLASS,)))
    for w in rows:
        stale = w["heartbeat_age"] > STALE_AFTER
        w["alive"] = w["lock_held"] and not stale
        w["liveness"] = ("alive" if w["alive"] else
                         "silent: heartbeat late, lock still held" if w["lock_held"] else
                         "gone: its connection is closed")
    return rows
