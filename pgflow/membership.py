"""A worker's long-lived connection: registration, liveness lock, heartbeat.

The connection that registers the worker also holds its session advisory
lock, so the lock lives exactly as long as this connection: a killed worker
loses it at once and any other worker's ``pgflow.recover()`` gives its runs
back within a tick. The same connection beats the heartbeat and runs
recovery, so a broken connection is noticed on the next tick and the worker
re-registers (under a new id) and claims again at once. (The worker LISTENs
on its claim session, claims.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg

from pgflow import procedures

logger = logging.getLogger("pgflow.worker")

RECONNECT_DELAY_MAX = 5.0  # seconds


class Membership:
    def __init__(self, dsn: str, queues: list[str], workflows: list[dict[str, Any]], *,
                 on_wake: Callable[[], None], heartbeat_interval: float,
                 stale_after: timedelta, guards_wakes: bool) -> None:
        self._dsn = dsn
        self._queues = queues
        self._workflows = workflows
        self._on_wake = on_wake  # registered (again): claim now
        self._heartbeat_interval = heartbeat_interval
        self._stale_after = stale_after
        self._guards_wakes = guards_wakes  # registered as a worker that guards its wake-ups
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.worker_id: uuid.UUID | None = None
        self.registered = asyncio.Event()
        self._reset_requested = False

    async def connect(self) -> None:
        """Connect and register under a fresh id."""
        conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        worker_id = uuid.uuid4()
        await procedures.register_worker(conn, worker_id, socket.gethostname(), os.getpid(),
                                         self._queues, self._workflows, self._guards_wakes)
        self._conn = conn
        self.worker_id = worker_id
        self.registered.set()
        logger.info("worker %s registered (queues %s)", worker_id, ", ".join(self._queues))
        self._on_wake()

    def request_reset(self) -> None:
        """Leave and re-register under a new id at the next tick.

        Used when a run could not be reported: dropping the old membership (and
        its lock) lets recovery hand that run to a healthy worker instead of
        leaving it leased to this live but out-of-touch one.
        """
        self._reset_requested = True

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: heartbeat, recover, reconnect."""
        delay = 0.1
        while not stop.is_set():
            try:
                if self._conn is None or self._conn.closed:
                    self.registered.clear()
                    await self.connect()
                    delay = 0.1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._heartbeat_interval)
                if not stop.is_set():
                    await self._tick()
            except psycopg.Error as exc:
                logger.warning("worker connection lost (%s); reconnecting in %.1fs",
                               str(exc).strip().splitlines()[0] if str(exc) else exc, delay)
                await self._discard()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)

    async def _tick(self) -> None:
        conn = self._conn
        assert conn is not None
        if self._reset_requested:
            self._reset_requested = False
            logger.warning("worker %s leaves and re-registers so its runs are recovered",
                           self.worker_id)
            await self._discard()
            return
        cur = await conn.execute("select pgflow.heartbeat(%s)", (self.worker_id,))
        row = await cur.fetchone()
        if not (row and row[0]):
            logger.warning("worker %s was declared dead (heartbeat too late); re-registering",
                           self.worker_id)
            await conn.execute("select pg_advisory_unlock_all()")
            await conn.close()
            self._conn = None
            return
        cur = await conn.execute("select pgflow.recover(%s)", (self._stale_after,))
        row = await cur.fetchone()
        if row and row[0]:
            logger.info("recovered %s run(s) from dead workers", row[0])

    async def _discard(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already broken
                await self._conn.close()
        self._conn = None
        self.registered.clear()

    async def close(self) -> None:
        """Unregister and drop the liveness lock (by closing the connection)."""
        conn = self._conn
        if conn is not None and not conn.closed and self.worker_id is not None:
            try:
                await procedures.unregister_worker(conn, self.worker_id)
            except psycopg.Error as exc:
                logger.warning("could not unregister worker %s: %s", self.worker_id, exc)
        await self._discard()
