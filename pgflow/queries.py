"""SQL and argument handling shared by the sync client and ``pgflow.aio``.

Statements use ``%s`` placeholders and pass JSON as text cast to ``jsonb``,
so they run unchanged on any DB-API driver with the ``format`` paramstyle
(psycopg 3, and psycopg2 underneath SQLAlchemy).

Argument checks are :mod:`pgflow.validation`'s and payload encoding
:mod:`pgflow.codec`'s; :func:`start_params` also builds ``ctx.start_child``'s
request in the engine (:mod:`pgflow.replay`).
"""

from __future__ import annotations

import math
import time
import uuid
from datetime import timedelta
from typing import Any

from pgflow import codec, definitions, errors, models
from pgflow.durations import as_timedelta
from pgflow.validation import check_key, check_name

START = ("select pgflow.start_run(name => %s, input => %s::jsonb, key => %s, queue => %s,"
         " priority => %s, delay => %s, version => %s, timeout => %s, concurrency_key => %s,"
         " traceparent => %s)")

GET_RUN = ("select id, name, version, queue, key, status, priority, input, output, error,"
           " parent_id, created_at, started_at, finished_at from pgflow.runs where id = %s")

GET_STEPS = ("select seq, name, kind, status, attempts, output, error, started_at, finished_at"
             " from pgflow.steps where run_id = %s order by seq")

RETRY = "select pgflow.retry(%s)"

RUN_STATUS = "select status, output, error, continued_as from pgflow.runs where id = %s"

SIGNAL = "select pgflow.signal(%s, %s, %s::jsonb)"
CANCEL = "select pgflow.cancel(%s)"
GET_STATE = ("select r.id, s.value from pgflow.runs r"
             " left join pgflow.run_state s on s.run_id = r.id and s.key = %s where r.id = %s")

DONE_CHANNEL = "pgflow_done"
# After LISTEN: ask the engine to NOTIFY when this run finishes.
WATCH = "select pgflow.watch(%s)"


def signal_params(run_id: uuid.UUID | str, name: str, payload: Any) -> tuple[Any, ...]:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"signal name must be a non-empty string, got {name!r}")
    check_name(name, "signal name")
    return (run_id_param(run_id), name, codec.dumps(payload, f"the payload of signal {name!r}"))


def state_params(run_id: uuid.UUID | str, key: str) -> tuple[Any, ...]:
    """The parameters of :data:`GET_STATE`: ``(key, run id)``."""
    return (check_key(key, "state key"), run_id_param(run_id))


def state_value(rows: list[tuple[Any, ...]], run_id: uuid.UUID) -> Any:
    if not rows:
        raise errors.RunNotFound(f"unknown run {run_id}")
    return rows[0][1]


def start_params(workflow: definitions.Workflow | str, args: tuple[Any, ...],
                 kwargs: dict[str, Any], key: str | None, queue: str | None, priority: int,
                 delay: timedelta | float | None,
                 concurrency_key: str | None = None) -> tuple[Any, ...]:
    """Validate a start request and return the parameters of :data:`START`.

    Without ``concurrency_key``, a workflow with a keyed :class:`pgflow.Concurrency`
    gets its key from its arguments, defaults applied (from a name alone, SQL
    reads it from the input).
    """
    if key is not None:
        check_key(key, "key")
    if concurrency_key is not None:
        check_key(concurrency_key, "concurrency_key")
    if queue is not None:
        check_name(queue, "queue")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, not {priority!r}")
    if not -2**31 <= priority < 2**31:
        raise ValueError(f"priority must fit in 32 bits, got {priority}")
    if delay is not None:
        delay = as_timedelta(delay, "delay")
    if isinstance(workflow, definitions.Workflow):
        what = f"workflow {workflow.name!r}"
        data = workflow.signature.encode_args(args, kwargs, f"start of {what}")
        name, version, queue = workflow.name, workflow.version, queue or workflow.queue
        timeout = workflow.timeout
        if concurrency_key is None:
            concurrency_key = workflow.concurrency_key(args, kwargs)
    elif isinstance(workflow, str):
        if not workflow.strip():
            raise ValueError("workflow name must not be empty")
        check_name(workflow, "workflow name")
        if args and kwargs:
            raise TypeError(f"starting {workflow!r} by name: pass positional or keyword "
                            "arguments, not both (without the code their order is unknown)")
        data = codec.to_json(dict(kwargs) if kwargs else list(args),
                             f"the arguments of workflow {workflow!r}")
        name, version, timeout = workflow, None, None
    else:
        raise TypeError(f"workflow must be a @pgflow.workflow function or a name, not {workflow!r}")
    return (name, codec.dumps(data, f"the arguments of {name!r}"), key, queue, priority, delay,
            version, timeout, concurrency_key)


def as_uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def run_id_param(run_id: uuid.UUID | str) -> uuid.UUID:
    try:
        return as_uuid(run_id)
    except ValueError:
        raise errors.RunNotFound(f"{run_id!r} is not a run id (a UUID)") from None


def build_run(row: tuple[Any, ...] | None, step_rows: list[tuple[Any, ...]],
              run_id: uuid.UUID) -> models.Run:
    if row is None:
        raise errors.RunNotFound(f"unknown run {run_id}")
    steps = [models.StepRecord(*step) for step in step_rows]
    return models.Run(as_uuid(row[0]), *row[1:10],
                      None if row[10] is None else as_uuid(row[10]), *row[11:14], steps=steps)


class ResultWait:
    """The logic of ``result()`` between its queries, shared by the sync and async clients."""

    def __init__(self, run_id: uuid.UUID | str, timeout: float | None) -> None:
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))):
            raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
        if timeout is not None and (math.isnan(timeout) or timeout < 0):
            raise ValueError(f"timeout must be zero or a positive number of seconds, got {timeout!r}")
        self.run_id = run_id_param(run_id)
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def finished(self, rows: list[tuple[Any, ...]]) -> bool:
        if not rows:
            raise errors.RunNotFound(f"unknown run {self.run_id}")
        return rows[0][0] in models.FINAL_STATUSES

    def follow(self, rows: list[tuple[Any, ...]]) -> bool:
        """The run continued as new: wait for its successor instead (True)."""
        if rows and rows[0][3] is not None:
            self.run_id = as_uuid(rows[0][3])
            return True
        return False

    def outcome(self, rows: list[tuple[Any, ...]]) -> Any:
        return outcome(self.run_id, rows[0][:3])

    def next_wait(self, recheck: float) -> float:
        """Seconds to wait for a NOTIFY before querying again; raises at the deadline."""
        if self.deadline is None:
            return recheck
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"run {self.run_id} did not finish within {self.timeout}s")
        return min(recheck, left)

    def is_ours(self, payload: str) -> bool:
        return payload == str(self.run_id)


def outcome(run_id: uuid.UUID, row: tuple[Any, ...] | None) -> Any:
    """The result of a finished run (or raise its failure); ``None`` row: unknown run."""
    if row is None:
        raise errors.RunNotFound(f"unknown run {run_id}")
    status, output, error = row
    if status == "completed":
        return output
    if status == "failed":
        raise errors.WorkflowFailed(run_id, error)
    if status == "cancelled":
        raise errors.WorkflowCancelled(run_id)
    raise AssertionError(status)
