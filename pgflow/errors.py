"""Exceptions raised by pgflow.

::

    PgflowError
    ├── SchemaNotMigrated      the pgflow schema is missing or older than this code
    ├── SchemaTooNew           a newer pgflow migrated the schema beyond what this code can run
    ├── WorkflowNotFound       no workflow of that name (and version)
    ├── RunNotFound            no run with that id
    ├── KeyConflict            idempotency key already used by another workflow
    ├── RunStateError          the run's status does not allow this (e.g. retry a running run)
    ├── EncodingError          a value cannot be stored as JSON (also a TypeError)
    │   └── PayloadTooLarge    a JSON payload is over the size limit (also a ValueError)
    ├── LeaseLost              the database rejected a report: the run moved on
    ├── NonDeterminismError    replayed code no longer matches the run's journal
    ├── StepFailed             a step exhausted its retries (raised inside the workflow)
    ├── StepTimeout            a step attempt overran its timeout (recorded as its error)
    ├── SignalTimeout          a signal did not arrive in time
    ├── WorkflowTimeout        the error type recorded for a run that outlived its timeout
    ├── WorkflowCancelled      a run ended cancelled (raised by result())
    └── WorkflowFailed         a run ended failed (raised by result())
        └── ChildFailed        a child run ended failed (raised inside the parent)
    BaseException
    └── Cancelled              the run is being cancelled (raised inside the workflow)

Everything ``result()`` raises is an ordinary ``Exception``; only
``Cancelled``, raised inside a workflow that is being cancelled, is a
``BaseException``, so that ``except Exception`` in workflow code does not
swallow it.

Errors raised by the SQL procedures carry SQLSTATEs of class ``PF`` and are
translated by :func:`from_database`.
"""

from __future__ import annotations

import uuid
from typing import Any

__all__ = [
    "Cancelled",
    "ChildFailed",
    "EncodingError",
    "KeyConflict",
    "LeaseLost",
    "NonDeterminismError",
    "PayloadTooLarge",
    "PgflowError",
    "RunNotFound",
    "RunStateError",
    "ScheduleNotFound",
    "SchemaNotMigrated",
    "SchemaTooNew",
    "SignalTimeout",
    "StepFailed",
    "StepTimeout",
    "WorkflowCancelled",
    "WorkflowFailed",
    "WorkflowNotFound",
    "WorkflowTimeout",
]


class PgflowError(Exception):
    """Base class of pgflow's exceptions."""


class SchemaNotMigrated(PgflowError):
    """The pgflow schema is missing or at another revision: run ``pgflow migrate``."""


class SchemaTooNew(PgflowError):
    """A newer pgflow migrated the schema past what this code can run: upgrade pgflow here.

    Newer revisions usually accept older workers; one that cannot says so
    (``pgflow.min_worker_revision()``), and ``pgflow migrate`` printed its note.
    """


class WorkflowNotFound(PgflowError, LookupError):
    """No workflow of that name (and version) is known."""


class RunNotFound(PgflowError, LookupError):
    """No run has that id."""


class ScheduleNotFound(PgflowError, LookupError):
    """No schedule has this id (``pgflow.create_schedule`` or ``pgflow.schedule`` make one)."""


class KeyConflict(PgflowError):
    """The idempotency key is already used by a run of another workflow."""


class RunStateError(PgflowError):
    """The run's status does not allow this operation."""


class EncodingError(PgflowError, TypeError):
    """A value cannot be encoded as JSON, or decoded back into its declared type."""


class PayloadTooLarge(EncodingError, ValueError):
    """A JSON payload is over the size limit (``pgflow.codec.MAX_PAYLOAD_BYTES``,
    SQL ``pgflow.max_payload_bytes()``); the message names it, its size and the limit.

    Inside a worker, a step result this large fails the step at once (no
    retry: it would be as large again) and a workflow result fails the run.
    """


class LeaseLost(PgflowError):
    """The database rejected a report because the run's lease has moved on.

    The run was recovered (this worker was presumed dead) and may be running
    elsewhere; whatever this worker was about to record is discarded.
    """


class NonDeterminismError(PgflowError):
    """Replayed workflow code asked for a different durable call than the journal holds."""


class StepFailed(PgflowError):
    """A step failed for good (non-retryable, or out of attempts)."""

    def __init__(self, step: str, error_type: str, message: str, attempts: int,
                 traceback: str | None = None) -> None:
        super().__init__(f"step {step!r} failed after {attempts} attempt(s): {error_type}: {message}")
        self.step = step
        self.error_type = error_type
        self.message = message
        self.attempts = attempts
        self.traceback = traceback


class StepTimeout(PgflowError, TimeoutError):
    """A step attempt ran longer than its ``timeout``; it counts as a failed attempt."""


class WorkflowTimeout(PgflowError, TimeoutError):
    """The error recorded (as its type name) for a run that outlived its ``timeout``.

    The scheduler fails such a run in the database, wherever it stood; waiting
    callers get :class:`WorkflowFailed` with ``error_type`` naming this class.
    """


class SignalTimeout(PgflowError, TimeoutError):
    """``ctx.wait_for_signal`` gave up waiting."""


class WorkflowFailed(PgflowError):
    """A run ended ``failed``; ``error`` is its recorded ``{type, message, traceback}``."""

    def __init__(self, run_id: uuid.UUID, error: dict[str, Any] | None) -> None:
        self.run_id = run_id
        self.error = error or {}
        self.error_type = str(self.error.get("type", "Error"))
        self.message = str(self.error.get("message", ""))
        super().__init__(f"run {run_id} failed: {self.error_type}: {self.message}")


class ChildFailed(WorkflowFailed):
    """A child run ended ``failed``."""


class Cancelled(BaseException):
    """The run is being cancelled: raised at its next durable point.

    A ``BaseException``, so ``except Exception`` in workflow code does not
    swallow it; ``finally`` blocks and sagas still run.
    """


class WorkflowCancelled(PgflowError):
    """A run ended ``cancelled`` (raised by ``pgflow.result``); ``except Exception`` catches it."""

    def __init__(self, run_id: uuid.UUID) -> None:
        super().__init__(f"run {run_id} was cancelled")
        self.run_id = run_id


_BY_SQLSTATE: dict[str, type[PgflowError]] = {
    "PF001": LeaseLost,
    "PF002": WorkflowNotFound,
    "PF005": KeyConflict,
    "PF006": RunStateError,
    "PF404": RunNotFound,
    "PF405": ScheduleNotFound,
}


# A missing schema, table or function of schema pgflow: the database was never
# migrated, or by an older pgflow (invalid_schema_name, undefined_table,
# undefined_function).
_MISSING_OBJECT = frozenset({"3F000", "42P01", "42883"})


def from_database(exc: BaseException) -> BaseException:
    """The pgflow exception for an error raised by a pgflow procedure, else ``exc``.

    Works for psycopg 3 errors (``sqlstate``) and psycopg2 ones (``pgcode``).
    """
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag is not None else None) or str(exc)
    if sqlstate in _MISSING_OBJECT and "pgflow" in message:
        return SchemaNotMigrated(f"the pgflow schema is missing or older than this pgflow "
                                 f"({message}): run `pgflow migrate` first")
    cls = _BY_SQLSTATE.get(sqlstate or "")
    if cls is None:
        return exc
    if cls is WorkflowNotFound and " is too large: " in message:
        return PayloadTooLarge(message)  # raised by pgflow._check_payload
    if cls is WorkflowNotFound and not message.startswith("unknown workflow"):
        # PF002 is also "bad argument" (empty name, bad input shape, negative delay).
        return ValueError(message)
    return cls(message)
