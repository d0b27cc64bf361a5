"""What ``pgflow.get`` returns: a run and its step timeline."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["FINAL_STATUSES", "Run", "StepRecord"]

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class StepRecord:
    """One durable call of a run, as recorded in ``pgflow.steps``."""

    seq: int
    name: str
    kind: str
    status: str
    attempts: int
    output: Any
    error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def duration_ms(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds() * 1000


@dataclass(frozen=True)
class Run:
    """A run, as recorded in ``pgflow.runs``, with its steps in call order."""

    id: uuid.UUID
    name: str
    version: str
    queue: str
    key: str | None
    status: str
    priority: int
    input: Any
    output: Any
    error: dict[str, Any] | None
    parent_id: uuid.UUID | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES
