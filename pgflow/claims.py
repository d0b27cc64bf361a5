"""The worker's claim session: one connection that LISTENs for work and claims it.

A ``pgflow_ready`` NOTIFY wakes the server process that delivers it. Claiming
on that same, just woken process, instead of on another connection's idle
one, takes a cold wake-up of a second server process out of every idle start
(W3, bench/README.md). It is also the one LISTEN connection of the worker
process: every listening connection pays a transaction for each NOTIFY in the
database, whatever the channel. ``pgflow_timer`` NOTIFYs arriving on it poke
the scheduler.

NOTIFY is only a hint. The session LISTENs before its first claim on every
new connection, so a run made ready while it was away is found by that
claim; and the worker's claim loop polls every ``poll_interval`` in any case.

A start NOTIFYs only when a worker may be waiting for it (schema revision
0012, ``pgflow._notify_ready``): PostgreSQL commits notifying transactions
one at a time, so producers on several connections would share no commit
flush. Before it waits for a NOTIFY the session *guards* its queues' wake-ups
(:meth:`ClaimSession.guard`: advisory locks in share mode, held by this
connection), and the claim loop claims once more; from then on a start
cannot take its lock and NOTIFYs. While the worker has work it gives them
back (:meth:`ClaimSession.unguard`) and starts skip the NOTIFY.

A run holding concurrency slots gives them back when its code returns
(schema revision 0014): :meth:`ClaimSession.code_ended` queues it for the
session's next claim, which gives its slots back before it claims, and the
run's completion is sent once that claim has ended, so the two never race for
the run's row. On an older schema the completion gives them back.

Claims commit asynchronously (they do not wait for their WAL flush). A claim
need not survive a database crash: a lost claim leaves the run pending,
exactly as if this worker had died before starting it, and the worker's next
report under the lost lease is refused (PF001). Whatever the run then records
commits synchronously and flushes the claim's WAL with its own. Every other
transaction of the worker keeps the server's setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from pgflow import procedures
from pgflow.procedures import ClaimedRun

logger = logging.getLogger("pgflow.worker")

READY_CHANNEL = "pgflow_ready"  # payload: the queue a run became ready in
TIMER_CHANNEL = "pgflow_timer"  # a timer or schedule became the earliest (scheduler.py)


class ClaimSession:
    """Claims runs of ``queues`` and waits for NOTIFYs about them, on one connection.

    :param on_timer: called for each ``pgflow_timer`` NOTIFY, and after every
        (re)connect, when some may have been missed (the scheduler's poke; None: a
        worker that takes no part in scheduling).
    :param guards_wakes: the schema has ``pgflow.guard_wakes`` (revision 0012):
        :meth:`guard` takes the locks; else it is a no-op that says guarded, and
        every start NOTIFYs.
    :param slots_at_code_end: the claim gives back the slots of runs whose code
        returned (revision 0014); else :meth:`code_ended` leaves that to completions.
    """

    def __init__(self, dsn: str, queues: list[str], *,
                 on_timer: Callable[[], None] | None = None,
                 guards_wakes: bool = True, slots_at_code_end: bool = True) -> None:
        self._dsn = dsn
        self._queues = sorted(set(queues))  # what the claim names, in one order
        self._listened = frozenset(queues)  # the payloads of pgflow_ready that wake it
        self._on_timer = on_timer or (lambda: None)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._polled = False  # a claim has been made since the connection was opened
        self._guards_wakes = guards_wakes
        self._guarded = False  # this connection holds every wake lock of the queues
        self._holds_guards = False  # ... or some of them (guard_wakes keeps what it took)
        self._guard_failed = False  # guard_wakes raised something else than a lost connection
        self._slots_at_code_end = slots_at_code_end
        # Runs whose code returned, for the next claim, each with what its completion awaits.
        self._ended: list[tuple[uuid.UUID, int, asyncio.Future[bool]]] = []

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        """The session's connection, opened (and LISTENing) if it is not."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        try:  # one round trip: a statement without parameters may hold several
            await conn.execute(f"set synchronous_commit = off; listen {READY_CHANNEL};"
                               f" listen {TIMER_CHANNEL}")
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._polled = False
        self._guarded = self._holds_guards = False
        self._on_timer()
        return conn

    @property
    def guarded(self) -> bool:
        """Starts of the session's queues NOTIFY it (see the module's docstring)."""
        return self._guarded or not self._guards_wakes

    async def guard(self) -> bool:
        """Make starts of the session's queues NOTIFY from now on; claim once more after.

        False while a transaction that made a run of these queues ready has not
        ended (the locks taken are kept, and starts on them NOTIFY already): poll
        shortly and call again.
        """
        if self.guarded:
            return True
        if self._conn is None or self._conn.closed:
            return False  # the next claim reconnects (and says why it could not)
        try:
            cur = await self._conn.execute("select pgflow.guard_wakes(%s)", (self._queues,))
            row = await cur.fetchone()
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            await self._lost("guard_wakes", exc)
            return False
        except psycopg.Error as exc:
            # Not the connection (a role without EXECUTE on it?): the claim loop
            # then polls (worker.GUARD_RETRY_MAX) instead of waiting; say so once.
            if not self._guard_failed:
                self._guard_failed = True
                logger.warning("cannot guard wake-ups (%s): polling instead",
                               str(exc).strip().splitlines()[0])
            return False
        self._holds_guards = True
        self._guarded = bool(row and row[0])
        return self._guarded

    async def unguard(self) -> None:
        """The worker has work: starts may skip the NOTIFY again."""
        if not self._holds_guards or self._conn is None:
            return
        try:
            await self._conn.execute("select pgflow.unguard_wakes()")
        except psycopg.Error as exc:
            await self._lost("unguard_wakes", exc)
            return
        self._guarded = self._holds_guards = False

    async def _lost(self, what: str, exc: psycopg.Error) -> None:
        # Closing the connection gives back whatever it held; the next claim
        # reconnects and says why, if it still cannot.
        logger.debug("%s failed (%s): reconnecting", what, str(exc).strip().splitlines()[0:1])
        await self._drop()

    def code_ended(self, run_id: uuid.UUID, token: int) -> asyncio.Future[bool]:
        """The code of a run holding slots returned: the next claim gives them back.

        The run sends its completion when the future is done: that claim has
        ended, or :meth:`settle_ended` said no claim will carry it. Its result
        says whether a claim that carried the run committed; if not, the
        completion gives the slots back. (A committed claim skips a run whose
        row another transaction holds, rarely: its completion gives them back
        too, and a worker that claimed nothing for them is woken by it,
        ``queue_settings.starved``.)
        """
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._slots_at_code_end:
            self._ended.append((run_id, token, done))
        else:
            done.set_result(False)
        return done

    def settle_ended(self) -> None:
        """No claim will carry the runs waiting for one: their completions give the slots back."""
        ended, self._ended = self._ended, []
        _settle(ended, carried=False)

    async def claim(self, worker_id: uuid.UUID, workflows: list[tuple[str, str]],
                    limit: int) -> list[ClaimedRun]:
        """Lease up to ``limit`` ready runs of the session's queues and ``workflows``,
        giving back the slots of the runs whose code ended first (:meth:`code_ended`)."""
        ended, self._ended = self._ended, []
        carried = False
        try:
            conn = await self.connect()
            try:
                claimed = await procedures.claim_runs(
                    conn, worker_id, self._queues, workflows, limit,
                    [(run_id, token) for run_id, token, _ in ended])
            except psycopg.OperationalError:
                await self._drop()
                raise
            carried = True
        finally:
            _settle(ended, carried=carried)
        self._polled = True
        return claimed

    async def wait(self, *events: asyncio.Event, timeout: float | None,
                   ready_wakes: bool = True) -> None:
        """Until one of ``events`` is set, ``timeout`` passes or (``ready_wakes``) a run
        of the session's queues is said to be ready. Timer NOTIFYs poke the scheduler
        meanwhile, so the claim loop waits here whatever it waits for.

        Returns at once on a connection no claim has been made on yet: what
        became ready before it LISTENed is only found by claiming.
        """
        if any(event.is_set() for event in events):
            return
        try:
            conn = await self.connect()
        except psycopg.Error:
            # The claim that follows says why, once; wait as a poll would.
            await _first(*(event.wait() for event in events), timeout=timeout)
            return
        if not self._polled and ready_wakes:
            return
        listening = asyncio.ensure_future(self._listen(conn, ready_wakes))
        await _first(listening, *(event.wait() for event in events), timeout=timeout)
        if listening.done() and not listening.cancelled() and listening.exception() is not None:
            await self._drop()  # the connection broke: the next claim reconnects

    async def _listen(self, conn: psycopg.AsyncConnection[Any], ready_wakes: bool) -> None:
        while True:
            # stop_after: leave after the first packet of notifications, all of
            # them seen (breaking out of the generator would drop the rest).
            ready = False
            async for notify in conn.notifies(stop_after=1):
                if notify.channel == TIMER_CHANNEL:
                    self._on_timer()
                elif notify.channel == READY_CHANNEL and notify.payload in self._listened:
                    ready = True
            if ready and ready_wakes:
                return

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._guarded = self._holds_guards = False
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                await conn.close()

    async def close(self) -> None:
        await self._drop()


def _settle(ended: list[tuple[uuid.UUID, int, asyncio.Future[bool]]], *, carried: bool) -> None:
    for _run_id, _token, done in ended:
        if not done.done():
            done.set_result(carried)


async def _first(*awaitables: Any, timeout: float | None = None) -> None:
    """Wait until the first of ``awaitables`` finishes (or ``timeout``); cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
