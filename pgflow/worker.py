"""``pgflow.Worker``: claims runs of its workflows and drives them to the end.

One asyncio loop a process: a claim loop (batch claims on the claim session,
which also LISTENs: woken by NOTIFY or by the poll interval), the membership
task (heartbeat, recovery) and one task a run in flight. Sync workflows and
steps run in a bounded thread pool; async ones on the loop.

Stopping (SIGTERM/SIGINT, or :meth:`Worker.stop`) drains: no new claims, the
steps in flight finish and are checkpointed, and each run is given back at
its next durable call for another worker to continue. A second signal exits
at once; the runs then come back through recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgflow import definitions, schema
from pgflow.claims import ClaimSession
from pgflow.definitions import Workflow
from pgflow.membership import Membership
from pgflow.metrics import instruments
from pgflow.procedures import ClaimedRun, Procedures
from pgflow.reporter import Reporter
from pgflow.retry import DEFAULT_RETRY, Retry
from pgflow.runner import RunExecution
from pgflow.scheduler import Scheduler
from pgflow.schedules import ScheduleSpec, apply_declared, declared_schedules
from pgflow.transactional import TransactionalSteps

__all__ = ["Worker"]

logger = logging.getLogger("pgflow.worker")

# Runs in flight per worker process (and threads for sync code). Measured on 2 cores
# (bench/README.md): more runs in flight make bigger batches (throughput) but each
# run waits longer for the one event loop and the GIL (timer-burst latency); 24 holds
# both targets' throughput and keeps a burst's p99 resume lateness under 50 ms.
DEFAULT_CONCURRENCY = 24
POLL_INTERVAL = 2.0  # seconds between claims when no NOTIFY arrives
HEARTBEAT_INTERVAL = 1.0  # seconds; also how often dead workers are looked for
STALE_AFTER = timedelta(seconds=30)  # a worker silent this long is presumed dead
CLAIM_BATCH = 32  # at most this many runs claimed in one call
# An idle worker that cannot guard its wake-ups yet (a transaction that made a run
# ready is still open) polls this often, doubling up to the max (seconds).
GUARD_RETRY_MIN = 0.002
GUARD_RETRY_MAX = 0.05


class Worker:
    """Runs workflows from a PostgreSQL database until stopped.

    :param dsn: libpq connection string or URL.
    :param workflows: the workflows to serve; default, all declared in this process.
    :param queues: queues to claim from; default, the queues of ``workflows``.
    :param concurrency: runs in flight at once (and threads for sync code).
    :param retry: default step retry policy (a workflow's or step's own wins).
    :param schedule_timers: take part in electing the one scheduler (timers and schedules).
    :param schedules: the schedules to create or update when it starts; default, all
        declared in this process (``pgflow.schedule``). See :mod:`pgflow.schedules`.
    :param metrics: record Prometheus metrics (:mod:`pgflow.metrics`; needs
        ``prometheus_client``). Serving them is :func:`pgflow.metrics.serve`'s.
    """

    def __init__(self, dsn: str, *, workflows: Iterable[Workflow] | None = None,
                 queues: Iterable[str] | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 retry: Retry | None = None, poll_interval: float = POLL_INTERVAL,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 stale_after: timedelta = STALE_AFTER,
                 shutdown_timeout: float | None = None, schedule_timers: bool = True,
                 schedules: Iterable[ScheduleSpec] | None = None, metrics: bool = False) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.dsn = dsn
        self.workflows = list(workflows if workflows is not None
                              else definitions.registered_workflows())
        if not self.workflows:
            raise ValueError("the worker has no workflows: import the modules that define them")
        self.queues = sorted(set(queues) if queues else {wf.queue for wf in self.workflows})
        # By default, the declared schedules of the workflows this worker serves; a
        # worker that serves the others applies them.
        served = {wf.name for wf in self.workflows}
        declared = declared_schedules() if schedules is None else list(schedules)
        self.schedules = [s for s in declared if schedules is not None or s.workflow in served]
        self._left_to_others = [s.id for s in declared if s not in self.schedules]
        self.concurrency = concurrency
        self.retry = retry or DEFAULT_RETRY
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.shutdown_timeout = shutdown_timeout
        self.instruments = instruments(metrics)
        # Every worker may lead timer scheduling; one at a time does (see scheduler.py).
        self.scheduler = Scheduler(dsn) if schedule_timers else None
        # Items of ctx.map run as internal workflows, one per step this process knows.
        self.workflows += [wf for wf in definitions.map_workflows()
                           if (wf.name, wf.version) not in {(w.name, w.version)
                                                            for w in self.workflows}]
        self._by_key = {(wf.name, wf.version): wf for wf in self.workflows}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._inflight: set[asyncio.Task[None]] = set()  # until each run's last report is made
        self._schema_revision: str | None = None  # checked when the worker starts

    @property
    def worker_id(self) -> Any:
        membership = getattr(self, "_membership", None)
        return membership.worker_id if membership else None

    # -- lifecycle ----------------------------------------------------------

    def run(self) -> None:
        """Run until SIGTERM/SIGINT (main thread) or :meth:`stop`; then drain and return."""
        asyncio.run(self._main())

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
        await self.run_async()

    def _on_signal(self, signum: int) -> None:
        if self._stopping.is_set():
            logger.warning("second %s: exiting now; unfinished runs will be recovered",
                           signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("%s received: draining (send it again to exit at once)",
                    signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        """Ask the worker to drain and return; safe from any thread."""
        self._stopping.set()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def run_async(self) -> None:
        """The worker, on the running loop, until :meth:`stop`."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stopping.is_set():
            self._stop.set()
        await asyncio.to_thread(self._check_schema)
        assert self._schema_revision is not None
        revision = schema.revision_number(self._schema_revision)
        guards_wakes = revision >= schema.revision_number(schema.GUARDED_WAKES_REVISION)
        wake = asyncio.Event()
        if self.scheduler is not None:
            self.scheduler.on_fired = wake.set  # woken runs may be ours: claim now
        self._membership = Membership(
            self.dsn, self.queues,
            [wf.announcement() for wf in self.workflows],
            on_wake=wake.set, heartbeat_interval=self.heartbeat_interval,
            stale_after=self.stale_after, guards_wakes=guards_wakes)
        session = ClaimSession(self.dsn, self.queues,
                               on_timer=self.scheduler.poke if self.scheduler is not None else None,
                               guards_wakes=guards_wakes,
                               slots_at_code_end=revision >= schema.revision_number(
                                   schema.CODE_END_SLOTS_REVISION))
        executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="pgflow-run")
        pool = AsyncConnectionPool(self.dsn, min_size=1, max_size=min(self.concurrency, 16) + 1,
                                   kwargs={"autocommit": True}, open=False, name="pgflow-worker")
        await pool.open(wait=True)
        await session.connect()
        procedures = Procedures(pool)
        self._transactional = TransactionalSteps(self.dsn, max_size=self.concurrency)
        self._reporter = Reporter(procedures)
        await self._membership.connect()  # registers the workflows the schedules name
        await asyncio.to_thread(self._apply_schedules)
        logger.info("pgflow schema at revision %s (this worker works with %s)",
                    self._schema_revision, schema.supported_revisions())
        membership_task = asyncio.create_task(self._membership.run(self._stop))
        scheduler_task = (asyncio.create_task(self.scheduler.run(self._stop))
                          if self.scheduler is not None else None)
        try:
            await self._claim_loop(session, procedures, executor, wake)
            session.settle_ended()  # no claim follows: their completions give slots back
            await self._drain()
        finally:
            self._stop.set()
            session.settle_ended()
            if scheduler_task is not None:
                scheduler_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await scheduler_task
            await membership_task
            await self._membership.close()
            await self._transactional.aclose()
            await session.close()
            await pool.close()
            executor.shutdown(wait=False, cancel_futures=True)
            logger.info("worker stopped")

    def _apply_schedules(self) -> None:
        with psycopg.connect(self.dsn) as conn, conn.transaction():
            applied, deleted = apply_declared(conn, sorted({wf.name for wf in self.workflows}),
                                              self.schedules)
        if self._left_to_others:
            logger.info("schedules declared in code for workflows this worker does not serve, "
                        "left to the workers that do: %s", ", ".join(self._left_to_others))
        if applied or deleted:
            logger.info("schedules declared in code: %d applied%s", len(applied),
                        f", {len(deleted)} no longer declared deleted ({', '.join(deleted)})"
                        if deleted else "")

    def _check_schema(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self._schema_revision = schema.check(conn)

    # -- claiming -----------------------------------------------------------

    async def _claim_loop(self, session: ClaimSession, procedures: Procedures,
                          executor: ThreadPoolExecutor, wake: asyncio.Event) -> None:
        assert self._stop is not None
        keys = list(self._by_key)
        slots = _Slots(self.concurrency)  # runs whose code is running
        guard_retry = GUARD_RETRY_MIN
        while not self._stop.is_set():
            free = slots.free
            if free <= 0:
                # Busy: no start needs to wake this worker (claims.py). Timer
                # NOTIFYs still reach the scheduler meanwhile.
                session.settle_ended()  # not worth a claim: their completions give them back
                await session.unguard()
                await session.wait(slots.freed, self._stop, timeout=None, ready_wakes=False)
                slots.freed.clear()
                continue
            wake.clear()
            worker_id = self._membership.worker_id
            want = min(free, CLAIM_BATCH)
            try:
                if not self._membership.registered.is_set():
                    raise ConnectionError("not registered")
                claimed = await session.claim(worker_id, keys, want)
            except (psycopg.Error, ConnectionError) as exc:
                logger.warning("claim failed: %s", str(exc).strip().splitlines()[0:1])
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(self.poll_interval, 1.0))
                continue
            for run in claimed:
                if self.instruments.enabled:
                    self.instruments.claimed(run.queue or "", run.claim_delay)
                slot = slots.take()
                code_ended = (functools.partial(self._code_ended, session, wake, run)
                              if run.limited else None)
                task = asyncio.create_task(self._execute(run, procedures, executor, slot,
                                                         code_ended))
                self._inflight.add(task)
                task.add_done_callback(functools.partial(self._finished, slot=slot, wake=wake))
            if len(claimed) == want:
                await session.unguard()  # more may be ready: starts need not wake us
                continue
            if not session.guarded:
                # About to wait for a NOTIFY: from now on starts send one (claims.py).
                if await session.guard():
                    guard_retry = GUARD_RETRY_MIN
                    continue  # claim once more: a start that committed before did not
                # A transaction that made a run of these queues ready has not ended
                # (it holds a wake lock; starts on the others NOTIFY already): poll
                # shortly until it has.
                await session.wait(wake, self._stop, timeout=guard_retry)
                guard_retry = min(guard_retry * 2, GUARD_RETRY_MAX)
                continue
            await session.wait(wake, self._stop, timeout=self.poll_interval)

    def _finished(self, task: asyncio.Task[bool], *, slot: _Slot, wake: asyncio.Event) -> None:
        self._inflight.discard(task)
        slot.release()
        if not task.cancelled() and task.exception() is None and task.result():
            # Its concurrency slots came free with the report that ended its
            # execution: runs held back by them may be claimable now. No NOTIFY
            # says so (a NOTIFY on every completion would serialize the commits).
            wake.set()

    def _code_ended(self, session: ClaimSession, wake: asyncio.Event,
                    run: ClaimedRun) -> asyncio.Future[bool]:
        """A run holding slots is done executing: the next claim gives them back (claims.py)."""
        assert self._stop is not None
        done = session.code_ended(run.run_id, run.lease_token)
        if self._stop.is_set():
            session.settle_ended()  # no claim follows: its completion gives them back
        else:
            wake.set()
        return done

    async def _execute(self, run: ClaimedRun, procedures: Procedures,
                       executor: ThreadPoolExecutor, slot: _Slot,
                       code_ended: Callable[[], Awaitable[bool]] | None) -> bool:
        """Run it; returns whether it gave concurrency slots back with its last report
        (a claim that gave them back when its code returned claimed what they free)."""
        assert self._loop is not None
        execution = RunExecution(run, self._by_key[(run.name, run.version)], procedures,
                                 self._reporter, self._loop, executor, self.retry, self._stopping.is_set,
                                 self._membership.request_reset, on_code_done=slot.release,
                                 instruments=self.instruments, transactional=self._transactional,
                                 give_back_slots=code_ended)
        try:
            await execution.execute()
        except Exception:
            logger.exception("run %s: unexpected error in the worker", run.run_id)
            self._membership.request_reset()
        return run.limited and not execution.slots_given_back

    async def _drain(self) -> None:
        if not self._inflight:
            return
        logger.info("draining %d run(s) in flight", len(self._inflight))
        _done, pending = await asyncio.wait(set(self._inflight), timeout=self.shutdown_timeout)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("%d run(s) still in flight after %ss; left for recovery",
                           len(pending), self.shutdown_timeout)


class _Slots:
    """The worker's ``concurrency`` places, each held while a run's code runs.

    A place is given back as soon as the workflow has returned and only its
    last report (the completion, batched with others) is left to send: a run
    waiting for that commit needs no thread, and another run can start meanwhile.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.busy = 0
        self.freed = asyncio.Event()  # set whenever a place is given back

    @property
    def free(self) -> int:
        return self.capacity - self.busy

    def take(self) -> _Slot:
        self.busy += 1
        return _Slot(self)


class _Slot:
    """One taken place; :meth:`release` gives it back (once, whoever calls it first)."""

    def __init__(self, slots: _Slots) -> None:
        self._slots: _Slots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.busy -= 1
            self._slots.freed.set()
            self._slots = None
