"""Process tier: the real ``pgflow`` command and worker processes.

Crashes, races and chaos are real: ``kill -9``, ``SIGSTOP``, SIGTERM drains,
PostgreSQL restarts (``tests/support/pgcluster.py``), a wheel installed in a
fresh venv. Most tests here are marked ``slow``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest


@pytest.fixture
def report(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str],
           record_property: Callable[[str, object], None]) -> Callable[..., None]:
    """Print a scenario's figures to the terminal even under capture, and into junit XML.

    Each line starts with the test module's ``REPORT_LABEL`` (else its name).
    """
    label = getattr(request.module, "REPORT_LABEL", request.module.__name__.rsplit(".", 1)[-1])

    def say(scenario: str, **figures: object) -> None:
        line = f"[{label}] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
        for key, value in figures.items():
            record_property(key, value)
        with capsys.disabled():
            sys.stdout.write(f"\n{line}\n")
            sys.stdout.flush()
    return say
