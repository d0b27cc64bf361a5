"""Script helpers for the tests that call the engine's SQL procedures directly.

Shared by ``test_sql_procedures.py`` and ``test_sql_timers.py``. No Python
worker here: a :class:`Worker` is only a registered row, its liveness lock
(held on its own ``listener`` connection) and thin wrappers around
``pgflow.claim`` and the fenced reports.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.support.helpers import wait_for

Conn = psycopg.Connection[Any]

LEASE_LOST = "PF001"
BAD_ARGUMENT = "PF002"
WORKER_UNKNOWN = "PF003"
DUPLICATE_CHECKPOINT = "PF004"
KEY_CONFLICT = "PF005"
WRONG_STATE = "PF006"
UNKNOWN_RUN = "PF404"
CHECK_VIOLATION = "23514"

ERROR = {"type": "ValueError", "message": "boom", "traceback": "..."}
SECOND = timedelta(seconds=1)
STEP_DURATION = timedelta(milliseconds=250)  # what the Worker below reports for every attempt


@contextmanager
def raises_sqlstate(code: str) -> Iterator[pytest.ExceptionInfo[psycopg.Error]]:
    """Expect a database error with SQLSTATE ``code``."""
    with pytest.raises(psycopg.Error) as exc:
        yield exc
    assert exc.value.sqlstate == code, f"expected {code}, got {exc.value.sqlstate}: {exc.value}"


def start(conn: Conn, name: str | None = "wf", input: Any = (), **named: Any) -> uuid.UUID:
    """``pgflow.start(name, input, key => ..., ...)``; ``version`` defaults to '1'."""
    named.setdefault("version", "1")
    args = [sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in named]
    query = sql.SQL("select pgflow.start(%(name)s, %(input)s, {})").format(sql.SQL(", ").join(args))
    value = input if isinstance(input, Jsonb) or input is None else Jsonb(
        list(input) if isinstance(input, tuple) else input)
    row = conn.execute(query, {"name": name, "input": value, **named}).fetchone()
    assert row is not None
    return row[0]


def run_row(conn: Conn, run_id: uuid.UUID) -> dict[str, Any]:
    row = conn.cursor(row_factory=dict_row).execute(
        "select * from pgflow.runs where id = %s", (run_id,)).fetchone()
    assert row is not None, f"run {run_id} does not exist"
    return row


def step_rows(conn: Conn, run_id: uuid.UUID) -> list[dict[str, Any]]:
    return conn.cursor(row_factory=dict_row).execute(
        "select * from pgflow.steps where run_id = %s order by seq", (run_id,)).fetchall()


def timer_rows(conn: Conn, run_id: uuid.UUID | None = None) -> list[dict[str, Any]]:
    """Timers (of one run, or all), earliest first."""
    return conn.cursor(row_factory=dict_row).execute(
        "select * from pgflow.timers where %(r)s::uuid is null or run_id = %(r)s order by due_at, id",
        {"r": run_id}).fetchall()


def attempt_rows(conn: Conn, run_id: uuid.UUID) -> list[dict[str, Any]]:
    """The run's failed attempts (pgflow.step_attempts), in the order they were recorded."""
    return conn.cursor(row_factory=dict_row).execute(
        "select * from pgflow.step_attempts where run_id = %s order by id", (run_id,)).fetchall()


def count(conn: Conn, table: str) -> int:
    row = conn.execute(sql.SQL("select count(*) from pgflow.{}").format(sql.Identifier(table))).fetchone()
    assert row is not None
    return int(row[0])


def engine_now(conn: Conn) -> datetime:
    row = conn.execute("select pgflow.now()").fetchone()
    assert row is not None
    return row[0]


def set_clock(conn: Conn, offset: timedelta) -> None:
    """Move business time (pgflow.now()) to the database clock plus ``offset``; fires nothing."""
    conn.execute("update pgflow.clock set offset_by = %s", (offset,))


def advance_time(conn: Conn, by: timedelta) -> int:
    """``pgflow.advance_time``: move the engine clock forward and fire what came due."""
    row = conn.execute("select pgflow.advance_time(%s)", (by,)).fetchone()
    assert row is not None
    return int(row[0])


def fire_timers(conn: Conn, limit: int = 1000) -> int:
    row = conn.execute("select pgflow.fire_timers(%s)", (limit,)).fetchone()
    assert row is not None
    return int(row[0])


def recover(conn: Conn, stale_after: timedelta = timedelta(seconds=30)) -> int:
    row = conn.execute("select pgflow.recover(%s)", (stale_after,)).fetchone()
    assert row is not None
    return int(row[0])


def load_finished_runs(conn: Conn, n: int) -> None:
    """``n`` completed runs of 'wf' from a day ago: history that no hot path may scan."""
    conn.execute("""
        insert into pgflow.runs (name, version, queue, status, input, output, created_at,
                                 available_at, started_at, finished_at)
        select 'wf', '1', 'default', 'completed', '[]', 'null', t, t, t, t
        from generate_series(1, %s) g, lateral (select now() - interval '1 day' as t) x""", (n,))


def listener(dsn: str, channel: str = "pgflow_ready", guards: Sequence[str] = ()) -> Conn:
    """A second autocommit connection that LISTENs on ``channel``.

    ``guards``: queues it waits for as an idle worker does (``pgflow.guard_wakes``), so
    that what makes their runs ready NOTIFYs even when no older worker is registered.
    """
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
    if guards:
        row = conn.execute("select pgflow.guard_wakes(%s)", (list(guards),)).fetchone()
        assert row is not None and row[0], f"could not guard {list(guards)}"
    return conn


def payloads(conn: Conn, channel: str, timeout: float = 0.5, expect: int | None = None) -> list[str]:
    """Payloads of ``channel`` notifications received within ``timeout``."""
    return [n.payload for n in conn.notifies(timeout=timeout, stop_after=expect) if n.channel == channel]


def ready_payloads(conn: Conn, timeout: float = 0.5, expect: int | None = None) -> list[str]:
    """Payloads of pgflow_ready notifications received within ``timeout``."""
    return payloads(conn, "pgflow_ready", timeout, expect)


@dataclass(frozen=True)
class Claim:
    run_id: uuid.UUID
    name: str
    version: str
    input: Any
    token: int
    journal: list[dict[str, Any]]


class Worker:
    """A registered worker: its liveness lock on ``listener``, its reports on ``db``."""

    def __init__(self, dsn: str, queues: tuple[str, ...] = ("default",),
                 workflows: tuple[tuple[str, str, str], ...] = (("wf", "1", "default"),),
                 announce: dict[str, dict[str, Any]] | None = None) -> None:
        """``announce``: more of what a worker announces of a workflow, by name
        (``{"wf": {"concurrency": {"limit": 1, "key": "c"}, "params": [...]}}``)."""
        self.id = uuid.uuid4()
        self.queues = list(queues)
        self.pairs = [(name, version) for name, version, _ in workflows]
        self.listener: Conn = psycopg.connect(dsn, autocommit=True)
        self.db: Conn = psycopg.connect(dsn, autocommit=True)
        announced = [{"name": n, "version": v, "queue": q, **(announce or {}).get(n, {})}
                     for n, v, q in workflows]
        row = self.listener.execute(
            "select pgflow.register_worker(%s, 'host', 1, %s::text[], %s)",
            (self.id, self.queues, Jsonb(announced))).fetchone()
        assert row is not None
        self.lock_key: int = row[0]

    def _call(self, via: Conn | None, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        cur = (via or self.db).execute(query, params)
        return cur.fetchall() if cur.description else []

    def claim(self, limit: int = 10, *, queues: list[str] | None = None,
              pairs: list[tuple[str, str]] | None = None, via: Conn | None = None) -> list[Claim]:
        pairs = self.pairs if pairs is None else pairs
        rows = self._call(
            via, "select run_id, name, version, input, lease_token, journal"
                 " from pgflow.claim_runs(%s, %s::text[], %s::text[], %s::text[], %s)",
            (self.id, self.queues if queues is None else queues,
             [n for n, _ in pairs], [v for _, v in pairs], limit))
        return [Claim(*row) for row in rows]

    def claim_one(self, **kw: Any) -> Claim:
        claims = self.claim(**kw)
        assert len(claims) == 1, f"expected one claimed run, got {claims}"
        return claims[0]

    def complete_step(self, run_id: uuid.UUID, token: int, seq: int, name: str = "step",
                      output: Any = "ok", kind: str = "step", via: Conn | None = None) -> None:
        self._call(via, "select pgflow.complete_step(%s, %s, %s, %s, %s, %s, %s)",
                   (run_id, token, seq, name, kind, Jsonb(output), STEP_DURATION))

    def fail_step(self, run_id: uuid.UUID, token: int, seq: int, name: str = "step", *,
                  error: dict[str, Any] = ERROR, retryable: bool = True, max_attempts: int = 3,
                  initial: timedelta = SECOND, backoff: float = 2.0, max_delay: timedelta = 3 * SECOND,
                  via: Conn | None = None) -> tuple[str, int, datetime | None]:
        rows = self._call(
            via, "select outcome, attempts, retry_at from pgflow.fail_step("
                 "%s, %s, %s, %s, 'step', %s, %s, %s, %s, %s, %s, %s)",
            (run_id, token, seq, name, Jsonb(error), STEP_DURATION, retryable,
             max_attempts, initial, backoff, max_delay))
        outcome, attempts, retry_at = rows[0]
        return outcome, attempts, retry_at

    def sleep(self, run_id: uuid.UUID, token: int, seq: int, name: str = "nap", *,
              until: datetime | None = None, duration: timedelta | None = None,
              via: Conn | None = None) -> bool:
        """``pgflow.sleep``: true if the run is now suspended."""
        return self._call(via, "select pgflow.sleep(%s, %s, %s, %s, %s, %s)",
                          (run_id, token, seq, name, until, duration))[0][0]

    def record_value(self, run_id: uuid.UUID, token: int, seq: int, kind: str, value: Any = None,
                     via: Conn | None = None) -> Any:
        return self._call(via, "select pgflow.record_value(%s, %s, %s, %s, %s)",
                          (run_id, token, seq, kind, Jsonb(value)))[0][0]

    def complete_run(self, run_id: uuid.UUID, token: int, output: Any = "done",
                     via: Conn | None = None) -> None:
        self._call(via, "select pgflow.complete_run(%s, %s, %s)", (run_id, token, Jsonb(output)))

    def fail_run(self, run_id: uuid.UUID, token: int, error: dict[str, Any] = ERROR,
                 via: Conn | None = None) -> None:
        self._call(via, "select pgflow.fail_run(%s, %s, %s)", (run_id, token, Jsonb(error)))

    def release_run(self, run_id: uuid.UUID, token: int, via: Conn | None = None) -> None:
        self._call(via, "select pgflow.release_run(%s, %s)", (run_id, token))

    def heartbeat(self) -> bool:
        return self._call(None, "select pgflow.heartbeat(%s)", (self.id,))[0][0]

    def lose_liveness_lock(self) -> None:
        """Close the listener (as a crash would) and wait until its backend, and lock, are gone."""
        pid = self.listener.info.backend_pid
        self.listener.close()
        wait_for(lambda: not self.db.execute(
            "select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone(),
            timeout=60, what=f"backend {pid} to exit")

    def close(self) -> None:
        self.listener.close()
        self.db.close()


@contextmanager
def worker_factory(dsn: str) -> Iterator[Callable[..., Worker]]:
    """``make()`` registers a new :class:`Worker`; all are closed on exit.

    Each test module wraps it in its ``workers`` fixture.
    """
    made: list[Worker] = []

    def make(**kw: Any) -> Worker:
        made.append(Worker(dsn, **kw))
        return made[-1]

    try:
        yield make
    finally:
        for worker in made:
            worker.close()


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of an ``EXPLAIN (format json)`` plan, depth first."""
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def assert_plan_uses(conn: Conn, explain: str, table: str, index: str) -> dict[str, Any]:
    """Run ``explain`` (format json); assert ``index`` is used and ``table`` is never seq-scanned."""
    plan = conn.execute(explain).fetchone()[0][0]["Plan"]
    nodes = list(plan_nodes(plan))
    seq_scans = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == table]
    assert seq_scans == [], f"sequential scan of {table} in {plan}"
    assert index in {n.get("Index Name") for n in nodes}, f"{index} not used in {plan}"
    return plan


def received(listen: Conn, conn: Conn, channel: str) -> list[str]:
    """Payloads of ``channel`` notifications committed so far, in order.

    Sends a marker on ``channel`` from ``conn`` and reads up to it: notifications
    arrive in commit order, so whatever came before the marker is everything
    committed before this call, without waiting for a timeout.
    """
    conn.execute("select pg_notify(%s, 'marker')", (channel,))
    found = []
    for notify in listen.notifies(timeout=60):  # ends at the marker
        if notify.channel != channel:
            continue
        if notify.payload == "marker":
            return found
        found.append(notify.payload)
    raise AssertionError(f"the {channel} marker did not arrive")


def is_blocked(conn: Conn, pid: int) -> bool:
    """Whether backend ``pid`` waits for a heavyweight lock (row, transaction, advisory)."""
    return conn.execute("select 1 from pg_stat_activity where pid = %s and wait_event_type = 'Lock'",
                        (pid,)).fetchone() is not None


def wait_until_blocked(conn: Conn, pid: int, what: str = "a lock") -> None:
    """Wait until backend ``pid`` waits for a heavyweight lock."""
    wait_for(lambda: is_blocked(conn, pid), timeout=60, interval=0.01,
             what=f"backend {pid} to wait for {what}")
