"""Retry policies for steps.

The policy travels with each failure report to ``pgflow.fail_step``, which
decides in SQL whether another attempt is due and when: back-off waits are
database timestamps, never a sleeping thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta

from pgflow.durations import as_timedelta

__all__ = ["DEFAULT_RETRY", "MAX_ATTEMPTS", "Retry"]

MAX_ATTEMPTS = 2**31 - 1  # attempts are counted in a 32-bit integer column


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a failing step is attempted again.

    Attempt ``n`` (from 1) that fails waits
    ``min(initial_interval * backoff ** (n - 1), max_interval)`` before attempt
    ``n + 1``, up to ``max_attempts`` attempts in all. An exception that is an
    instance of one of ``non_retryable`` fails the step at once.
    """

    max_attempts: int = 3
    initial_interval: timedelta = timedelta(seconds=1)
    backoff: float = 2.0
    max_interval: timedelta = timedelta(seconds=60)
    non_retryable: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"max_attempts must be an int, not {self.max_attempts!r}")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be between 1 and {MAX_ATTEMPTS}, "
                             f"got {self.max_attempts}")
        object.__setattr__(self, "initial_interval",
                           as_timedelta(self.initial_interval, "initial_interval"))
        object.__setattr__(self, "max_interval", as_timedelta(self.max_interval, "max_interval"))
        if isinstance(self.backoff, bool) or not isinstance(self.backoff, (int, float)):
            raise TypeError(f"backoff must be a number, not {self.backoff!r}")
        if not (self.backoff >= 1.0 and math.isfinite(self.backoff)):  # NaN fails both
            raise ValueError(f"backoff must be a finite number of at least 1.0, got {self.backoff}")
        classes = tuple(self.non_retryable)
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise TypeError(f"non_retryable must hold exception classes, not {cls!r}")
        object.__setattr__(self, "non_retryable", classes)

    def is_retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, self.non_retryable)


DEFAULT_RETRY = Retry()
