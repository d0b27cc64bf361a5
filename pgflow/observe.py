"""What one execution of a run shows the outside: metrics, spans and log context together.

The runner (:mod:`pgflow.runner`) makes a :class:`RunObserver` for each claimed
run and the replay (:mod:`pgflow.replay`) wraps each live step in
:meth:`RunObserver.step`; both only say what happened, and this module tells
:mod:`pgflow.metrics`, :mod:`pgflow.tracing` and :mod:`pgflow.logs`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from pgflow import logs
from pgflow.metrics import Instruments
from pgflow.tracing import RunSpans, StepSpan

logger = logging.getLogger("pgflow.worker")


class StepWatch:
    """A live step's outcome, told by the replay when it knows it."""

    def __init__(self, span: StepSpan) -> None:
        self._span = span
        self.outcome: str | None = None
        self.seconds = 0.0

    def done(self, outcome: str, seconds: float, error: BaseException | None = None) -> None:
        """``completed``, ``retrying`` (another attempt is scheduled) or ``failed``."""
        self.outcome, self.seconds = outcome, seconds
        self._span.ended(outcome, error)


class RunObserver:
    """Metrics, spans and log context of one execution of one run."""

    def __init__(self, instruments: Instruments, run_id: Any, workflow: str, version: str,
                 traceparent: str | None) -> None:
        self._instruments = instruments
        self.workflow = workflow
        self.log_fields = {"run_id": str(run_id), "workflow": workflow}
        self.spans = RunSpans(run_id, workflow, version, traceparent)
        self._ended = False
        instruments.run_started()

    @contextlib.contextmanager
    def step(self, name: str, seq: int, attempt: int) -> Iterator[StepWatch]:
        """Around a live step's code: its span (current meanwhile) and its log context."""
        with self.spans.step(name, seq, attempt) as span, logs.step_scope(name, attempt):
            watch = StepWatch(span)
            yield watch
        if watch.outcome is not None:
            self._instruments.step_ended(self.workflow, name, watch.outcome, watch.seconds)
            if watch.outcome != "completed":
                logger.warning("step %s (attempt %d) %s after %.3fs", name, attempt,
                               "failed, will be retried" if watch.outcome == "retrying"
                               else "failed", watch.seconds)

    def ended(self, outcome: str, error: BaseException | None = None) -> None:
        """This execution is over: ``completed``, ``failed``, ``cancelled`` (the run ended),
        or ``suspended``, ``released``, ``continued``, ``abandoned`` (it did not)."""
        if self._ended:
            return
        self._ended = True
        self._instruments.run_left()
        if outcome in ("completed", "failed", "cancelled"):
            self._instruments.run_ended(self.workflow, outcome)
        self.spans.end(outcome, error)
