"""Unit tier: the pure parts (codec, retry policy, durations, replay decisions, the public
surface, the import graph), with no database at all.

Any attempt to connect fails the test, so a test that needs PostgreSQL belongs
in another tier.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest


@pytest.fixture(autouse=True)
def no_database(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a unit test connected to a database: move it to another tier")

    monkeypatch.setattr(psycopg.Connection, "connect", refuse)
    monkeypatch.setattr(psycopg.AsyncConnection, "connect", refuse)
