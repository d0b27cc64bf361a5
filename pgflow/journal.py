"""A run's journal as the worker holds it, and the errors it records.

:class:`JournalEntry` is one recorded durable call (an element of the journal
``pgflow.claim`` hands over); :class:`FailOutcome` is what ``pgflow.fail_step``
decided for a failed attempt. :func:`error_json` turns an exception into the
error the engine records; :func:`step_failed` and :func:`item_failed` turn a
recorded failure back into the :class:`~pgflow.errors.StepFailed` the
workflow sees.

Shared by the engine (:mod:`pgflow.replay`, :mod:`pgflow.steps`) and the
database layer (:mod:`pgflow.procedures`), and imports neither. The journal's
table and its statuses are defined in SQL (``pgflow.steps``, ``sql/README.md``).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from pgflow import errors

__all__ = ["FailOutcome", "JournalEntry", "error_json", "item_failed", "step_failed"]


@dataclass(frozen=True)
class JournalEntry:
    seq: int
    name: str
    kind: str
    status: str  # completed | failed | retrying
    attempts: int
    output: Any
    error: dict[str, Any] | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JournalEntry:
        return cls(seq=data["seq"], name=data["name"], kind=data["kind"], status=data["status"],
                   attempts=data["attempts"], output=data.get("output"), error=data.get("error"))


@dataclass(frozen=True)
class FailOutcome:
    outcome: str  # retry | failed
    attempts: int


def error_json(exc: BaseException) -> dict[str, Any]:
    """An exception as the ``{type, message, traceback}`` the engine records."""
    cls = type(exc)
    module = cls.__module__
    type_name = cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
    data: dict[str, Any] = {
        "type": _storable(type_name),
        "message": _storable(str(exc)),
        "traceback": _storable("".join(traceback.format_exception(cls, exc, exc.__traceback__))),
    }
    if isinstance(exc, errors.StepFailed):  # keep the step's own error for parents (ctx.map)
        data.update(step=exc.step, error_type=exc.error_type, error_message=exc.message,
                    attempts=exc.attempts)
    return data


def _storable(text: str) -> str:
    """``text`` as PostgreSQL can store it: no NUL, no lone surrogate.

    An error message is whatever the code raised; refusing it would leave the
    run unreportable (and retried forever), so it is mended instead.
    """
    return text.replace("\x00", "\\x00").encode("utf-8", "replace").decode("utf-8")


def step_failed(name: str, entry: JournalEntry) -> errors.StepFailed:
    """The error a recorded step failure raises in the workflow."""
    error = entry.error or {}
    return errors.StepFailed(name, str(error.get("type", "Error")), str(error.get("message", "")),
                             entry.attempts, error.get("traceback"))


def item_failed(step: str, index: int, item: dict[str, Any]) -> errors.StepFailed:
    """The error a failed (or cancelled) ``ctx.map`` item raises in the workflow."""
    error = item.get("error") or {}
    if item["status"] == "cancelled":
        error = {"error_type": "pgflow.errors.WorkflowCancelled", "message": "cancelled"}
    return errors.StepFailed(
        step, str(error.get("error_type") or error.get("type", "Error")),
        f"item {index}: {error.get('error_message') or error.get('message', '')}",
        int(error.get("attempts") or 1), error.get("traceback"))
