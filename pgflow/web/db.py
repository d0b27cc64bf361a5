"""The dashboard's connections: one ``psycopg_pool.ConnectionPool``, used from a thread pool.

The pages call the same synchronous functions as the CLI (``pgflow.client``,
``pgflow.flow``, ``pgflow.schedules``), so each request borrows a connection
in a worker thread (``run_in_threadpool``) and the event loop never blocks.
The pool opens on the application's startup (lifespan) or, in a host
application that does not run mounted apps' lifespans, on the first request;
it closes on shutdown. Each borrowed connection is one transaction, committed
when the call returns and rolled back if it raises. In read-only mode every
transaction is READ ONLY as well: the database refuses a write even if a bug
attempted one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.concurrency import run_in_threadpool

__all__ = ["Database", "Unavailable"]

T = TypeVar("T")

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4  # connections; pages are short reads
WAIT_FOR_CONNECTION = 10.0  # seconds a request waits for a pooled connection
STATEMENT_TIMEOUT = "15s"  # no page may hold the database longer than this


class Unavailable(psycopg.OperationalError):
    """No connection could be had; the message says why (the server's own error if known)."""


class Database:
    def __init__(self, dsn: str, *, read_only: bool) -> None:
        self.dsn = dsn
        self.read_only = read_only
        self.wait = WAIT_FOR_CONNECTION
        self.pool = ConnectionPool(
            dsn, min_size=POOL_MIN_SIZE, max_size=POOL_MAX_SIZE, open=False,
            configure=self._configure, name="pgflow-web",
            kwargs={"application_name": "pgflow ui"}, timeout=WAIT_FOR_CONNECTION)
        self._lock = threading.Lock()
        self._opened = False

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = True
        conn.execute(f"set statement_timeout = '{STATEMENT_TIMEOUT}'")
        conn.autocommit = False
        conn.read_only = self.read_only

    def open(self) -> None:
        with self._lock:
            if not self._opened:
                self.pool.open(wait=False)
                self._opened = True

    def close(self) -> None:
        with self._lock:
            if self._opened:
                self.pool.close()
                self._opened = False

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in one transaction on a pooled connection (blocking)."""
        self.open()
        try:
            with self.pool.connection(timeout=self.wait) as conn:
                return fn(conn, *args)
        except PoolTimeout:
            raise Unavailable(self._why_unavailable()) from None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`call` in a worker thread."""
        return await run_in_threadpool(self.call, fn, *args)

    def _why_unavailable(self) -> str:
        try:
            psycopg.connect(self.dsn, connect_timeout=5).close()
        except psycopg.Error as exc:
            return f"cannot connect to the database: {' '.join(str(exc).split())}"
        return "no database connection was free in time: the server is busy, try again"
