"""The replay engine: one claimed run's workflow replayed against its journal.

Every durable call (a step, a sleep, a signal wait, a child, a map, a recorded
value) takes the next position when it is *called*. If the journal already
holds an entry there, its recorded result is returned without acting (after
checking that the code still asks for the same thing, else
:class:`~pgflow.errors.NonDeterminismError`). The first unrecorded call acts
for real and is reported before the workflow goes on; a step's checkpoint is
held back until the next durable call or the run's end (see
:meth:`Replay.flush`). Cancellation is honoured at these points.

Control flow that must unwind the workflow function (suspending the run,
giving it back while draining, a lost lease, continue-as-new) uses the
``BaseException`` subclasses below, so ``except Exception`` in workflow code
cannot swallow it.

Where the neighbours are: workflow code sees only :class:`pgflow.context.Context`,
whose methods are one-liners over :class:`Replay`. A live step's function is
called by :mod:`pgflow.steps` (timeouts, threads, the retry policy's local
side). The journal's types and recorded errors are :mod:`pgflow.journal`.
The worker side of :class:`RunSession` is :class:`pgflow.runner.RunExecution`,
which reports through :mod:`pgflow.reporter` (checkpoints, completions and
sleeps, batched) and :mod:`pgflow.procedures` (the rest). A sleep becomes a
timer in SQL: :meth:`Replay.sleep` reports it, and ``pgflow.complete_batch``
(``pgflow.sleep``) parks the run with a timer that ``pgflow.fire_timers``
(:mod:`pgflow.scheduler`) fires. Retries are decided in SQL by
``pgflow.fail_step``. See ``sql/README.md``.
"""

# Who imports whom (tests/unit/test_import_graph.py fails on any cycle, and on an
# engine or database module importing a layer above it). Leaves imported nearly
# everywhere (errors, durations, models) are left out.
#
#   public API    pgflow/__init__ -> client, context, definitions, retry, testing, worker
#                 context -> journal, replay, retry, saga, steps       saga -> replay
#                 client, aio -> connections, definitions, queries     testing -> replaycheck
#   worker        worker -> definitions, membership, procedures, reporter, runner, scheduler
#                 runner, replaycheck -> context, definitions, journal, replay, steps, ...
#   engine        replay -> codec, definitions, journal, queries, retry, steps, validation
#                 steps -> retry
#   declarations  definitions -> codec, retry, steps, validation
#                 queries -> codec, definitions, validation            validation -> retry
#   database      reporter -> procedures -> journal, retry             membership -> procedures
#   leaves        journal, codec, connections, schema -> errors        dsn -> embedded
#
# The engine reaches the database only through RunSession (pgflow.runner implements it).

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol

from pgflow import codec, definitions, errors, queries
from pgflow.durations import as_timedelta
from pgflow.journal import FailOutcome, JournalEntry, error_json, item_failed, step_failed
from pgflow.retry import Retry
from pgflow.steps import (
    LiveStep,
    in_own_thread,
    is_retryable,
    outside_workflow,
    policy_for,
    result_decoder,
    timed,
    with_timeout_async,
)
from pgflow.validation import check_key, check_name, check_patch_id

__all__ = ["Abandon", "ContinueAsNew", "Release", "Replay", "RunSession", "Suspend"]


class Suspend(BaseException):
    """The run was put back in the database (e.g. a retry back-off); stop here."""


class Release(BaseException):
    """The worker is draining: give the run back at this durable point."""


class Abandon(BaseException):
    """A report failed (lease lost, database unreachable): stop driving this run.

    Workflow code cannot catch it. If the lease was lost, another worker owns
    the run; otherwise the worker gives up its membership so that recovery
    hands the run to a healthy worker.
    """


class ContinueAsNew(BaseException):
    """ctx.continue_as_new(): end this run and start the workflow again with new input."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("continue as new")
        self.args_ = args
        self.kwargs = kwargs


class StepWatch(Protocol):
    """Told how a live step ended (see :meth:`RunSession.observe_step`)."""

    def done(self, outcome: str, seconds: float, error: BaseException | None = None) -> None:
        """``completed``, ``retrying`` (another attempt is scheduled) or ``failed``."""


class RunSession(Protocol):
    """What the engine needs from the worker running it (see :class:`pgflow.runner.RunExecution`)."""

    run_id: uuid.UUID
    queue: str
    default_retry: Retry

    def at_live_point(self) -> None:
        """Called before each durable call that will act for real (may raise to stop)."""
    def call(self, coro: Coroutine[Any, Any, Any]) -> Any: ...
    async def run_in_thread(self, fn: Callable[[], Any]) -> Any: ...
    async def complete_step(self, seq: int, name: str, kind: str, output: Any,
                            duration: timedelta, ended: float | None = None) -> bool: ...
    async def fail_step(self, seq: int, name: str, kind: str, error: dict[str, Any],
                        duration: timedelta, retryable: bool, policy: Retry) -> FailOutcome: ...
    async def sleep(self, seq: int, name: str, until: datetime | None,
                    duration: timedelta | None,
                    last_step: dict[str, Any] | None = None) -> str: ...
    async def record_value(self, seq: int, kind: str, value: Any,
                           name: str | None = None) -> Any: ...
    async def wait_signal(self, seq: int, name: str,
                          timeout: timedelta | None) -> tuple[str, Any]: ...
    async def set_state(self, key: str, value: Any) -> bool: ...
    async def start_child(self, seq: int, start: tuple[Any, ...]) -> uuid.UUID: ...
    async def wait_child(self, seq: int, child_id: uuid.UUID) -> dict[str, Any] | None: ...
    async def map(self, seq: int, name: str, inputs: list[Any], queue: str,
                  version: str) -> dict[str, Any] | None: ...
    def observe_step(self, name: str, seq: int,
                     attempt: int) -> AbstractContextManager[StepWatch]:
        """Around a live step's code: its metrics, span and log context (pgflow.observe)."""


class Replay:
    """The replay state of one claimed run, and its durable calls.

    In an ``async def`` workflow durable calls return awaitables; in a ``def``
    workflow they block and return values. ``child_handle(engine, run_id,
    workflow)`` makes what ``start_child`` returns (:class:`pgflow.context.ChildHandle`).
    """

    def __init__(self, session: RunSession, journal: list[JournalEntry], *, is_async: bool,
                 child_handle: Callable[[Replay, uuid.UUID, Any], Any],
                 workflow_retry: Retry | None = None, cancel_requested: bool = False,
                 cancel_seq: int | None = None) -> None:
        self._session = session
        self._journal = {entry.seq: entry for entry in journal}
        self._is_async = is_async
        self._child_handle = child_handle
        self._workflow_retry = workflow_retry
        self._seq = 0
        # The last journal position recorded before this claim: below it, the
        # workflow is replaying and publishes nothing again (see set_state).
        self._replay_until = max(self._journal, default=-1)
        self._cancel_requested = cancel_requested
        self._cancel_seq = cancel_seq  # the suspension the cancel interrupted, if any
        self._cancel_raised = False
        # The last step's checkpoint, held until the workflow's next durable call
        # (which sends it first) or its return (which sends it with the run's
        # completion, one transaction instead of two).
        self._unflushed: dict[str, Any] | None = None

    @property
    def workflow_id(self) -> uuid.UUID:
        return self._session.run_id

    @property
    def position(self) -> int:
        """How many journal positions the code has taken: the next durable call's position."""
        return self._seq

    def stopped_position(self) -> int:
        """The position of the durable call that ``RunSession.at_live_point`` stopped.

        A durable call takes its position before it reaches its live point, so
        the call that was stopped holds the one before :attr:`position`.
        """
        return self._seq - 1

    # -- the durable calls of pgflow.context.Context ------------------------

    def step(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        check_name(name, "step name")
        return self.call_step(fn, name, args, kwargs)

    def sleep(self, duration: timedelta | float) -> Any:
        delta = as_timedelta(duration, "sleep duration")
        seq, entry = self._replay("sleep", "sleep")
        return self._durable(self._sleep(seq, entry, None, delta))

    def sleep_until(self, when: datetime) -> Any:
        if not isinstance(when, datetime) or when.tzinfo is None:
            raise TypeError(f"sleep_until needs an aware datetime, not {when!r}")
        seq, entry = self._replay("sleep", "sleep")
        return self._durable(self._sleep(seq, entry, when, None))

    def now(self) -> Any:
        return self._recorded_value("now", None, _decode_datetime)

    def uuid4(self) -> Any:
        return self._recorded_value("uuid4", str(uuid.uuid4()), uuid.UUID)

    def random(self) -> Any:
        return self._recorded_value("random", random.random(), float)

    def patched(self, patch_id: str) -> Any:
        check_patch_id(patch_id)
        entry = self._journal.get(self._seq)
        if entry is not None and not (entry.kind == "patch" and entry.name == patch_id):
            return self._answer(False)  # recorded before the patch: no position consumed
        seq, entry = self._replay(patch_id, "patch")
        if entry is not None:
            return self._answer(True)
        return self._durable(self._value(seq, None, "patch", True, bool, name=patch_id))

    def deprecate_patch(self, patch_id: str) -> Any:
        check_patch_id(patch_id)
        entry = self._journal.get(self._seq)
        if entry is not None and entry.kind == "patch" and entry.name == patch_id:
            self._seq += 1
        return self._answer(None)

    def _answer(self, value: Any) -> Any:
        """``value`` as a durable call returns it: awaitable in async workflows."""
        if not self._is_async:
            return value

        async def answer() -> Any:
            return value
        return answer()

    def wait_for_signal(self, name: str, timeout: timedelta | float | None) -> Any:
        check_name(name, "signal name")
        limit = None if timeout is None else as_timedelta(timeout, "signal timeout")
        seq, entry = self._replay(name, "signal")
        return self._durable(self._wait_signal(seq, entry, name, limit))

    def set_state(self, key: str, value: Any) -> Any:
        check_key(key, "state key")
        data = codec.to_json(value, f"state {key!r}")
        return self._durable(self._set_state(key, data))

    def start_child(self, workflow: Any, args: tuple[Any, ...], key: str | None,
                    kwargs: dict[str, Any]) -> Any:
        start = queries.start_params(workflow, args, kwargs, key, None, 0, None)
        seq, entry = self._replay(start[0], "start_child")
        return self._durable(self._start_child(seq, entry, workflow, start))

    def child_result(self, handle: Any) -> Any:
        """Wait for the child of ``handle`` (a ChildHandle) and return its result."""
        seq, entry = self._replay("child", "child")
        return self._durable(self._child_result(seq, entry, handle))

    def call(self, workflow: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = kwargs.pop("key", None)  # start_child's own keyword
        if self._is_async:
            async def call_async() -> Any:
                handle = await self.start_child(workflow, args, key, kwargs)
                return await self.child_result(handle)
            return call_async()
        return self.child_result(self.start_child(workflow, args, key, kwargs))

    def map(self, step: Any, items: Any) -> Any:
        if not isinstance(step, definitions.Step):
            raise TypeError(f"ctx.map needs a @pgflow.step function, not {step!r}")
        inputs = [codec.to_json([item], f"item {i} of ctx.map({step.name})")
                  for i, item in enumerate(items)]
        target = definitions.map_workflow(step)
        seq, entry = self._replay(target.name, "map")
        return self._durable(self._map(seq, entry, step, target, inputs))

    def _recorded_value(self, kind: str, value: Any, decode: Callable[[Any], Any]) -> Any:
        seq, entry = self._replay(kind, kind)
        return self._durable(self._value(seq, entry, kind, value, decode))

    # -- plumbing shared by durable calls -----------------------------------

    def _durable(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self._is_async:
            return coro
        return self._session.call(coro)

    def _replay(self, name: str, kind: str) -> tuple[int, JournalEntry | None]:
        seq = self._seq
        self._seq += 1
        entry = self._journal.get(seq)
        if entry is not None and (entry.name != name or entry.kind != kind):
            hint = (f" (the code no longer calls ctx.patched or ctx.deprecate_patch"
                    f"({entry.name!r}) here)" if entry.kind == "patch" else "")
            raise errors.NonDeterminismError(
                f"run {self.workflow_id}: durable call #{seq} is {kind} {name!r} in the code "
                f"but {entry.kind} {entry.name!r} in the journal{hint}")
        if (entry is None or entry.status in ("retrying", "sleeping", "waiting")
                or (self._cancel_seq is not None and seq >= self._cancel_seq)):
            self._live_point()
        return seq, entry

    def _live_point(self) -> None:
        """The workflow is about to act for real: cancel here, or let the session stop it."""
        if self._cancel_requested and not self._cancel_raised:
            self._cancel_raised = True  # once: cleanup and compensations then proceed
            raise errors.Cancelled(f"run {self.workflow_id} was cancelled")
        self._session.at_live_point()

    async def flush(self) -> None:
        """Send the held-back step checkpoint, if any (before anything else acts)."""
        pending, self._unflushed = self._unflushed, None
        if pending is None:
            return
        try:
            cancel = await self._session.complete_step(
                pending["seq"], pending["name"], pending["kind"], pending["output"],
                timedelta(seconds=pending["duration_s"]), pending["ended"])
        except Exception as exc:
            raise Abandon(f"checkpoint of step {pending['name']!r} failed: {exc}") from exc
        if cancel:
            self._cancel_requested = True

    def take_unflushed(self) -> dict[str, Any] | None:
        """The held-back checkpoint, for the run's completion to carry (see flush)."""
        pending, self._unflushed = self._unflushed, None
        return pending

    async def _report(self, what: str, report: Coroutine[Any, Any, Any],
                      cancellable: bool = True) -> Any:
        """Await a report; any failure to make it ends the run here (see :class:`Abandon`).

        The held-back checkpoint goes first; if its answer says the run was cancelled,
        a cancellable report (an action: sleeping, waiting, starting) is not made.
        """
        try:
            await self.flush()
            if cancellable and self._cancel_requested and not self._cancel_raised:
                self._cancel_raised = True
                raise errors.Cancelled(f"run {self.workflow_id} was cancelled")
        except BaseException:
            report.close()  # never awaited
            raise
        try:
            return await report
        except (ValueError, errors.WorkflowNotFound, errors.KeyConflict):
            # The database refused the request itself (PF002, PF005): a bad
            # argument is the workflow's error to handle, not lost contact.
            raise
        except Exception as exc:
            raise Abandon(f"{what} failed: {exc}") from exc

    async def _sleep(self, seq: int, entry: JournalEntry | None, until: datetime | None,
                     duration: timedelta | None) -> None:
        if entry is not None and entry.status == "completed":
            return
        if self._cancel_requested and not self._cancel_raised:
            # Known already: the held checkpoint goes alone, then Cancelled here.
            await self.flush()
            self._cancel_raised = True
            raise errors.Cancelled(f"run {self.workflow_id} was cancelled")
        # The held-back checkpoint travels with the sleep: one report, not two.
        pending = self.take_unflushed()
        try:
            outcome = await self._session.sleep(seq, "sleep", until, duration, pending)
        except Exception as exc:
            raise Abandon(f"recording a sleep failed: {exc}") from exc
        if outcome == "cancel":
            self._cancel_requested = self._cancel_raised = True
            raise errors.Cancelled(f"run {self.workflow_id} was cancelled")
        if outcome == "sleeping":
            raise Suspend()
        self._journal[seq] = JournalEntry(seq, "sleep", "sleep", "completed", 1, None, None)

    async def _value(self, seq: int, entry: JournalEntry | None, kind: str, value: Any,
                     decode: Callable[[Any], Any], name: str | None = None) -> Any:
        if entry is None:
            recorded = await self._report(
                f"recording ctx.{kind}()", self._session.record_value(seq, kind, value, name))
            entry = JournalEntry(seq, name or kind, kind, "completed", 1, recorded, None)
            self._journal[seq] = entry
        return decode(entry.output)

    async def _wait_signal(self, seq: int, entry: JournalEntry | None, name: str,
                           timeout: timedelta | None) -> Any:
        if entry is None or entry.status != "completed":
            outcome, payload = await self._report(
                f"waiting for signal {name!r}",
                self._session.wait_signal(seq, name, timeout))
            if outcome == "waiting":
                raise Suspend()
            output = {"timed_out": True} if outcome == "timed_out" else {"payload": payload}
            entry = JournalEntry(seq, name, "signal", "completed", 1, output, None)
            self._journal[seq] = entry
        if isinstance(entry.output, dict) and entry.output.get("timed_out"):
            raise errors.SignalTimeout(f"signal {name!r} did not arrive in time")
        return entry.output.get("payload") if isinstance(entry.output, dict) else None

    async def _set_state(self, key: str, data: Any) -> None:
        if self._seq <= self._replay_until:
            return  # replaying: this value was published when the code first ran here
        # Not cancellable: it publishes what has already happened (e.g. progress).
        if await self._report(f"publishing state {key!r}",
                              self._session.set_state(key, data), cancellable=False):
            self._cancel_requested = True

    async def _start_child(self, seq: int, entry: JournalEntry | None, workflow: Any,
                           start: tuple[Any, ...]) -> Any:
        if entry is not None:
            child_id = uuid.UUID(str(entry.output["run_id"]))
        else:
            child_id = await self._report(f"starting child {start[0]!r}",
                                          self._session.start_child(seq, start))
            self._journal[seq] = JournalEntry(seq, start[0], "start_child", "completed", 1,
                                              {"run_id": str(child_id)}, None)
        return self._child_handle(self, child_id, workflow)

    async def _child_result(self, seq: int, entry: JournalEntry | None, handle: Any) -> Any:
        if entry is None or entry.status != "completed":
            outcome = await self._report("waiting for a child",
                                         self._session.wait_child(seq, handle.run_id))
            if outcome is None:
                raise Suspend()
            entry = JournalEntry(seq, "child", "child", "completed", 1, outcome, None)
            self._journal[seq] = entry
        outcome = entry.output
        child_id = uuid.UUID(str(outcome["run_id"]))
        if outcome["status"] == "completed":
            signature = getattr(handle.workflow, "signature", None)
            if signature is None:
                return outcome["output"]
            return signature.decode_result(outcome["output"], f"the result of child {child_id}")
        error = outcome.get("error") or {}
        if outcome["status"] == "cancelled":
            error = {"type": "pgflow.errors.WorkflowCancelled",
                     "message": f"child run {child_id} was cancelled"}
        raise errors.ChildFailed(child_id, error)

    async def _map(self, seq: int, entry: JournalEntry | None, step: Any, target: Any,
                   inputs: list[Any]) -> list[Any]:
        if entry is None or entry.status != "completed":
            queue = step.queue or self._session.queue  # items go where this run's workers are
            outcome = await self._report(f"ctx.map({step.name})", self._session.map(
                seq, target.name, inputs, queue, target.version))
            if outcome is None:
                raise Suspend()
            entry = JournalEntry(seq, target.name, "map", "completed", 1, outcome, None)
            self._journal[seq] = entry
        results = []
        for index, item in enumerate(entry.output["items"]):
            if item["status"] != "completed":
                raise item_failed(step.name, index, item)
            results.append(step.signature.decode_result(
                item["output"], f"the result of {step.name!r} for item {index}"))
        return results

    # -- durable steps ------------------------------------------------------

    def call_step(self, step: definitions.Step | Callable[..., Any], name: str, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
        """A step call: ``@pgflow.step`` functions, ``ctx.step``, map items, compensations."""
        live, value = self._begin(step, name)
        if self._is_async:
            return self._step_async(step, live, value, args, kwargs)
        return self._step_sync(step, live, value, args, kwargs)

    def _begin(self, step: Any, name: str) -> tuple[LiveStep | None, Any]:
        """Replay the step if recorded: ``(None, value)``; else ``(live step, None)``."""
        seq, entry = self._replay(name, "step")
        decode = result_decoder(step, name)
        if entry is not None and entry.status != "retrying":
            return None, (lambda: self._recorded(name, entry, decode))
        fn = getattr(step, "fn", step)
        is_async = getattr(step, "is_async", False) or asyncio.iscoroutinefunction(fn)
        timeout = getattr(step, "timeout", None)
        attempt = entry.attempts + 1 if entry is not None else 1
        return LiveStep(seq, name, fn, is_async, decode, timeout, attempt), None

    def _before_live_step(self) -> None:
        """The previous step's checkpoint commits before this step acts (and may bring news
        of a cancellation, honoured here)."""
        if self._cancel_requested and not self._cancel_raised:
            self._live_point()

    def _step_sync(self, step: Any, live: LiveStep | None, recorded: Any,
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if live is None:
            return recorded()
        if self._unflushed is not None:
            self._session.call(self.flush())
            self._before_live_step()
        with self._session.observe_step(live.name, live.seq, live.attempt) as watch:
            started = time.monotonic()
            try:  # the function runs in pgflow.steps: outside the workflow, within its timeout
                if live.is_async:
                    result = self._session.call(with_timeout_async(live, args, kwargs))
                elif live.timeout is not None:
                    result = in_own_thread(live, args, kwargs)
                else:
                    result = outside_workflow(live.fn, args, kwargs)
                output = codec.to_json(result, f"the result of step {live.name!r}")
            except Exception as exc:
                return self._session.call(self._failed(step, live, exc, started, watch))
            self._hold(live, output, started, watch)
        return live.decode(output)

    async def _step_async(self, step: Any, live: LiveStep | None, recorded: Any,
                          args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if live is None:
            return recorded()
        if self._unflushed is not None:
            await self.flush()
            self._before_live_step()
        fn = live.fn
        with self._session.observe_step(live.name, live.seq, live.attempt) as watch:
            started = time.monotonic()
            try:
                if live.is_async:
                    result = await with_timeout_async(live, args, kwargs)
                else:
                    result = await timed(live, self._session.run_in_thread(
                        lambda: fn(*args, **kwargs)))
                output = codec.to_json(result, f"the result of step {live.name!r}")
            except Exception as exc:
                return await self._failed(step, live, exc, started, watch)
            self._hold(live, output, started, watch)
        return live.decode(output)

    def _recorded(self, name: str, entry: JournalEntry, decode: Callable[[Any], Any]) -> Any:
        if entry.status == "failed":
            raise step_failed(name, entry)
        return decode(entry.output)

    def _hold(self, live: LiveStep, output: Any, started: float, watch: StepWatch) -> None:
        """Keep the step's checkpoint until the next durable call or the end (see flush).

        Nothing acts before it is sent, so a crash meanwhile only repeats this step,
        as a crash during it would.
        """
        assert self._unflushed is None, "a checkpoint is sent before the next step runs"
        ended = time.monotonic()  # the checkpoint records when it ended, not when it was sent
        watch.done("completed", ended - started)
        self._unflushed = {"seq": live.seq, "name": live.name, "kind": "step",
                           "output": output, "duration_s": ended - started, "ended": ended}
        self._journal[live.seq] = JournalEntry(live.seq, live.name, "step", "completed", 1,
                                               output, None)

    async def _failed(self, step: Any, live: LiveStep, exc: Exception, started: float,
                      watch: StepWatch) -> Any:
        duration = timedelta(seconds=time.monotonic() - started)
        policy = policy_for(step, self._workflow_retry, self._session.default_retry)
        retryable = is_retryable(policy, exc)
        error = error_json(exc)
        outcome = await self._report(f"failure report of step {live.name!r}", self._session.fail_step(
            live.seq, live.name, "step", error, duration, retryable, policy), cancellable=False)
        watch.done("retrying" if outcome.outcome == "retry" else "failed",
                   duration.total_seconds(), exc)
        if outcome.outcome == "retry":
            raise Suspend()
        entry = JournalEntry(live.seq, live.name, "step", "failed", outcome.attempts, None, error)
        self._journal[live.seq] = entry
        raise step_failed(live.name, entry) from exc


def _decode_datetime(data: Any) -> datetime:
    return codec.from_json(data, datetime, "the recorded ctx.now()")
