"""Step execution: how a live step's function is called, and the local side of retries.

A step that replay does not answer from the journal runs here: outside the
workflow (inside a step, further step calls are plain calls), with its
``timeout`` (an async step is cancelled; a sync one runs in its own thread,
which is left to finish on its own if it overruns), its result decoded back
into the step's return type. :func:`policy_for` and :func:`is_retryable`
choose the retry policy and whether an exception may be retried at all;
whether another attempt comes, and when, is decided in SQL by
``pgflow.fail_step`` (see ``sql/README.md``), called by the worker through
:mod:`pgflow.procedures`.

The engine (:mod:`pgflow.replay`) decides when a step runs live, holds its
checkpoint and reports its failure; this module knows nothing of the journal.
It also keeps the marker of the workflow running in this thread or task
(:func:`current`), read by ``@pgflow.step`` (:mod:`pgflow.definitions`).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pgflow import errors
from pgflow.retry import Retry

__all__ = [
    "LiveStep",
    "current",
    "enter",
    "in_own_thread",
    "is_retryable",
    "leave",
    "outside_workflow",
    "policy_for",
    "result_decoder",
    "timed",
    "with_timeout_async",
]

# The pgflow.Context of the workflow running in this thread or task (None inside a step).
_running: contextvars.ContextVar[Any] = contextvars.ContextVar("pgflow_context", default=None)


def current() -> Any:
    """The :class:`~pgflow.context.Context` of the workflow running here, if any."""
    return _running.get()


def enter(ctx: Any) -> contextvars.Token[Any]:
    """Mark ``ctx``'s workflow as running in this thread or task (until :func:`leave`)."""
    return _running.set(ctx)


def leave(token: contextvars.Token[Any]) -> None:
    _running.reset(token)


@dataclass(frozen=True)
class LiveStep:
    """A step about to run for real (not replayed)."""

    seq: int
    name: str
    fn: Callable[..., Any]
    is_async: bool
    decode: Callable[[Any], Any]
    timeout: timedelta | None
    attempt: int = 1  # 2 and up: a retry


def result_decoder(step: Any, name: str) -> Callable[[Any], Any]:
    """How a step's recorded JSON result becomes its return value (typed by its hints)."""
    signature = getattr(step, "signature", None)
    if signature is None:
        return lambda data: data
    return lambda data: signature.decode_result(data, f"the result of step {name!r}")


def policy_for(step: Any, workflow_retry: Retry | None, default_retry: Retry) -> Retry:
    """The step's own retry policy, else its workflow's, else the worker's default."""
    own = getattr(step, "retry", None)
    return own or workflow_retry or default_retry


def is_retryable(policy: Retry, exc: Exception) -> bool:
    """Whether ``exc`` may be retried at all (a result that cannot be encoded never is)."""
    return policy.is_retryable(exc) and not isinstance(exc, errors.EncodingError)


def _timeout_error(live: LiveStep) -> errors.StepTimeout:
    return errors.StepTimeout(f"step {live.name!r} did not finish within {live.timeout}")


async def timed(live: LiveStep, awaitable: Any) -> Any:
    """Await ``awaitable`` within the step's timeout, if it has one."""
    if live.timeout is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, live.timeout.total_seconds())
    except asyncio.TimeoutError:
        raise _timeout_error(live) from None


async def with_timeout_async(live: LiveStep, args: tuple[Any, ...],
                             kwargs: dict[str, Any]) -> Any:
    """Run an ``async def`` step outside the workflow, within its timeout."""
    return await timed(live, _outside_workflow_async(live.fn, args, kwargs))


def in_own_thread(live: LiveStep, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a sync step with a timeout. A thread cannot be stopped: one that
    overruns is left to finish on its own, and its result is discarded."""
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = outside_workflow(live.fn, args, kwargs)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            finished.set()

    # In a copy of the caller's context: the step's log fields and span go along.
    threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True,
                     name=f"pgflow-step-{live.name}").start()
    assert live.timeout is not None
    if not finished.wait(live.timeout.total_seconds()):
        raise _timeout_error(live)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def outside_workflow(fn: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)`` with no workflow running: its step calls are plain calls."""
    token = _running.set(None)
    try:
        return fn(*args, **kwargs)
    finally:
        _running.reset(token)


async def _outside_workflow_async(fn: Callable[..., Any], args: tuple[Any, ...],
                                  kwargs: dict[str, Any]) -> Any:
    token = _running.set(None)
    try:
        return await fn(*args, **kwargs)
    finally:
        _running.reset(token)
