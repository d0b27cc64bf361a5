"""Executing one claimed run: replay its workflow and report the outcome.

A claimed run is driven from the top of its workflow function. Recorded
steps return at once; live steps run and are checkpointed one by one, each
waiting for its own commit. The run ends with exactly one report:
``complete_run``, ``fail_run``, ``release_run`` (worker draining), or none at
all when a procedure already moved it (a retry back-off) or the lease was
lost.

The replay itself is :mod:`pgflow.replay` (behind the :class:`pgflow.Context`
the workflow is handed); :class:`RunExecution` is its
:class:`~pgflow.replay.RunSession`, reporting checkpoints, completions and
sleeps through :mod:`pgflow.reporter` (batched) and the rest through
:mod:`pgflow.procedures`. Claiming and concurrency are :mod:`pgflow.worker`'s.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

from pgflow import codec, context, errors, logs, steps
from pgflow.definitions import Workflow
from pgflow.journal import FailOutcome, error_json
from pgflow.metrics import Instruments
from pgflow.observe import RunObserver
from pgflow.procedures import ClaimedRun, Procedures
from pgflow.replay import Abandon, ContinueAsNew, Release, Replay, StepWatch, Suspend
from pgflow.reporter import Reporter
from pgflow.retry import Retry
from pgflow.steps import LiveStep
from pgflow.transactional import Checkpoint, Committed, TransactionalSteps

logger = logging.getLogger("pgflow.worker")


class RunExecution:
    """One claimed run on one worker; the :class:`~pgflow.replay.RunSession` of its engine."""

    def __init__(self, claimed: ClaimedRun, workflow: Workflow, procedures: Procedures,
                 reporter: Reporter, loop: asyncio.AbstractEventLoop, executor: Executor,
                 default_retry: Retry, is_draining: Callable[[], bool],
                 on_lost_contact: Callable[[], None],
                 on_code_done: Callable[[], None] = lambda: None,
                 instruments: Instruments | None = None,
                 transactional: TransactionalSteps | None = None,
                 give_back_slots: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.claimed = claimed
        self.workflow = workflow
        self.run_id: uuid.UUID = claimed.run_id
        self.queue = workflow.queue
        self.default_retry = default_retry
        self._procedures = procedures
        self._reporter = reporter  # checkpoints and completions, batched with other runs'
        self._loop = loop
        self._executor = executor
        self._is_draining = is_draining
        self._on_lost_contact = on_lost_contact
        self._on_code_done = on_code_done  # the workflow returned: only its last report is left
        # A run holding concurrency slots: gives them back, then its completion goes.
        self._give_back_slots = give_back_slots
        # ... and a claim gave them back (else the report that ended the run did).
        self.slots_given_back = False
        self._transactional = transactional  # connections of transactional steps
        self.observer = RunObserver(instruments or Instruments(), claimed.run_id, workflow.name,
                                    workflow.version, claimed.traceparent)

    # -- RunSession ---------------------------------------------------------

    def at_live_point(self) -> None:
        if self._is_draining():
            raise Release()  # give the run back here, before acting

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the worker's loop from a workflow thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def run_in_thread(self, fn: Callable[[], Any]) -> Any:
        return await self._loop.run_in_executor(self._executor, fn)

    async def complete_step(self, seq: int, name: str, kind: str, output: Any,
                            duration: timedelta, ended: float | None = None) -> bool:
        return await self._reporter.complete_step(self.run_id, self.claimed.lease_token, seq,
                                                  name, kind, output, duration, ended)

    async def fail_step(self, seq: int, name: str, kind: str, error: dict[str, Any],
                        duration: timedelta, retryable: bool,
                        policy: Retry) -> FailOutcome:
        return await self._procedures.fail_step(self.run_id, self.claimed.lease_token, seq, name,
                                                kind, error, duration, retryable, policy)

    async def sleep(self, seq: int, name: str, until: datetime | None,
                    duration: timedelta | None, last_step: dict[str, Any] | None = None) -> str:
        return await self._reporter.sleep(self.run_id, self.claimed.lease_token, seq, until,
                                          duration, last_step)

    async def record_value(self, seq: int, kind: str, value: Any,
                           name: str | None = None) -> Any:
        return await self._procedures.record_value(self.run_id, self.claimed.lease_token, seq,
                                                   kind, value, name)

    async def wait_signal(self, seq: int, name: str,
                          timeout: timedelta | None) -> tuple[str, Any]:
        return await self._procedures.wait_signal(self.run_id, self.claimed.lease_token, seq,
                                                  name, timeout)

    async def set_state(self, key: str, value: Any) -> bool:
        return await self._procedures.set_state(self.run_id, self.claimed.lease_token, key, value)

    async def start_child(self, seq: int, start: tuple[Any, ...]) -> uuid.UUID:
        return await self._procedures.start_child(self.run_id, self.claimed.lease_token, seq,
                                                  start)

    async def wait_child(self, seq: int, child_id: uuid.UUID) -> dict[str, Any] | None:
        return await self._procedures.wait_child(self.run_id, self.claimed.lease_token, seq,
                                                 child_id)

    async def map(self, seq: int, name: str, inputs: list[Any], queue: str,
                  version: str) -> dict[str, Any] | None:
        return await self._procedures.map(self.run_id, self.claimed.lease_token, seq, name,
                                          inputs, queue, version)

    def observe_step(self, name: str, seq: int, attempt: int) -> AbstractContextManager[StepWatch]:
        return self.observer.step(name, seq, attempt)

    def transactional(self, live: LiveStep, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Committed:
        return self._transactional_steps().run(live.fn, args, kwargs, self._checkpoint(live))

    async def transactional_async(self, live: LiveStep, args: tuple[Any, ...],
                                  kwargs: dict[str, Any]) -> Committed:
        return await self._transactional_steps().run_async(live.fn, args, kwargs,
                                                           self._checkpoint(live))

    def _transactional_steps(self) -> TransactionalSteps:
        if self._transactional is None:
            raise errors.PgflowError("this worker runs no transactional steps")
        return self._transactional

    def _checkpoint(self, live: LiveStep) -> Checkpoint:
        return Checkpoint(self.run_id, self.claimed.lease_token, live.seq, live.name)

    # -- driving the workflow -----------------------------------------------

    async def execute(self) -> None:
        with logs.run_scope(self.run_id, self.workflow.name):
            try:
                await self._execute()
            finally:
                self.observer.ended("abandoned")  # unless an ending below said otherwise

    async def _execute(self) -> None:
        ctx = context.Context(self, self.claimed.journal, is_async=self.workflow.is_async,
                              workflow_retry=self.workflow.retry,
                              cancel_requested=self.claimed.cancel_requested,
                              cancel_seq=self.claimed.cancel_seq,
                              scheduled_time=self.claimed.scheduled_time)
        engine = context.engine_of(ctx)
        token = self.claimed.lease_token
        try:
            result = await self._invoke(ctx)
            output = codec.to_json(result, f"the result of workflow {self.workflow.name!r}")
        except Suspend:
            self.observer.ended("suspended")
            return
        except Abandon as exc:
            self._abandon(exc)
            return
        except BaseException as exc:
            await self._end_otherwise(engine, token, exc)
            return
        self._on_code_done()
        if self._give_back_slots is not None:
            self.slots_given_back = await self._give_back_slots()
        if await self._report(self._reporter.complete_run(self.run_id, token, output,
                                                          engine.take_unflushed())):
            self.observer.ended("completed")

    async def _end_otherwise(self, engine: Replay, token: int, exc: BaseException) -> None:
        """Every ending but success: send the held-back checkpoint, then report it."""
        try:
            await engine.flush()
        except Abandon as lost:
            self._abandon(lost)
            return
        if isinstance(exc, Release):
            await self._report(self._procedures.release_run(self.run_id, token))
            self.observer.ended("released")
            logger.info("run %s released while draining", self.run_id)
        elif isinstance(exc, errors.Cancelled):
            logger.info("run %s cancelled", self.run_id)
            if await self._report(self._procedures.cancel_run(self.run_id, token)):
                self.observer.ended("cancelled")
        elif isinstance(exc, ContinueAsNew):
            await self._continue_as_new(token, exc)
            self.observer.ended("continued")
        elif isinstance(exc, Exception):
            logger.error("run %s failed: %s: %s", self.run_id, type(exc).__name__, exc)
            if await self._report(self._procedures.fail_run(self.run_id, token,
                                                            error_json(exc))):
                self.observer.ended("failed", exc)
        else:
            raise exc  # KeyboardInterrupt, SystemExit: not the run's doing

    def _abandon(self, exc: Abandon) -> None:
        logger.warning("run %s abandoned: %s", self.run_id, exc)
        if not isinstance(exc.__cause__, errors.LeaseLost):
            self._on_lost_contact()

    async def _continue_as_new(self, token: int, again: ContinueAsNew) -> None:
        what = f"continue_as_new of workflow {self.workflow.name!r}"
        try:
            data = self.workflow.signature.encode_args(again.args_, again.kwargs, what)
        except Exception as exc:  # bad new input: the run fails, clearly
            await self._report(self._procedures.fail_run(self.run_id, token,
                                                         error_json(exc)))
            return
        await self._report(self._procedures.continue_as_new(self.run_id, token, data))
        logger.info("run %s continued as new", self.run_id)

    async def _invoke(self, ctx: context.Context) -> Any:
        fn = self.workflow.fn
        args, kwargs = self.workflow.signature.decode_args(
            self.claimed.input, f"input of workflow {self.workflow.name!r}")
        if self.workflow.is_async:
            entered = steps.enter(ctx)
            try:
                return await fn(ctx, *args, **kwargs)
            finally:
                steps.leave(entered)

        fields = logs.current()

        def in_thread() -> Any:
            entered, adopted = steps.enter(ctx), logs.adopt(fields)
            try:
                return fn(ctx, *args, **kwargs)
            finally:
                logs.leave(adopted)
                steps.leave(entered)

        return await self._loop.run_in_executor(self._executor, in_thread)

    async def _report(self, report: Coroutine[Any, Any, Any]) -> bool:
        """Send the run's last report; whether it was recorded (else it is logged here)."""
        try:
            await report
        except errors.LeaseLost as exc:
            logger.warning("run %s: final report rejected: %s", self.run_id, exc)
        except Exception as exc:
            logger.error("run %s: could not report its outcome: %s", self.run_id, exc)
            self._on_lost_contact()
        else:
            return True
        return False
