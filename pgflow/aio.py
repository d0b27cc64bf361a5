"""The client for asyncio code: the names of :mod:`pgflow.client`, awaited,
on a ``psycopg.AsyncConnection`` (or ``AsyncCursor``), or a SQLAlchemy
``AsyncConnection`` or ``AsyncSession`` on ``postgresql+psycopg://``."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg

from pgflow import connections, definitions, errors, flow, models, queries, schedules, tracing
from pgflow.client import RECHECK_INTERVAL
from pgflow.validation import check_name

__all__ = ["backfill_schedule", "cancel", "create_schedule", "delete_schedule", "get",
           "get_state", "pause_queue", "pause_schedule", "result", "resume_queue",
           "resume_schedule", "retry", "set_queue", "signal", "start", "trigger_schedule"]


async def start(conn: Any, workflow: definitions.Workflow | str, *args: Any,
                key: str | None = None, queue: str | None = None, priority: int = 0,
                delay: timedelta | float | None = None, concurrency_key: str | None = None,
                **kwargs: Any) -> uuid.UUID:
    """See :func:`pgflow.start`."""
    params = queries.start_params(workflow, args, kwargs, key, queue, priority, delay,
                                  concurrency_key)
    rows = await connections.afetch(conn, queries.START, (*params, tracing.current_traceparent()))
    return queries.as_uuid(rows[0][0])


async def get(conn: Any, run_id: uuid.UUID | str) -> models.Run:
    """See :func:`pgflow.get`."""
    rid = queries.run_id_param(run_id)
    rows = await connections.afetch(conn, queries.GET_RUN, (rid,))
    steps = await connections.afetch(conn, queries.GET_STEPS, (rid,)) if rows else []
    return queries.build_run(rows[0] if rows else None, steps, rid)


async def signal(conn: Any, run_id: uuid.UUID | str, name: str, payload: Any = None) -> None:
    """See :func:`pgflow.signal`."""
    await connections.afetch(conn, queries.SIGNAL, queries.signal_params(run_id, name, payload))


async def cancel(conn: Any, run_id: uuid.UUID | str) -> bool:
    """See :func:`pgflow.cancel`."""
    rows = await connections.afetch(conn, queries.CANCEL, (queries.run_id_param(run_id),))
    return bool(rows[0][0])


async def get_state(conn: Any, run_id: uuid.UUID | str, key: str) -> Any:
    """See :func:`pgflow.get_state`."""
    params = queries.state_params(run_id, key)
    return queries.state_value(await connections.afetch(conn, queries.GET_STATE, params), params[1])


async def retry(conn: Any, run_id: uuid.UUID | str) -> None:
    """See :func:`pgflow.retry`."""
    await connections.afetch(conn, queries.RETRY, (queries.run_id_param(run_id),))


async def result(conn: Any, run_id: uuid.UUID | str, timeout: float | None = None) -> Any:
    """See :func:`pgflow.result` (a SQLAlchemy ``AsyncConnection`` or ``AsyncSession`` too)."""
    wait = queries.ResultWait(run_id, timeout)
    if isinstance(conn, psycopg.AsyncCursor):
        raise TypeError(f"result() needs an async connection, not {type(conn)!r}")
    conn = await connections.adbapi_connection(conn)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise errors.PgflowError(
            "result() must be called outside a transaction: commit first, or use autocommit")

    async def query(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        rows = await connections.afetch(conn, sql, params)
        if not conn.autocommit:
            await conn.commit()
        return rows

    await query(f"listen {queries.DONE_CHANNEL}")
    try:
        await query(queries.WATCH, (wait.run_id,))
        while True:
            rows = await query(queries.RUN_STATUS, (wait.run_id,))
            if wait.follow(rows):
                await query(queries.WATCH, (wait.run_id,))
                continue
            if wait.finished(rows):
                return wait.outcome(rows)
            async for notify in conn.notifies(timeout=wait.next_wait(RECHECK_INTERVAL)):
                if wait.is_ours(notify.payload):
                    break
    finally:
        if not conn.closed:
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                await conn.rollback()
            await query(f"unlisten {queries.DONE_CHANNEL}")


# -- schedules ----------------------------------------------------------------

async def create_schedule(conn: Any, id: str, workflow: definitions.Workflow | str,
                          **options: Any) -> None:
    """See :func:`pgflow.create_schedule` (same options)."""
    spec = schedules.build_spec(id, workflow, **options)
    now = (await connections.afetch(conn, schedules.NOW, ()))[0][0]
    await connections.afetch(conn, schedules.CREATE,
                             schedules.create_params(spec, now, declared=False))


async def pause_schedule(conn: Any, id: str) -> None:
    """See :func:`pgflow.pause_schedule`."""
    await connections.afetch(conn, schedules.PAUSE, (check_name(id, "schedule id"),))


async def resume_schedule(conn: Any, id: str) -> None:
    """See :func:`pgflow.resume_schedule`."""
    await connections.afetch(conn, schedules.RESUME, (check_name(id, "schedule id"),))


async def delete_schedule(conn: Any, id: str) -> None:
    """See :func:`pgflow.delete_schedule`."""
    await connections.afetch(conn, schedules.DELETE, (check_name(id, "schedule id"),))


async def trigger_schedule(conn: Any, id: str) -> uuid.UUID:
    """See :func:`pgflow.trigger_schedule`."""
    rows = await connections.afetch(conn, schedules.TRIGGER, (check_name(id, "schedule id"),))
    return queries.as_uuid(rows[0][0])


async def backfill_schedule(conn: Any, id: str, start: datetime, end: datetime, *,
                            overlap: str = "allow_all") -> list[uuid.UUID]:
    """See :func:`pgflow.backfill_schedule`."""
    check_name(id, "schedule id")
    schedules.check_overlap(overlap)
    spec = await connections.afetch(conn, schedules.SPEC, (id,))
    rows = await connections.afetch(conn, schedules.BACKFILL,
                                    schedules.backfill_params(id, spec, start, end, overlap))
    return [queries.as_uuid(row[0]) for row in rows]


# -- flow control -------------------------------------------------------------

async def set_queue(conn: Any, name: str, *, concurrency: int | None = None,
                    rate_limit: flow.RateLimit | None = None) -> flow.QueueInfo:
    """See :func:`pgflow.set_queue`."""
    params = flow.set_queue_params(name, concurrency, rate_limit)
    rows = await connections.afetch(conn, flow.SET_QUEUE, params)
    return flow.settings_info(rows[0])


async def pause_queue(conn: Any, name: str) -> None:
    """See :func:`pgflow.pause_queue`."""
    await connections.afetch(conn, flow.PAUSE, (check_name(name, "queue"),))


async def resume_queue(conn: Any, name: str) -> None:
    """See :func:`pgflow.resume_queue`."""
    await connections.afetch(conn, flow.RESUME, (check_name(name, "queue"),))
