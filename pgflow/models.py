"""What ``pgflow.get`` returns: a run and its step timeline."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["FINAL_STATUSES", "OPEN_STEP_STATUSES", "Run", "StepRecord"]

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
# A journal entry in one of these holds its deadline, not its end, in finished_at.
OPEN_STEP_STATUSES = frozenset({"waiting", "sleeping", "retrying"})


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
    def open(self) -> bool:
        """Still waiting (a signal, child, sleep or retry back-off): not ended yet."""
        return self.status in OPEN_STEP_STATUSES

    @property
    def duration_ms(self) -> float | None:
        """How long the entry took; ``None`` while it is open (its end is not known)."""
        if self.open or self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds() * 1000

    @property
    def waits_until(self) -> datetime | None:
        """The deadline of an open entry (its timeout, wake-up or next attempt), if it has one.

        An open entry's ``finished_at`` holds that deadline; one that waits
        without a deadline holds its own start there.
        """
        if not self.open or self.finished_at is None or self.finished_at == self.started_at:
            return None
        return self.finished_at


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
