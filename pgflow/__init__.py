"""pgflow: durable workflows for Python, with PostgreSQL as the engine.

Declare workflows and steps with :func:`workflow` and :func:`step`, start
runs with :func:`start` inside your own transaction, and run them with
``pgflow worker`` (or :class:`Worker`). All state lives in schema ``pgflow``.

Where things are: :mod:`pgflow.context` is what a workflow sees (``ctx``), one
line a call over the replay engine :mod:`pgflow.replay` (journal positions,
cancellation, reports; a sleep is reported there and becomes a timer in SQL,
``pgflow.sleep``). :mod:`pgflow.steps` calls a live step (timeouts, threads)
and picks its retry policy; ``pgflow.fail_step`` in SQL decides whether and when
it runs again. :mod:`pgflow.journal` holds the journal's types,
:mod:`pgflow.validation` the argument checks, :mod:`pgflow.definitions` the
decorators. The worker: :mod:`pgflow.worker` (claims), :mod:`pgflow.runner`
(one run), :mod:`pgflow.reporter` and :mod:`pgflow.procedures` (the database
calls). The SQL engine: ``sql/README.md``. The import graph: ``pgflow/replay.py``.
"""

from pgflow import testing
from pgflow.client import cancel, get, get_state, result, retry, signal, start
from pgflow.context import Context
from pgflow.definitions import Step, Workflow, step, workflow
from pgflow.errors import (
    Cancelled,
    ChildFailed,
    EncodingError,
    KeyConflict,
    LeaseLost,
    NonDeterminismError,
    PayloadTooLarge,
    PgflowError,
    RunNotFound,
    RunStateError,
    ScheduleNotFound,
    SchemaNotMigrated,
    SchemaTooNew,
    SignalTimeout,
    StepFailed,
    StepTimeout,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowNotFound,
    WorkflowTimeout,
)
from pgflow.flow import Concurrency, RateLimit, pause_queue, resume_queue, set_queue
from pgflow.models import Run, StepRecord
from pgflow.retry import Retry
from pgflow.schedules import (
    backfill_schedule,
    create_schedule,
    delete_schedule,
    pause_schedule,
    resume_schedule,
    schedule,
    trigger_schedule,
)
from pgflow.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "ChildFailed",
    "Concurrency",
    "Context",
    "EncodingError",
    "KeyConflict",
    "LeaseLost",
    "NonDeterminismError",
    "PayloadTooLarge",
    "PgflowError",
    "RateLimit",
    "Retry",
    "Run",
    "RunNotFound",
    "RunStateError",
    "ScheduleNotFound",
    "SchemaNotMigrated",
    "SchemaTooNew",
    "SignalTimeout",
    "Step",
    "StepFailed",
    "StepRecord",
    "StepTimeout",
    "Worker",
    "Workflow",
    "WorkflowCancelled",
    "WorkflowFailed",
    "WorkflowNotFound",
    "WorkflowTimeout",
    "backfill_schedule",
    "cancel",
    "create_schedule",
    "delete_schedule",
    "get",
    "get_state",
    "pause_queue",
    "pause_schedule",
    "result",
    "resume_queue",
    "resume_schedule",
    "retry",
    "schedule",
    "set_queue",
    "signal",
    "start",
    "step",
    "testing",
    "trigger_schedule",
    "workflow",
]
