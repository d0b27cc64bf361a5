"""Durations and retry policies: valid, or one clear error (properties, no database)."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgflow
from pgflow.durations import as_timedelta
from tests.support.strategies import durations, seconds


@given(value=st.one_of(seconds, durations, st.text(max_size=3), st.booleans()))
def test_a_duration_is_a_bounded_timedelta_or_one_clear_error(value):
    try:
        delta = as_timedelta(value, "the delay")
    except (ValueError, TypeError) as exc:
        assert "the delay" in str(exc)
        return
    assert timedelta(0) <= delta <= timedelta(days=36525)


@given(max_attempts=st.one_of(st.integers(), st.floats(), st.none()),
       initial=st.one_of(seconds, durations), backoff=st.one_of(st.floats(), st.integers()),
       maximum=st.one_of(seconds, durations))
def test_a_retry_policy_is_valid_or_one_clear_error(max_attempts, initial, backoff, maximum):
    try:
        policy = pgflow.Retry(max_attempts=max_attempts, initial_interval=initial,
                              backoff=backoff, max_interval=maximum)
    except (ValueError, TypeError) as exc:
        assert any(field in str(exc) for field in
                   ("max_attempts", "initial_interval", "backoff", "max_interval"))
        return
    assert 1 <= policy.max_attempts < 2**31
    assert math.isfinite(policy.backoff) and policy.backoff >= 1
    assert policy.initial_interval <= timedelta(days=36525)


def test_found_retry_policies_the_engine_cannot_run_are_refused():
    # was: accepted, then an integer overflow in pgflow.fail_step (max_attempts) or
    # a NaN back-off in SQL (backoff=inf) once a step failed
    with pytest.raises(ValueError, match="max_attempts"):
        pgflow.Retry(max_attempts=2**31)
    with pytest.raises(ValueError, match="backoff"):
        pgflow.Retry(backoff=float("inf"))
    with pytest.raises(ValueError, match="backoff"):
        pgflow.Retry(backoff=float("nan"))
