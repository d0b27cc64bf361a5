"""``pgflow.Context``: what a workflow can ask of the engine, and nothing else.

Every method is a documented one-liner over the replay engine
(:class:`pgflow.replay.Replay`), which holds the run's journal, its position
and its pending reports; workflow code never sees that state. Where the rest
lives: replay, cancellation and the reports of each durable call in
:mod:`pgflow.replay`; how a step's function runs (timeouts, threads) and which
retry policy applies in :mod:`pgflow.steps`; argument checks in
:mod:`pgflow.validation`; sagas in :mod:`pgflow.saga`; the decorators in
:mod:`pgflow.definitions`. Retries are decided in SQL (``pgflow.fail_step``)
and a sleep becomes a timer there too (``sql/README.md``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from pgflow import steps
from pgflow.journal import JournalEntry
from pgflow.replay import ContinueAsNew, Replay, RunSession
from pgflow.retry import Retry
from pgflow.saga import Saga

__all__ = ["ChildHandle", "Context", "current"]


def current() -> Context | None:
    """The context of the workflow running in this thread or task, if any."""
    return steps.current()


class ChildHandle:
    """A child run started by ``ctx.start_child``."""

    def __init__(self, engine: Replay, run_id: uuid.UUID, workflow: Any) -> None:
        self._engine = engine
        self.run_id = run_id
        self.workflow = workflow

    def result(self) -> Any:
        """Wait (durably: the parent holds no worker meanwhile) for the child's result.

        Raises :class:`~pgflow.errors.ChildFailed` if the child failed or was cancelled.
        """
        return self._engine.child_result(self)

    def __repr__(self) -> str:
        return f"<pgflow.ChildHandle {self.run_id}>"


class Context:
    """Handed to every workflow as its first argument (``ctx``).

    Each durable call takes the next journal position when it is *called*,
    so the order of calls, not of awaits, is what replay checks. In an
    ``async def`` workflow durable calls return awaitables; in a ``def``
    workflow they block and return values.
    """

    def __init__(self, session: RunSession, journal: list[JournalEntry], *, is_async: bool,
                 workflow_retry: Retry | None = None, cancel_requested: bool = False,
                 cancel_seq: int | None = None, scheduled_time: datetime | None = None) -> None:
        self._scheduled_time = scheduled_time
        self._engine = Replay(session, journal, is_async=is_async, child_handle=ChildHandle,
                              workflow_retry=workflow_retry, cancel_requested=cancel_requested,
                              cancel_seq=cancel_seq)
        # What @pgflow.step calls, ctx.map items and saga compensations call: the
        # engine's own method, bound once, so a step call costs no extra hop.
        self._call_step = self._engine.call_step

    @property
    def workflow_id(self) -> uuid.UUID:
        """The run's id."""
        return self._engine.workflow_id

    @property
    def scheduled_time(self) -> datetime | None:
        """The tick's time (aware, UTC) in a run a schedule started; ``None`` otherwise.

        Fixed when the run starts, so it is the same on every replay.
        """
        return self._scheduled_time

    def step(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` as a step named ``name``.

        For lambdas and plain functions; a ``@pgflow.step`` function keeps its
        retry policy, timeout and return type.
        """
        return self._engine.step(name, fn, args, kwargs)

    def sleep(self, duration: timedelta | float) -> Any:
        """Suspend the run for ``duration`` (a timedelta or seconds) of engine time.

        No process waits: the run is parked with a timer and resumed by replay.
        """
        return self._engine.sleep(duration)

    def sleep_until(self, when: datetime) -> Any:
        """Suspend the run until ``when`` (an aware datetime) on the engine clock."""
        return self._engine.sleep_until(when)

    def now(self) -> Any:
        """The engine clock's time, recorded once: the same value on every replay."""
        return self._engine.now()

    def uuid4(self) -> Any:
        """A random UUID, recorded once."""
        return self._engine.uuid4()

    def random(self) -> Any:
        """A float in [0, 1), recorded once."""
        return self._engine.random()

    def patched(self, patch_id: str) -> Any:
        """True on code paths recorded with this patch (and in new runs), False on replay of
        a run recorded before it: ``if ctx.patched("x"): new() else: old()``.

        The answer is recorded, so it is stable on every replay. Once no unfinished run
        predates the patch (view ``pgflow.patches_in_use``), replace the ``if`` with
        :meth:`deprecate_patch` and the new branch; once no unfinished run recorded the
        patch either, delete that call too.
        """
        return self._engine.patched(patch_id)

    def deprecate_patch(self, patch_id: str) -> Any:
        """Accept a patch marker where runs recorded one, and record nothing otherwise."""
        return self._engine.deprecate_patch(patch_id)

    def wait_for_signal(self, name: str, timeout: timedelta | float | None = None) -> Any:
        """Wait (durably) for signal ``name`` and return its payload.

        Signals sent earlier wait in the run's mailbox and are taken in order,
        each once. Raises :class:`~pgflow.errors.SignalTimeout` after ``timeout``.
        """
        return self._engine.wait_for_signal(name, timeout)

    def set_state(self, key: str, value: Any) -> Any:
        """Publish ``value`` under ``key``: ``pgflow.get_state`` and view ``pgflow.run_state``."""
        return self._engine.set_state(key, value)

    def start_child(self, workflow: Any, *args: Any, key: str | None = None,
                    **kwargs: Any) -> Any:
        """Start a child run; returns a :class:`ChildHandle` (awaited in async workflows)."""
        return self._engine.start_child(workflow, args, key, kwargs)

    def call(self, workflow: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a child workflow and return its result; :class:`~pgflow.errors.ChildFailed` if it fails."""
        return self._engine.call(workflow, args, kwargs)

    def map(self, step: Any, items: Any) -> Any:
        """Run ``step(item)`` for every item in parallel, each claimable by any worker.

        Returns the results in item order. An item that fails after its
        retries raises :class:`~pgflow.errors.StepFailed` once all have finished.
        """
        return self._engine.map(step, items)

    def continue_as_new(self, *args: Any, **kwargs: Any) -> Any:
        """End this run here and start the workflow afresh with this input (same key)."""
        raise ContinueAsNew(args, kwargs)

    def saga(self) -> Any:
        """``with ctx.saga() as saga:`` (``async with`` in async workflows): see :class:`pgflow.saga.Saga`."""
        return Saga(self)


def engine_of(ctx: Context) -> Replay:
    """The engine behind ``ctx``: for the worker (:mod:`pgflow.runner`) and the replay
    check (:mod:`pgflow.replaycheck`), never for workflow code."""
    return ctx._engine
