"""Group commit: the checkpoints of a worker's concurrent runs share round trips.

Each run waits for its own checkpoint before it goes on, so a worker with N
runs in flight would pay N round trips and N commits for N checkpoints. The
reporter sends a report at once when nothing is being sent; reports that come
while a batch is on its way wait for it and leave together in the next one
(``pgflow.complete_batch``: one statement, one transaction). A lone run waits
no longer than with a call of its own, and a busy worker commits once for many
runs.

The reports of the steady path travel this way: a step's checkpoint, a run's
completion and a durable sleep (each of the last two with the checkpoint held
back before it). The rarer ones (failures, signals, children) keep their own
procedures.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from pgflow import errors
from pgflow.procedures import Procedures, ReportFailed

__all__ = ["Reporter"]

logger = logging.getLogger("pgflow.worker")

MAX_BATCH = 64  # reports in one complete_batch call
MAX_IN_FLIGHT = 2  # batches on their way at once (each on its own pooled connection)


@dataclass
class Report:
    """One element of ``pgflow.complete_batch`` and the future its run waits on."""

    run_id: uuid.UUID
    token: int
    seq: int | None = None
    name: str | None = None
    kind: str | None = None
    output: Any = None
    duration_s: float | None = None
    finish: bool = False
    result: Any = None
    sleep_seq: int | None = None
    sleep_until: datetime | None = None
    sleep_seconds: float | None = None
    ended: float | None = None  # time.monotonic() when the step ended
    age_s: float | None = None  # seconds from then to the sending of its batch
    done: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Reporter:
    """Collects checkpoints and completions and sends them in batches.

    :param procedures: the worker's procedure calls (its pool and retry policy).
    :param max_batch: most reports in one call.
    :param max_in_flight: most batches on their way at once.
    """

    def __init__(self, procedures: Procedures, max_batch: int = MAX_BATCH,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._procedures = procedures
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._waiting: list[Report] = []
        self._in_flight = 0
        self._sending: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self._pump_scheduled = False
        self.batches = 0  # calls made, for tests and statistics
        self.reports = 0

    async def complete_step(self, run_id: uuid.UUID, token: int, seq: int, name: str,
                            kind: str, output: Any, duration: timedelta,
                            ended: float | None = None) -> bool:
        """Checkpoint a step that ended at ``ended`` (``time.monotonic()``, default: now).

        Returns whether the run's cancellation was requested.
        """
        outcome = await self._submit(Report(run_id, token, seq, name, kind, output,
                                            duration.total_seconds(), ended=ended))
        return outcome == "cancel"

    async def complete_run(self, run_id: uuid.UUID, token: int, output: Any,
                           last_step: dict[str, Any] | None = None) -> None:
        """Complete a run, recording ``last_step`` (a held-back checkpoint) with it."""
        await self._submit(_with_step(Report(run_id, token, finish=True, result=output),
                                      last_step))

    async def sleep(self, run_id: uuid.UUID, token: int, seq: int, until: datetime | None,
                    duration: timedelta | None, last_step: dict[str, Any] | None = None) -> str:
        """Record a durable sleep at ``seq`` after ``last_step``, if any.

        Returns ``sleeping`` (the run now sleeps), ``ok`` (its time had come
        already) or ``cancel`` (``last_step`` recorded, no sleep: cancelled).
        """
        report = Report(run_id, token, sleep_seq=seq, sleep_until=until,
                        sleep_seconds=None if duration is None else duration.total_seconds())
        return await self._submit(_with_step(report, last_step))

    # -- batching -----------------------------------------------------------

    async def _submit(self, report: Report) -> str:
        self._waiting.append(report)
        if not self._pump_scheduled:
            # After the current loop iteration: the runs woken together by one
            # batch's answer all get to queue their next report first.
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)
        outcome = await asyncio.shield(report.done)
        _raise_for(report, outcome)
        return outcome

    def _pump(self) -> None:
        self._pump_scheduled = False
        while self._waiting and self._in_flight < self._max_in_flight:
            batch = self._waiting[:self._max_batch]
            del self._waiting[:self._max_batch]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[Report]) -> None:
        _stamp(batch)
        try:
            outcomes = await self._procedures.complete_batch(batch)
            self.batches += 1
            self.reports += len(batch)
            for report in batch:
                _settle(report, outcomes.get(report.run_id, "unknown"))
        except (ReportFailed, psycopg.OperationalError, psycopg.InterfaceError) as exc:
            for report in batch:
                _fail(report, exc)
        except Exception as exc:
            # Not the connection: something in the batch itself (a deadlock, a
            # bad value). Send each report alone so that each gets its own answer.
            logger.warning("batch of %d reports failed (%s); sending them one by one",
                           len(batch), str(exc).strip().splitlines()[0:1])
            await asyncio.gather(*(self._send_alone(report) for report in batch))
        finally:
            self._in_flight -= 1
            self._pump()

    async def _send_alone(self, report: Report) -> None:
        _stamp([report])
        try:
            outcomes = await self._procedures.complete_batch([report])
            _settle(report, outcomes.get(report.run_id, "unknown"))
        except Exception as exc:
            _fail(report, exc)


def _with_step(report: Report, last_step: dict[str, Any] | None) -> Report:
    """``report`` carrying the held-back checkpoint ``last_step`` (see Context.flush)."""
    if last_step is not None:
        report.seq, report.name, report.kind = last_step["seq"], last_step["name"], last_step["kind"]
        report.output, report.duration_s = last_step["output"], last_step["duration_s"]
        report.ended = last_step.get("ended")
    return report


def _stamp(batch: list[Report]) -> None:
    """How long ago each step ended: the engine dates it back by that much.

    Only the database's clock names times; the worker measures intervals
    (durations, waits in the queue) on its monotonic clock.
    """
    now = time.monotonic()
    for report in batch:
        report.age_s = None if report.ended is None else max(0.0, now - report.ended)


def _settle(report: Report, outcome: str) -> None:
    if not report.done.done():
        report.done.set_result(outcome)


def _fail(report: Report, exc: BaseException) -> None:
    if not report.done.done():
        report.done.set_exception(exc)


def _raise_for(report: Report, outcome: str) -> None:
    """The error a single-run procedure would have raised for this outcome."""
    what = f"step {report.seq} ({report.name})" if report.seq is not None else "completion"
    if outcome == "lease_lost":
        raise errors.LeaseLost(f"lease lost on run {report.run_id}: token {report.token} "
                               f"is not current ({what} refused)")
    if outcome == "unknown":
        raise errors.RunNotFound(f"unknown run {report.run_id}")
    if outcome == "duplicate":
        raise errors.PgflowError(f"{what} of run {report.run_id} is already recorded")
