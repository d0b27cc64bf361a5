"""Starting and inspecting runs from application code (sync).

Every call takes the application's connection first and works inside its
current transaction: a run started in a transaction exists if and only if
that transaction commits. :func:`result` is the exception: it waits for other
transactions, so it needs a connection with no transaction open.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import psycopg

from pgflow import connections, definitions, errors, models, queries, tracing

__all__ = ["cancel", "get", "get_state", "result", "retry", "signal", "start"]

RECHECK_INTERVAL = 5.0  # seconds; NOTIFY is a hint, the status query is the truth


def start(conn: Any, workflow: definitions.Workflow | str, *args: Any, key: str | None = None,
          queue: str | None = None, priority: int = 0, delay: timedelta | float | None = None,
          concurrency_key: str | None = None, **kwargs: Any) -> uuid.UUID:
    """Start a run of ``workflow`` (the decorated function, or its name) with these inputs.

    With ``key``, starting again while a run with that key exists returns that
    run's id. ``delay`` holds the run back for that long. ``concurrency_key``
    sets the key of the workflow's :class:`pgflow.Concurrency` limit for this
    run (else it is the argument the limit names).
    """
    params = queries.start_params(workflow, args, kwargs, key, queue, priority, delay,
                                  concurrency_key)
    # The caller's trace, if OpenTelemetry is tracing: the worker's spans continue it.
    rows = connections.fetch(conn, queries.START, (*params, tracing.current_traceparent()))
    return queries.as_uuid(rows[0][0])


def get(conn: Any, run_id: uuid.UUID | str) -> models.Run:
    """The run with its steps; :class:`~pgflow.errors.RunNotFound` if there is none."""
    rid = queries.run_id_param(run_id)
    rows = connections.fetch(conn, queries.GET_RUN, (rid,))
    steps = connections.fetch(conn, queries.GET_STEPS, (rid,)) if rows else []
    return queries.build_run(rows[0] if rows else None, steps, rid)


def signal(conn: Any, run_id: uuid.UUID | str, name: str, payload: Any = None) -> None:
    """Send signal ``name`` with a JSON ``payload`` to a run, in ``conn``'s transaction.

    It waits in the run's mailbox until a ``ctx.wait_for_signal(name)`` takes it.
    """
    connections.fetch(conn, queries.SIGNAL, queries.signal_params(run_id, name, payload))


def cancel(conn: Any, run_id: uuid.UUID | str) -> bool:
    """Request cancellation of a run and its children; False if it had already finished."""
    rows = connections.fetch(conn, queries.CANCEL, (queries.run_id_param(run_id),))
    return bool(rows[0][0])


def get_state(conn: Any, run_id: uuid.UUID | str, key: str) -> Any:
    """The last value the run published under ``key`` with ``ctx.set_state`` (None if none)."""
    params = queries.state_params(run_id, key)
    return queries.state_value(connections.fetch(conn, queries.GET_STATE, params), params[1])


def retry(conn: Any, run_id: uuid.UUID | str) -> None:
    """Resume a failed run from its last checkpoint, in ``conn``'s transaction.

    The step that failed for good runs again (with fresh attempts); completed
    steps keep their results. :class:`~pgflow.errors.RunStateError` unless
    the run is ``failed``.
    """
    connections.fetch(conn, queries.RETRY, (queries.run_id_param(run_id),))


def result(conn: Any, run_id: uuid.UUID | str, timeout: float | None = None) -> Any:
    """Wait for the run to finish and return its output.

    Wakes on NOTIFY. Raises :class:`~pgflow.errors.WorkflowFailed`,
    :class:`~pgflow.errors.WorkflowCancelled`, or ``TimeoutError`` after
    ``timeout`` seconds. ``conn`` must have no transaction open (autocommit,
    or idle after a commit): the run is finished by other transactions.
    """
    wait = queries.ResultWait(run_id, timeout)
    raw = connections.dbapi_connection(conn)
    if not isinstance(raw, psycopg.Connection):
        raise TypeError(f"result() needs a psycopg connection, not {type(conn)!r}")
    if raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise errors.PgflowError(
            "result() must be called outside a transaction: commit first, or use autocommit")

    def query(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        rows = connections.fetch(raw, sql, params)
        if not raw.autocommit:
            raw.commit()  # our own short transaction, not the caller's
        return rows

    query(f"listen {queries.DONE_CHANNEL}")
    try:
        query(queries.WATCH, (wait.run_id,))
        while True:
            rows = query(queries.RUN_STATUS, (wait.run_id,))
            if wait.follow(rows):
                query(queries.WATCH, (wait.run_id,))
                continue
            if wait.finished(rows):
                return wait.outcome(rows)
            for notify in raw.notifies(timeout=wait.next_wait(RECHECK_INTERVAL)):
                if wait.is_ours(notify.payload):
                    break
    finally:
        if not raw.closed:
            if raw.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                raw.rollback()
            query(f"unlisten {queries.DONE_CHANNEL}")
