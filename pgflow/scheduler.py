"""The scheduler: one leader per database wakes runs whose timers are due and fires schedules.

Every worker process runs a :class:`Scheduler`; the one that holds the session
advisory lock ``(7366504, 1)`` on its own connection is the leader, the others
try again every ``LEADERSHIP_RETRY`` seconds. A killed leader's connection
closes, its lock vanishes and another process leads within that interval.

The leader sleeps until the earliest timer, schedule tick or rate-limited
queue's next free slot (``pgflow.next_wake_in()``), fires due timers in
batches (``pgflow.fire_timers``, which NOTIFYs the queues of the runs it
wakes) and due schedules (:mod:`pgflow.ticker`), wakes the workers of
rate-limited queues (``pgflow.wake_queues()``, :mod:`pgflow.flow`), and is
woken early by
:meth:`Scheduler.poke` when a ``pgflow_timer`` NOTIFY says a new timer
became the earliest, a schedule was created or resumed, a scheduled run
with buffered ticks finished, a claim found a queue's rate spent, or the
test clock moved. That NOTIFY arrives
on the worker's one LISTEN connection (its claim session, claims.py), not
on the scheduler's own. The leader never scans sleeping runs or schedules that are
not due: the timers and schedules indexes are read in due order only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import psycopg

from pgflow import ticker

logger = logging.getLogger("pgflow.scheduler")

LEADER_LOCK = (7366504, 1)
FIRE_BATCH = 1000  # timers fired in one transaction
LEADERSHIP_RETRY = 1.0  # seconds between a follower's attempts to lead
MAX_SLEEP = 5.0  # seconds the leader sleeps at most, even with no timer due
BUSY_DELAY = 0.01  # seconds before retrying timers whose runs were locked
RECONNECT_DELAY_MAX = 5.0  # seconds


class Scheduler:
    """:param on_fired: called when the leader woke runs (this process's claim loop
    can take them at once, without waiting for its own NOTIFY to come back)."""

    def __init__(self, dsn: str, on_fired: Callable[[], None] | None = None) -> None:
        self._dsn = dsn
        self.is_leader = False
        self._poked = asyncio.Event()
        self.on_fired = on_fired or (lambda: None)

    def poke(self) -> None:
        """A timer was added or the clock moved: recompute the next wake-up now."""
        self._poked.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: follow, or lead once the lock is ours; reconnect on errors."""
        delay = 0.1
        while not stop.is_set():
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, application_name=f"pgflow-scheduler:{os.getpid()}")
                delay = 0.1
                while not stop.is_set():
                    if await self._try_lead(conn):
                        await self._lead(conn, stop)
                    else:
                        await _wait(stop, LEADERSHIP_RETRY)
            except psycopg.Error as exc:
                logger.warning("scheduler connection lost (%s); retrying in %.1fs",
                               " ".join(str(exc).split())[:200], delay)
                await _wait(stop, delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)
            except Exception:
                # A bug must not end timers and schedules for this process: say it
                # loudly, let go of the leadership, and try again.
                logger.exception("scheduler failed; retrying in %.1fs", delay)
                await _wait(stop, delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)
            finally:
                self.is_leader = False
                if conn is not None:
                    await conn.close()  # releases the leader lock

    async def _try_lead(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        cur = await conn.execute("select pg_try_advisory_lock(%s, %s)", LEADER_LOCK)
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _lead(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        self.is_leader = True
        logger.info("this process now fires timers and schedules")
        while not stop.is_set():
            self._poked.clear()  # before reading the timers: a poke after this counts
            cur = await conn.execute("select pgflow.fire_timers(%s)", (FIRE_BATCH,))
            row = await cur.fetchone()
            fired = int(row[0]) if row else 0
            started = await ticker.fire_due_async(conn)
            cur = await conn.execute("select pgflow.wake_queues()")  # rate limits (flow.py)
            row = await cur.fetchone()
            woken = int(row[0]) if row else 0
            if fired or started or woken:
                self.on_fired()
            if fired >= FIRE_BATCH:
                continue  # more are due: no sleeping
            cur = await conn.execute("select pgflow.next_wake_in()")
            row = await cur.fetchone()
            next_in = row[0] if row else None
            if next_in is None:
                wait = MAX_SLEEP
            elif next_in <= 0:
                wait = BUSY_DELAY if fired == 0 else 0.0  # due but locked: try again shortly
            else:
                wait = min(float(next_in), MAX_SLEEP)
            if wait > 0:
                await self._sleep(wait)

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if poked. The worker cancels this task to stop it."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._poked.wait(), seconds)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
