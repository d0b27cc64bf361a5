"""Worker logs: each record says which run, workflow, step and attempt it is about.

The worker sets the run it is executing (:func:`run_scope`) and the step it
is running (:func:`step_scope`) in a context variable; :class:`RunContextFilter`
copies them onto every record as ``run_id``, ``workflow``, ``step`` and
``attempt`` (None where they do not apply), so the application's own logging
inside a step carries them too. ``pgflow worker --log-format json`` prints
one JSON object a line (:class:`JsonFormatter`); the text format appends
``[run=... step=...]`` when there is a run.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

FIELDS = ("run_id", "workflow", "step", "attempt")

_current: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "pgflow_log_context", default=None)


@contextlib.contextmanager
def run_scope(run_id: Any, workflow: str) -> Iterator[None]:
    """Records made meanwhile (in this task or thread) are about this run."""
    token = _current.set({"run_id": str(run_id), "workflow": workflow})
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def step_scope(step: str, attempt: int) -> Iterator[None]:
    """... and about this step's attempt."""
    token = _current.set({**(_current.get() or {}), "step": step, "attempt": attempt})
    try:
        yield
    finally:
        _current.reset(token)


def current() -> dict[str, Any]:
    """The run context of the caller (empty outside a run): for threads the worker starts."""
    return dict(_current.get() or {})


def adopt(fields: dict[str, Any]) -> contextvars.Token[dict[str, Any] | None]:
    """Make ``fields`` (from :func:`current`) this thread's context; reset with :func:`leave`."""
    return _current.set(fields or None)


def leave(token: contextvars.Token[dict[str, Any] | None]) -> None:
    _current.reset(token)


class RunContextFilter(logging.Filter):
    """Sets ``run_id``, ``workflow``, ``step``, ``attempt`` on every record (None if unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _current.get() or {}
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields.get(name))
        return True


class TextFormatter(logging.Formatter):
    """The worker's text lines, with ``[run=… workflow=… step=… attempt=…]`` when in a run."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS
                           if getattr(record, name, None) is not None)
        return f"{line} [{context}]" if context else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the run
    context, and the exception's type, message and traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: int, log_format: str) -> None:
    """The worker's root logging: ``text`` or ``json`` lines on stderr, with the run context."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RunContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
