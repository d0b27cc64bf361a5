"""A retry policy means what it says: a stated interval is never silently shortened."""

from __future__ import annotations

from datetime import timedelta

import pytest

import pgflow
from pgflow.retry import DEFAULT_MAX_INTERVAL

DAY = timedelta(days=1)


def test_a_long_initial_interval_raises_the_default_cap():
    policy = pgflow.Retry(initial_interval=DAY, backoff=1.0)
    assert policy.max_interval == DAY
    assert pgflow.Retry(initial_interval=DAY).max_interval == DAY
    assert pgflow.Retry().max_interval == DEFAULT_MAX_INTERVAL == timedelta(seconds=60)
    assert pgflow.Retry(initial_interval=5).max_interval == timedelta(seconds=60)


def test_an_explicit_cap_below_the_initial_interval_is_refused():
    with pytest.raises(ValueError, match=r"max_interval .* is shorter than initial_interval"):
        pgflow.Retry(initial_interval=DAY, max_interval=timedelta(minutes=1))
    assert pgflow.Retry(initial_interval=DAY, max_interval=DAY).max_interval == DAY
    assert pgflow.Retry(initial_interval=1, max_interval=600).max_interval == timedelta(minutes=10)
