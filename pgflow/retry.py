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

__all__ = ["DEFAULT_MAX_INTERVAL", "DEFAULT_RETRY", "MAX_ATTEMPTS", "Retry"]

MAX_ATTEMPTS = 2**31 - 1  # attempts are counted in a 32-bit integer column
DEFAULT_MAX_INTERVAL = timedelta(seconds=60)


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a failing step is attempted again.

    Attempt ``n`` (from 1) that fails waits
    ``min(initial_interval * backoff ** (n - 1), max_interval)`` before attempt
    ``n + 1``, up to ``max_attempts`` attempts in all. An exception that is an
    instance of one of ``non_retryable`` fails the step at once.

    ``max_interval`` left out caps the waits at 60 seconds, or at
    ``initial_interval`` when that is longer: a stated interval is never
    shortened. A ``max_interval`` given shorter than ``initial_interval`` is
    a contradiction and raises ``ValueError``.
    """

    max_attempts: int = 3
    initial_interval: timedelta = timedelta(seconds=1)
    backoff: float = 2.0
    max_interval: timedelta = None  # type: ignore[assignment]  # see __post_init__
    non_retryable: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"max_attempts must be an int, not {self.max_attempts!r}")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be between 1 and {MAX_ATTEMPTS}, "
                             f"got {self.max_attempts}")
        object.__setattr__(self, "initial_interval",
                           as_timedelta(self.initial_interval, "initial_interval"))
        if self.max_interval is None:
            object.__setattr__(self, "max_interval", max(DEFAULT_MAX_INTERVAL, self.initial_interval))
        else:
            object.__setattr__(self, "max_interval", as_timedelta(self.max_interval, "max_interval"))
            if self.max_interval < self.initial_interval:
                raise ValueError(f"max_interval ({self.max_interval}) is shorter than "
                                 f"initial_interval ({self.initial_interval}): every wait would be "
                                 "cut to max_interval; raise max_interval or leave it out")
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
