"""The workflow context: deterministic replay against a run's journal.

Every durable call (a step, and later sleeps, signals, children) takes the
next sequence number. If the journal already holds an entry at that number,
its recorded result is returned without running anything (after checking that
the code still asks for the same thing). The first unrecorded call runs live
and is checkpointed before the workflow continues.

Control flow that must unwind the workflow function (suspending the run,
giving it back while draining, a lost lease) uses internal ``BaseException``
subclasses, so ``except Exception`` in workflow code cannot swallow it.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from pgflow import codec, errors
from pgflow.durations import as_timedelta
from pgflow.retry import Retry

if TYPE_CHECKING:
    from pgflow.definitions import Step

__all__ = ["Context", "current"]

_current: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "pgflow_context", default=None)


def current() -> Context | None:
    """The context of the workflow running in this thread or task, if any."""
    return _current.get()


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


@dataclass(frozen=True)
class JournalEntry:
    seq: int
    name: str
    kind: str
    status: str  # completed | failed | retrying
    attempts: int
    output: Any
    error: dict[str, Any] | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JournalEntry:
        return cls(seq=data["seq"], name=data["name"], kind=data["kind"], status=data["status"],
                   attempts=data["attempts"], output=data.get("output"), error=data.get("error"))


@dataclass(frozen=True)
class _LiveStep:
    """A step about to run for real (not replayed)."""

    seq: int
    name: str
    fn: Callable[..., Any]
    is_async: bool
    decode: Callable[[Any], Any]
    timeout: timedelta | None


@dataclass(frozen=True)
class FailOutcome:
    outcome: str  # retry | failed
    attempts: int


class RunSession(Protocol):
    """What the context needs from the worker running it."""

    run_id: uuid.UUID
    default_retry: Retry

    @property
    def draining(self) -> bool: ...
    def call(self, coro: Coroutine[Any, Any, Any]) -> Any: ...
    async def run_in_thread(self, fn: Callable[[], Any]) -> Any: ...
    async def complete_step(self, seq: int, name: str, kind: str, output: Any,
                            duration: timedelta) -> None: ...
    async def fail_step(self, seq: int, name: str, kind: str, error: dict[str, Any],
                        duration: timedelta, retryable: bool, policy: Retry) -> FailOutcome: ...
    async def sleep(self, seq: int, name: str, until: datetime | None,
                    duration: timedelta | None) -> bool: ...
    async def record_value(self, seq: int, kind: str, value: Any) -> Any: ...


def error_json(exc: BaseException) -> dict[str, Any]:
    """An exception as the ``{type, message, traceback}`` the engine records."""
    cls = type(exc)
    module = cls.__module__
    type_name = cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
    return {
        "type": type_name,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }


def _step_failed(name: str, entry: JournalEntry) -> errors.StepFailed:
    error = entry.error or {}
    return errors.StepFailed(name, str(error.get("type", "Error")), str(error.get("message", "")),
                             entry.attempts, error.get("traceback"))


class Context:
    """Handed to every workflow as its first argument (``ctx``).

    Each durable call takes the next journal position when it is *called*,
    so the order of calls, not of awaits, is what replay checks. In an
    ``async def`` workflow durable calls return awaitables; in a ``def``
    workflow they block and return values.
    """

    def __init__(self, session: RunSession, journal: list[JournalEntry], *, is_async: bool,
                 workflow_retry: Retry | None = None) -> None:
        self._session = session
        self._journal = {entry.seq: entry for entry in journal}
        self._is_async = is_async
        self._workflow_retry = workflow_retry
        self._seq = 0

    @property
    def workflow_id(self) -> uuid.UUID:
        """The run's id."""
        return self._session.run_id

    def step(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` as a step named ``name``.

        For lambdas and plain functions; a ``@pgflow.step`` function keeps its
        retry policy, timeout and return type.
        """
        return self._call_step(fn, name, args, kwargs)

    def sleep(self, duration: timedelta | float) -> Any:
        """Suspend the run for ``duration`` (a timedelta or seconds) of engine time.

        No process waits: the run is parked with a timer and resumed by replay.
        """
        delta = as_timedelta(duration, "sleep duration")
        seq, entry = self._replay("sleep", "sleep")
        return self._durable(self._sleep(seq, entry, None, delta))

    def sleep_until(self, when: datetime) -> Any:
        """Suspend the run until ``when`` (an aware datetime) on the engine clock."""
        if not isinstance(when, datetime) or when.tzinfo is None:
            raise TypeError(f"sleep_until needs an aware datetime, not {when!r}")
        seq, entry = self._replay("sleep", "sleep")
        return self._durable(self._sleep(seq, entry, when, None))

    def now(self) -> Any:
        """The engine clock's time, recorded once: the same value on every replay."""
        return self._recorded_value("now", None, _decode_datetime)

    def uuid4(self) -> Any:
        """A random UUID, recorded once."""
        return self._recorded_value("uuid4", str(uuid.uuid4()), uuid.UUID)

    def random(self) -> Any:
        """A float in [0, 1), recorded once."""
        return self._recorded_value("random", random.random(), float)

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
            raise errors.NonDeterminismError(
                f"run {self.workflow_id}: durable call #{seq} is {kind} {name!r} in the code "
                f"but {entry.kind} {entry.name!r} in the journal")
        if entry is None and self._session.draining:
            raise Release()
        return seq, entry

    async def _report(self, what: str, report: Coroutine[Any, Any, Any]) -> Any:
        """Await a report; any failure to make it ends the run here (see :class:`Abandon`)."""
        try:
            return await report
        except Exception as exc:
            raise Abandon(f"{what} failed: {exc}") from exc

    async def _sleep(self, seq: int, entry: JournalEntry | None, until: datetime | None,
                     duration: timedelta | None) -> None:
        if entry is not None and entry.status == "completed":
            return
        suspended = await self._report(
            "recording a sleep", self._session.sleep(seq, "sleep", until, duration))
        if suspended:
            raise Suspend()
        self._journal[seq] = JournalEntry(seq, "sleep", "sleep", "completed", 1, None, None)

    async def _value(self, seq: int, entry: JournalEntry | None, kind: str, value: Any,
                     decode: Callable[[Any], Any]) -> Any:
        if entry is None:
            recorded = await self._report(
                f"recording ctx.{kind}()", self._session.record_value(seq, kind, value))
            entry = JournalEntry(seq, kind, kind, "completed", 1, recorded, None)
            self._journal[seq] = entry
        return decode(entry.output)

    # -- durable steps ------------------------------------------------------

    def _call_step(self, step: Step | Callable[..., Any], name: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        live, value = self._begin(step, name)
        if self._is_async:
            return self._step_async(step, live, value, args, kwargs)
        return self._step_sync(step, live, value, args, kwargs)

    def _policy(self, step: Step | Callable[..., Any]) -> Retry:
        own = getattr(step, "retry", None)
        return own or self._workflow_retry or self._session.default_retry

    def _begin(self, step: Any, name: str) -> tuple[_LiveStep | None, Any]:
        """Replay the step if recorded: ``(None, value)``; else ``(live step, None)``."""
        seq, entry = self._replay(name, "step")
        decode = _result_decoder(step, name)
        if entry is not None and entry.status != "retrying":
            return None, (lambda: self._recorded(name, entry, decode))
        fn = getattr(step, "fn", step)
        is_async = getattr(step, "is_async", False) or asyncio.iscoroutinefunction(fn)
        timeout = getattr(step, "timeout", None)
        return _LiveStep(seq, name, fn, is_async, decode, timeout), None

    def _step_sync(self, step: Any, live: _LiveStep | None, recorded: Any,
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if live is None:
            return recorded()
        started = time.monotonic()
        try:
            if live.is_async:
                result = self._session.call(_with_timeout_async(live, args, kwargs))
            elif live.timeout is not None:
                result = _in_own_thread(live, args, kwargs)
            else:
                result = _outside_workflow(live.fn, args, kwargs)
            output = codec.to_json(result, f"the result of step {live.name!r}")
        except Exception as exc:
            return self._session.call(self._failed(step, live, exc, started))
        self._session.call(self._checkpoint(live, output, started))
        return live.decode(output)

    async def _step_async(self, step: Any, live: _LiveStep | None, recorded: Any,
                          args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if live is None:
            return recorded()
        started = time.monotonic()
        fn = live.fn
        try:
            if live.is_async:
                result = await _with_timeout_async(live, args, kwargs)
            else:
                result = await _timed(live, self._session.run_in_thread(lambda: fn(*args, **kwargs)))
            output = codec.to_json(result, f"the result of step {live.name!r}")
        except Exception as exc:
            return await self._failed(step, live, exc, started)
        await self._checkpoint(live, output, started)
        return live.decode(output)

    def _recorded(self, name: str, entry: JournalEntry, decode: Callable[[Any], Any]) -> Any:
        if entry.status == "failed":
            raise _step_failed(name, entry)
        return decode(entry.output)

    async def _checkpoint(self, live: _LiveStep, output: Any, started: float) -> None:
        duration = timedelta(seconds=time.monotonic() - started)
        await self._report(f"checkpoint of step {live.name!r}", self._session.complete_step(
            live.seq, live.name, "step", output, duration))
        self._journal[live.seq] = JournalEntry(live.seq, live.name, "step", "completed", 1,
                                               output, None)

    async def _failed(self, step: Any, live: _LiveStep, exc: Exception, started: float) -> Any:
        duration = timedelta(seconds=time.monotonic() - started)
        policy = self._policy(step)
        retryable = policy.is_retryable(exc) and not isinstance(exc, errors.EncodingError)
        error = error_json(exc)
        outcome = await self._report(f"failure report of step {live.name!r}", self._session.fail_step(
            live.seq, live.name, "step", error, duration, retryable, policy))
        if outcome.outcome == "retry":
            raise Suspend()
        entry = JournalEntry(live.seq, live.name, "step", "failed", outcome.attempts, None, error)
        self._journal[live.seq] = entry
        raise _step_failed(live.name, entry) from exc


def _decode_datetime(data: Any) -> datetime:
    return codec.from_json(data, datetime, "the recorded ctx.now()")


def _timeout_error(live: _LiveStep) -> errors.StepTimeout:
    return errors.StepTimeout(f"step {live.name!r} did not finish within {live.timeout}")


async def _timed(live: _LiveStep, awaitable: Any) -> Any:
    if live.timeout is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, live.timeout.total_seconds())
    except asyncio.TimeoutError:
        raise _timeout_error(live) from None


async def _with_timeout_async(live: _LiveStep, args: tuple[Any, ...],
                              kwargs: dict[str, Any]) -> Any:
    return await _timed(live, _outside_workflow_async(live.fn, args, kwargs))


def _in_own_thread(live: _LiveStep, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a sync step with a timeout. A thread cannot be stopped: one that
    overruns is left to finish on its own, and its result is discarded."""
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = _outside_workflow(live.fn, args, kwargs)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=target, daemon=True, name=f"pgflow-step-{live.name}").start()
    assert live.timeout is not None
    if not finished.wait(live.timeout.total_seconds()):
        raise _timeout_error(live)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _result_decoder(step: Any, name: str) -> Callable[[Any], Any]:
    signature = getattr(step, "signature", None)
    if signature is None:
        return lambda data: data
    return lambda data: signature.decode_result(data, f"the result of step {name!r}")


def _outside_workflow(fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
    # Inside a step, further step calls are plain calls, not durable ones.
    token = _current.set(None)
    try:
        return fn(*args, **kwargs)
    finally:
        _current.reset(token)


async def _outside_workflow_async(fn: Callable[..., Any], args: tuple[Any, ...],
                                  kwargs: dict[str, Any]) -> Any:
    token = _current.set(None)
    try:
        return await fn(*args, **kwargs)
    finally:
        _current.reset(token)


def enter(ctx: Context) -> contextvars.Token[Context | None]:
    return _current.set(ctx)


def leave(token: contextvars.Token[Context | None]) -> None:
    _current.reset(token)
