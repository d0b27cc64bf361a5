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
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from pgflow import procedures
from pgflow.procedures import ClaimedRun

READY_CHANNEL = "pgflow_ready"  # payload: the queue a run became ready in
TIMER_CHANNEL = "pgflow_timer"  # a timer or schedule became the earliest (scheduler.py)


class ClaimSession:
    """Claims runs of ``queues`` and waits for NOTIFYs about them, on one connection.

    :param on_timer: called for each ``pgflow_timer`` NOTIFY, and after every
        (re)connect, when some may have been missed (the scheduler's poke; None: a
        worker that takes no part in scheduling).
    """

    def __init__(self, dsn: str, queues: list[str], *,
                 on_timer: Callable[[], None] | None = None) -> None:
        self._dsn = dsn
        self._queues = sorted(set(queues))  # what the claim names, in one order
        self._listened = frozenset(queues)  # the payloads of pgflow_ready that wake it
        self._on_timer = on_timer or (lambda: None)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._polled = False  # a claim has been made since the connection was opened

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
        self._on_timer()
        return conn

    async def claim(self, worker_id: uuid.UUID, workflows: list[tuple[str, str]],
                    limit: int) -> list[ClaimedRun]:
        """Lease up to ``limit`` ready runs of the session's queues and ``workflows``."""
        conn = await self.connect()
        try:
            claimed = await procedures.claim_runs(conn, worker_id, self._queues, workflows,
                                                  limit)
        except psycopg.OperationalError:
            await self._drop()
            raise
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
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                await conn.close()

    async def close(self) -> None:
        await self._drop()


async def _first(*awaitables: Any, timeout: float | None = None) -> None:
    """Wait until the first of ``awaitables`` finishes (or ``timeout``); cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
