"""Does the current code still replay recorded runs? The safe-deploy check.

:func:`check_replay` loads a run's input and journal from the database and
runs the workflow code of this process against them, with no worker and no
writes: recorded results are returned, and the check stops at the first
durable call that would act for real (nothing runs for real). A mismatch is
reported as the :class:`~pgflow.errors.NonDeterminismError` the worker would
raise. Run it in CI over the unfinished runs of production (or a copy)
before deploying a workflow change.

The replay is the worker's own engine (:mod:`pgflow.replay`), driven here
with a session that stops at the first live point instead of acting.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pgflow import connections, context, definitions, errors, queries, steps
from pgflow.journal import JournalEntry
from pgflow.replay import ContinueAsNew, Suspend
from pgflow.retry import DEFAULT_RETRY, Retry

__all__ = ["ReplayCheck", "check_replay", "check_replays"]

_RUN = ("select r.id, r.name, r.version, r.input, coalesce((select jsonb_agg(jsonb_build_object("
        "'seq', s.seq, 'name', s.name, 'kind', s.kind, 'status', s.status, 'attempts', s.attempts,"
        " 'output', s.output, 'error', s.error) order by s.seq) from pgflow.steps s"
        " where s.run_id = r.id), '[]'::jsonb), r.scheduled_time from pgflow.runs r"
        " where r.id = %s")
_UNFINISHED = ("select id from pgflow.runs where name = %s and version = %s"
               " and status not in ('completed', 'failed', 'cancelled')"
               " order by created_at limit %s")


@dataclass(frozen=True)
class ReplayCheck:
    """The outcome of replaying one run's journal with the current code."""

    run_id: uuid.UUID
    ok: bool
    replayed: int  # journal entries the code met as recorded
    journal: int  # journal entries recorded
    next_call: str | None  # the first durable call the run would make for real
    error: str | None  # why not ok

    def __str__(self) -> str:
        if self.ok:
            upto = f"; next: {self.next_call}" if self.next_call else "; the workflow returned"
            return f"run {self.run_id}: replays {self.replayed}/{self.journal} entries{upto}"
        return f"run {self.run_id}: does NOT replay: {self.error}"


class _ReachedLiveCall(BaseException):
    pass


class _ReplayOnly:
    """A run session that stops the workflow at its first call that would act for real."""

    default_retry: Retry = DEFAULT_RETRY

    def __init__(self, run_id: uuid.UUID, queue: str) -> None:
        self.run_id = run_id
        self.queue = queue

    def at_live_point(self) -> None:
        raise _ReachedLiveCall()

    def call(self, coro: Any) -> Any:
        return asyncio.run(coro)

    async def run_in_thread(self, fn: Any) -> Any:
        raise _ReachedLiveCall()

    async def _live(self, *args: Any, **kwargs: Any) -> Any:
        raise _ReachedLiveCall()

    complete_step = fail_step = sleep = record_value = wait_signal = _live
    set_state = start_child = wait_child = map = _live


def check_replay(conn: Any, run_id: uuid.UUID | str,
                 workflow: definitions.Workflow | None = None) -> ReplayCheck:
    """Replay one run's journal with ``workflow`` (default: the registered code for its
    name and version) and report whether the code still matches it."""
    rid = queries.run_id_param(run_id)
    rows = connections.fetch(conn, _RUN, (rid,))
    if not rows:
        raise errors.RunNotFound(f"unknown run {rid}")
    _, name, version, data, journal_json, scheduled_time = rows[0]
    found = workflow or definitions.lookup(name, version)
    if found is None:
        return ReplayCheck(rid, False, 0, len(journal_json), None,
                           f"this process has no code for workflow {name!r} version {version!r}")
    journal = [JournalEntry.from_json(e) for e in journal_json]
    with ThreadPoolExecutor(1) as pool:  # its own thread: asyncio.run needs a loop-free one
        return pool.submit(_replay, rid, found, data, journal, scheduled_time).result()


def check_replays(conn: Any, workflow: definitions.Workflow, limit: int = 1000) -> list[ReplayCheck]:
    """:func:`check_replay` for the unfinished runs of ``workflow``'s name and version."""
    ids = [row[0] for row in connections.fetch(conn, _UNFINISHED,
                                               (workflow.name, workflow.version, limit))]
    return [check_replay(conn, run_id, workflow) for run_id in ids]


def _replay(run_id: uuid.UUID, workflow: definitions.Workflow, data: Any,
            journal: list[JournalEntry], scheduled_time: datetime | None = None) -> ReplayCheck:
    session = _ReplayOnly(run_id, workflow.queue)
    ctx = context.Context(session, journal, is_async=workflow.is_async,  # type: ignore[arg-type]
                          workflow_retry=workflow.retry, scheduled_time=scheduled_time)
    engine = context.engine_of(ctx)
    total = len(journal)

    def report(ok: bool, next_call: str | None, error: str | None,
               replayed: int | None = None) -> ReplayCheck:
        made = engine.position if replayed is None else replayed
        return ReplayCheck(run_id, ok, min(made, total), total, next_call, error)

    try:
        args, kwargs = workflow.signature.decode_args(data, f"input of {workflow.name!r}")
        entered = steps.enter(ctx)
        try:
            if workflow.is_async:
                asyncio.run(workflow.fn(ctx, *args, **kwargs))
            else:
                workflow.fn(ctx, *args, **kwargs)
        finally:
            steps.leave(entered)
    except _ReachedLiveCall:
        stopped = engine.stopped_position()  # the call that stopped us is not a replayed one
        if stopped < total:  # stopped before the end: a recorded wait met again
            return report(True, f"durable call #{stopped} (resumes there)", None, stopped)
        return report(True, f"durable call #{stopped}", None, stopped)
    except errors.NonDeterminismError as exc:
        return report(False, None, str(exc))
    except (Suspend, ContinueAsNew, errors.Cancelled):
        return report(True, None, None)
    except Exception as exc:  # the recorded run failed this way too, or the code now raises
        if engine.position < total:
            return report(False, None, f"the code raised {type(exc).__name__}: {exc} after "
                                       f"{engine.position} of {total} recorded entries")
        return report(True, None, None)
    if engine.position < total:
        return report(False, None, f"the code returned after {engine.position} durable calls "
                                   f"but the journal holds {total}")
    return report(True, None, None)
