"""The worker's calls of the engine's stored procedures (``sql/schema/``, mapped in ``sql/README.md``).

One function a procedure, one round trip each, on autocommit connections:
every call is its own transaction. Errors raised by the procedures come back
as pgflow exceptions (:func:`pgflow.errors.from_database`).

The journal types they return are :mod:`pgflow.journal`'s. Checkpoints,
completions and sleeps of many runs share calls through :mod:`pgflow.reporter`;
:meth:`Procedures.fail_step` sends the retry policy, and ``pgflow.fail_step``
decides in SQL whether and when the step runs again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from pgflow import errors
from pgflow.journal import FailOutcome, JournalEntry
from pgflow.retry import Retry

Conn = psycopg.AsyncConnection[Any]

REPORT_RETRY_FOR = 30.0  # seconds a report keeps retrying through connection failures


@dataclass(frozen=True)
class ClaimedRun:
    run_id: uuid.UUID
    name: str
    version: str
    input: Any
    lease_token: int
    journal: list[JournalEntry]
    cancel_requested: bool = False
    cancel_seq: int | None = None
    scheduled_time: datetime | None = None  # the schedule tick that started it, if any
    limited: bool = False  # holds concurrency slots: its end frees one (claim again then)
    traceparent: str | None = None  # the trace its spans continue (pgflow.tracing)
    claim_delay: float = 0.0  # seconds from ready to claimed (metrics)
    queue: str | None = None  # the run's queue (not always its workflow's default)


class BatchReport(Protocol):
    """One element of ``pgflow.complete_batch`` (see :class:`pgflow.reporter.Report`)."""

    run_id: uuid.UUID
    token: int
    seq: int | None
    name: str | None
    kind: str | None
    output: Any
    duration_s: float | None
    finish: bool
    result: Any
    sleep_seq: int | None
    sleep_until: datetime | None
    sleep_seconds: float | None
    age_s: float | None


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        translated = errors.from_database(exc)
        if translated is exc:
            raise
        raise translated from None


class ReportFailed(Exception):
    """The database stayed unreachable for a report through every retry."""


class Procedures:
    """Engine procedure calls over a connection pool.

    Reports are retried through connection failures (a restarting database,
    a dropped connection) for up to ``retry_for`` seconds. A checkpoint whose
    first try committed but whose reply was lost comes back as a duplicate on
    the retry, which is then the success it is (see :meth:`complete_batch`).
    """

    def __init__(self, pool: AsyncConnectionPool[Any], retry_for: float = REPORT_RETRY_FOR) -> None:
        self.pool = pool
        self.retry_for = retry_for

    async def _execute(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        rows, _retried = await self._execute_retrying(sql, params)
        return rows

    async def _execute_retrying(self, sql: str, params: tuple[Any, ...],
                                ) -> tuple[list[tuple[Any, ...]], bool]:
        """Rows, and whether the call had to be repeated (its first try may have committed)."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        retried = False
        while True:
            try:
                async with _translated(), self.pool.connection() as conn:
                    cur = await conn.execute(sql, params)
                    return (await cur.fetchall() if cur.description else []), retried
            except psycopg.errors.UniqueViolation:
                raise
            except psycopg.Error as exc:
                if not isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
                    raise
                if time.monotonic() + delay > deadline:
                    raise ReportFailed(f"database unreachable for {self.retry_for:.0f}s: "
                                       f"{str(exc).strip()}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                retried = True

    async def complete_batch(self, reports: Sequence[BatchReport]) -> dict[uuid.UUID, str]:
        """Checkpoints, completions and sleeps of many runs in one transaction: outcome by run.

        A step found already recorded on a repeated call (the first try committed
        but its answer was lost) is the success it is.
        """
        rows, retried = await self._execute_retrying(
            "select run_id, outcome from pgflow.complete_batch(%s::uuid[], %s::bigint[],"
            " %s::integer[], %s::text[], %s::text[], %s::jsonb[], %s::float8[], %s::boolean[],"
            " %s::jsonb[], %s::integer[], %s::timestamptz[], %s::float8[], %s::float8[])",
            ([r.run_id for r in reports], [r.token for r in reports], [r.seq for r in reports],
             [r.name for r in reports], [r.kind for r in reports],
             [None if r.seq is None else Jsonb(r.output) for r in reports],
             [r.duration_s for r in reports], [r.finish for r in reports],
             [Jsonb(r.result) if r.finish else None for r in reports],
             [r.sleep_seq for r in reports], [r.sleep_until for r in reports],
             [r.sleep_seconds for r in reports], [r.age_s for r in reports]))
        outcomes = {row[0]: row[1] for row in rows}
        if retried:
            outcomes = {run: "ok" if outcome == "duplicate" else outcome
                        for run, outcome in outcomes.items()}
        return outcomes

    async def fail_step(self, run_id: uuid.UUID, token: int, seq: int, name: str, kind: str,
                        error: dict[str, Any], duration: timedelta, retryable: bool,
                        policy: Retry) -> FailOutcome:
        rows = await self._execute(
            "select outcome, attempts from pgflow.fail_step("
            "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (run_id, token, seq, name, kind, Jsonb(error), duration, retryable,
             policy.max_attempts, policy.initial_interval, policy.backoff, policy.max_interval))
        return FailOutcome(outcome=rows[0][0], attempts=rows[0][1])

    async def record_value(self, run_id: uuid.UUID, token: int, seq: int, kind: str,
                           value: Any, name: str | None = None) -> Any:
        rows = await self._execute("select pgflow.record_value(%s, %s, %s, %s, %s, %s)",
                                   (run_id, token, seq, kind, Jsonb(value), name))
        return rows[0][0]

    async def wait_signal(self, run_id: uuid.UUID, token: int, seq: int, name: str,
                          timeout: timedelta | None) -> tuple[str, Any]:
        rows = await self._execute(
            "select outcome, payload from pgflow.wait_signal(%s, %s, %s, %s, %s)",
            (run_id, token, seq, name, timeout))
        return rows[0][0], rows[0][1]

    async def set_state(self, run_id: uuid.UUID, token: int, key: str, value: Any) -> bool:
        rows = await self._execute("select pgflow.set_state(%s, %s, %s, %s)",
                                   (run_id, token, key, Jsonb(value)))
        return bool(rows[0][0])

    async def start_child(self, run_id: uuid.UUID, token: int, seq: int,
                          start: tuple[Any, ...]) -> uuid.UUID:
        # The child's concurrency key: SQL reads it from the input.
        name, input_text, key, queue, _priority, _delay, version, timeout, _ckey = start
        rows = await self._execute(
            "select pgflow.start_child(%s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)",
            (run_id, token, seq, name, input_text, key, queue, version, timeout))
        return rows[0][0]

    async def wait_child(self, run_id: uuid.UUID, token: int, seq: int,
                         child_id: uuid.UUID) -> dict[str, Any] | None:
        rows = await self._execute("select pgflow.wait_child(%s, %s, %s, %s)",
                                   (run_id, token, seq, child_id))
        return rows[0][0]

    async def map(self, run_id: uuid.UUID, token: int, seq: int, name: str, inputs: list[Any],
                  queue: str, version: str) -> dict[str, Any] | None:
        """None: the run waits for the items; else their outcomes ``{items: [...]}``."""
        rows = await self._execute("select pgflow.map(%s, %s, %s, %s, %s, %s, %s)",
                                   (run_id, token, seq, name, Jsonb(inputs), queue, version))
        return rows[0][0]

    async def continue_as_new(self, run_id: uuid.UUID, token: int, input: Any) -> uuid.UUID:
        rows = await self._execute("select pgflow.continue_as_new(%s, %s, %s)",
                                   (run_id, token, Jsonb(input)))
        return rows[0][0]

    async def cancel_run(self, run_id: uuid.UUID, token: int) -> None:
        await self._execute("select pgflow.cancel_run(%s, %s)", (run_id, token))

    async def fail_run(self, run_id: uuid.UUID, token: int, error: dict[str, Any]) -> None:
        await self._execute("select pgflow.fail_run(%s, %s, %s)", (run_id, token, Jsonb(error)))

    async def release_run(self, run_id: uuid.UUID, token: int) -> None:
        await self._execute("select pgflow.release_run(%s, %s)", (run_id, token))

    async def heartbeat(self, worker_id: uuid.UUID) -> bool:
        rows = await self._execute("select pgflow.heartbeat(%s)", (worker_id,))
        return bool(rows and rows[0][0])

    async def recover(self, stale_after: timedelta) -> int:
        rows = await self._execute("select pgflow.recover(%s)", (stale_after,))
        return int(rows[0][0])


_CLAIMED = ("select run_id, name, version, input, lease_token, journal, cancel_requested,"
            " cancel_seq, scheduled_time, limited, traceparent,"
            " extract(epoch from claimed_at - ready_since)::float8, queue"
            " from pgflow.claim_runs(%s, %s, %s, %s, %s{})")
_CLAIM = _CLAIMED.format("")
_CLAIM_AFTER_ENDED = _CLAIMED.format(", %s, %s")  # revision 0014: p_ended, p_ended_tokens


async def claim_runs(conn: Conn, worker_id: uuid.UUID, queues: list[str],
                     workflows: list[tuple[str, str]], limit: int,
                     ended: Sequence[tuple[uuid.UUID, int]] = ()) -> list[ClaimedRun]:
    """Lease up to ``limit`` ready runs on ``conn`` (the worker's claim session, claims.py).

    ``ended``: (run id, lease token) of runs whose code returned since the last
    claim; their concurrency slots go back first (schema revision 0014 and later).
    """
    names = [name for name, _ in workflows]
    versions = [version for _, version in workflows]
    params: tuple[Any, ...] = (worker_id, queues, names, versions, limit)
    query = _CLAIM
    if ended:
        query = _CLAIM_AFTER_ENDED
        params += ([run_id for run_id, _ in ended], [token for _, token in ended])
    async with _translated():
        cur = await conn.execute(query, params)
        rows = await cur.fetchall()
    return [ClaimedRun(run_id=r[0], name=r[1], version=r[2], input=r[3], lease_token=r[4],
                       journal=[JournalEntry.from_json(e) for e in r[5]],
                       cancel_requested=r[6], cancel_seq=r[7], scheduled_time=r[8],
                       limited=r[9], traceparent=r[10], claim_delay=r[11] or 0.0,
                       queue=r[12])
            for r in rows]


async def register_worker(conn: Conn, worker_id: uuid.UUID, hostname: str, pid: int,
                          queues: list[str], workflows: list[dict[str, Any]],
                          guards_wakes: bool) -> int:
    """Register on ``conn``, which then holds the worker's liveness lock.

    ``guards_wakes``: it guards its wake-ups (schema revision 0012 and later;
    claims.py); on an older schema the old signature.
    """
    call = ("select pgflow.register_worker(%s, %s, %s, %s, %s, true)" if guards_wakes
            else "select pgflow.register_worker(%s, %s, %s, %s, %s)")
    async with _translated():
        cur = await conn.execute(call, (worker_id, hostname, pid, queues, Jsonb(workflows)))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def unregister_worker(conn: Conn, worker_id: uuid.UUID) -> None:
    await conn.execute("select pgflow.unregister_worker(%s)", (worker_id,))


def jsonb_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
