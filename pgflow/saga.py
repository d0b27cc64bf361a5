"""Sagas: undo the steps that succeeded when a later one fails.

::

    with ctx.saga() as saga:                 # `async with` in an async workflow
        flight = reserve_flight(trip)
        saga.add(cancel_flight, flight)
        hotel = reserve_hotel(trip)
        saga.add(cancel_hotel, hotel)
        reserve_car(trip)                    # raises: hotel, then flight, are cancelled

On an exception, or on ``pgflow.Cancelled``, inside the block, the added
compensations run as durable steps (with their retry policies) in reverse
order, then the original exception propagates. A compensation that fails for
good does not stop the others; the original exception is still the one
raised. The engine's own control flow (suspending, draining) passes through
untouched: replay gets back to the same point and compensates then.

Each compensation is an ordinary step call of the engine (:mod:`pgflow.replay`),
so it is journaled, replayed and retried like any other step.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from pgflow import errors
from pgflow.replay import Abandon, ContinueAsNew, Release, Suspend

__all__ = ["Saga"]

_ENGINE_FLOW = (Suspend, Release, Abandon, ContinueAsNew)


class Saga:
    """The compensations of one ``ctx.saga()`` block (``ctx``: the workflow's Context)."""

    def __init__(self, ctx: Any) -> None:
        self._call_step = ctx._call_step
        self._compensations: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def add(self, step: Any, *args: Any, **kwargs: Any) -> None:
        """Register ``step(*args, **kwargs)`` to undo what was just done."""
        if not callable(step):
            raise TypeError(f"a compensation must be a step or a callable, not {step!r}")
        self._compensations.append((step, args, kwargs))

    def _should_compensate(self, exc: BaseException | None) -> bool:
        return exc is not None and not isinstance(exc, _ENGINE_FLOW)

    def _pending(self) -> list[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
        undo, self._compensations = list(reversed(self._compensations)), []
        return undo

    # -- def workflows ------------------------------------------------------

    def __enter__(self) -> Saga:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if self._should_compensate(exc):
            for step, args, kwargs in self._pending():
                try:
                    self._call_step(step, _name(step), args, kwargs)
                except errors.StepFailed:
                    continue  # recorded in the journal; the others still run
        return False

    # -- async def workflows ------------------------------------------------

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if self._should_compensate(exc):
            for step, args, kwargs in self._pending():
                try:
                    await self._call_step(step, _name(step), args, kwargs)
                except errors.StepFailed:
                    continue
        return False


def _name(step: Any) -> str:
    return str(getattr(step, "name", None) or getattr(step, "__name__", "compensation"))
