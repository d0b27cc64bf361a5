"""Transactional steps: the step's own writes and its checkpoint, one transaction.

``@pgflow.step(transactional=True)`` runs the step on a connection of the
worker's inside a transaction, then writes its checkpoint
(``pgflow.complete_step``) in that same transaction, then commits. Together
or not at all:

- the step raises: rolled back, then the failure is reported as any step's
  (retried by its policy), on another connection;
- the checkpoint is refused (the lease was lost: this worker froze and the
  run was recovered and moved on): rolled back with it, fenced by the lease
  token as every report is; a recovery cannot slip in between the check and
  the commit, since ``complete_step`` holds the run's lock until the commit;
- the worker dies before the commit: the server rolls back both; after it:
  both stand, and the replay finds the checkpoint.

So a step's effects in the same database happen exactly once. The price: the
checkpoint cannot ride in a group commit (``pgflow.reporter``); each such step
pays its own commit, and holds a connection for as long as it runs.

Connections come from pools of their own (sync for ``def`` steps, async for
``async def``), opened on first use and sized like the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from pgflow import codec, errors
from pgflow.steps import StepRaised, outside_workflow, outside_workflow_async

CHECKPOINT = "select pgflow.complete_step(%s, %s, %s, %s, 'step', %s, %s)"


@dataclass(frozen=True)
class Checkpoint:
    """Where the step's result goes: its run (under its lease) and journal position."""

    run_id: uuid.UUID
    token: int
    seq: int
    name: str


@dataclass(frozen=True)
class Committed:
    output: Any  # the result as stored (JSON)
    seconds: float
    cancel_requested: bool


class TransactionalSteps:
    """The worker's connections for transactional steps, and running one."""

    def __init__(self, dsn: str, max_size: int) -> None:
        self._dsn = dsn
        self._max_size = max_size
        self._lock = threading.Lock()
        self._sync: ConnectionPool[Any] | None = None
        self._async: AsyncConnectionPool[Any] | None = None

    def _sync_pool(self) -> ConnectionPool[Any]:
        with self._lock:
            if self._sync is None:
                self._sync = ConnectionPool(self._dsn, min_size=1, max_size=self._max_size,
                                            open=True, name="pgflow-transactional")
            return self._sync

    async def _async_pool(self) -> AsyncConnectionPool[Any]:
        if self._async is None:
            pool = AsyncConnectionPool(self._dsn, min_size=1, max_size=self._max_size,
                                       open=False, name="pgflow-transactional-async")
            await pool.open(wait=True)
            if self._async is None:
                self._async = pool
            else:
                await pool.close()
        return self._async

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
            at: Checkpoint) -> Committed:
        """Run a ``def`` step and commit its checkpoint with its writes (in this thread)."""
        with self._sync_pool().connection() as conn:
            with _fenced(), conn.transaction():
                started = time.monotonic()
                output = _step(lambda: outside_workflow(fn, (conn, *args), kwargs), at, started)
                seconds = time.monotonic() - started
                row = conn.execute(CHECKPOINT, _checkpoint_params(at, output, seconds),
                                   ).fetchone()
            return Committed(output, seconds, bool(row and row[0]))

    async def run_async(self, fn: Callable[..., Any], args: tuple[Any, ...],
                        kwargs: dict[str, Any], at: Checkpoint) -> Committed:
        """Run an ``async def`` step and commit its checkpoint with its writes."""
        pool = await self._async_pool()
        async with pool.connection() as conn:
            with _fenced():
                async with conn.transaction():
                    started = time.monotonic()
                    try:
                        result = await outside_workflow_async(fn, (conn, *args), kwargs)
                    except Exception as exc:
                        raise StepRaised(exc, time.monotonic() - started) from exc
                    output = _step(lambda: result, at, started)
                    seconds = time.monotonic() - started
                    cur = await conn.execute(CHECKPOINT, _checkpoint_params(at, output, seconds))
                    row = await cur.fetchone()
            return Committed(output, seconds, bool(row and row[0]))

    def close(self) -> None:
        with self._lock:
            pool, self._sync = self._sync, None
        if pool is not None:
            pool.close()

    async def aclose(self) -> None:
        pool, self._async = self._async, None
        if pool is not None:
            await pool.close()
        await asyncio.to_thread(self.close)


def _step(call: Callable[[], Any], at: Checkpoint, started: float) -> Any:
    """The step's result as JSON; its own failure (or its result's) as :class:`StepRaised`."""
    try:
        return codec.to_json(call(), f"the result of step {at.name!r}")
    except Exception as exc:
        raise StepRaised(exc, time.monotonic() - started) from exc


def _checkpoint_params(at: Checkpoint, output: Any, seconds: float) -> tuple[Any, ...]:
    return (at.run_id, at.token, at.seq, at.name, Jsonb(output), timedelta(seconds=seconds))


@contextlib.contextmanager
def _fenced() -> Iterator[None]:
    """Errors of the transaction itself: the engine's (a refused checkpoint: LeaseLost)
    translated; a step that left its transaction failed has failed itself."""
    try:
        yield
    except StepRaised:
        raise
    except psycopg.errors.InFailedSqlTransaction as exc:
        raise StepRaised(exc, 0.0) from exc  # the step swallowed an error of its own
    except psycopg.Error as exc:
        translated = errors.from_database(exc)
        if translated is not exc:
            raise translated from None
        raise
