"""The fault tests' invariant checker catches what it is meant to catch.

A run is completed for real, then the database or the effects log is bent
into the shape a bug would leave, and the checker must name it.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

import pgflow
from tests.support import invariants
from tests.support.workflows.simple import two_steps

JOURNAL = [("step", "first"), ("step", "second")]


@pytest.fixture
def done(conn, effects, inprocess_worker):
    inprocess_worker.start([two_steps])
    run_id = pgflow.start(conn, two_steps, 3)
    assert pgflow.result(conn, run_id, timeout=60) == 8
    inprocess_worker.stop_all()
    invariants.check(conn, expected_runs=1, journal=lambda _: JOURNAL)  # clean to begin with
    return run_id


def _effect(conn, run_id, step, pid, at=None):
    """One logged execution at ``at`` (default: now, after every checkpoint)."""
    conn.execute("insert into public.effects (run_id, step, pid, at)"
                 " values (%s, %s, %s, coalesce(%s, clock_timestamp()))",
                 (str(run_id), step, pid, at))


def test_an_extra_execution_needs_a_disturbed_process(conn, done):
    # An execution before the real one (which the checkpoint recorded), in another process.
    at = conn.execute("select min(at) from public.effects where step = 'first'").fetchone()[0] \
        - timedelta(milliseconds=5)
    _effect(conn, done, "first", 4242, at)
    with pytest.raises(AssertionError, match="extra executions in undisturbed pid"):
        invariants.check(conn)
    # The same execution in a process killed after it is the at-least-once rule at work...
    invariants.check(conn, disturbed=invariants.Disturbed(killed={4242: at}))
    # ...but not if that process had died before it.
    with pytest.raises(AssertionError, match="after that process was killed"):
        invariants.check(conn, disturbed=invariants.Disturbed(killed={4242: at - timedelta(2)}))


def test_no_body_begins_after_its_checkpoint_except_in_a_zombie(conn, done):
    _effect(conn, done, "second", os.getpid())
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    with pytest.raises(AssertionError, match="'second' began after its checkpoint committed"):
        invariants.check(conn, disturbed=invariants.Disturbed(killed={os.getpid(): later}))
    invariants.check(conn, disturbed=invariants.Disturbed(frozen={os.getpid()}))


def test_a_checkpoint_without_an_execution_and_an_execution_without_a_step(conn, done):
    conn.execute("delete from public.effects where step = 'first'")
    _effect(conn, done, "third", os.getpid())
    with pytest.raises(AssertionError) as failure:
        invariants.check(conn)
    assert "'first' is checkpointed but its body never ran" in str(failure.value)
    assert "step 'third' ran 1 time(s) but the completed run's journal does not hold it" \
        in str(failure.value)


def test_journal_shape_and_final_status(conn, done):
    with pytest.raises(AssertionError, match=r"journal .* expected"):
        invariants.check(conn, journal=lambda _: JOURNAL[:1])
    with pytest.raises(AssertionError, match="ended completed, expected failed"):
        invariants.check(conn, status="failed")
    with pytest.raises(AssertionError, match="1 runs exist, expected 2"):
        invariants.check(conn, expected_runs=2)


def test_timers_and_runs_nothing_will_move(conn, done):
    conn.execute("insert into pgflow.timers (run_id, kind, seq, due_at, created_at)"
                 " values (%s, 'sleep', 5, now(), now())", (done,))
    with pytest.raises(AssertionError, match=r"completed but keeps timer\(s\)"):
        invariants.check(conn)
    conn.execute("delete from pgflow.timers")

    conn.execute("update pgflow.runs set status = 'sleeping', finished_at = null where id = %s",
                 (done,))
    with pytest.raises(AssertionError, match="sleeping without a timer"):
        invariants.check(conn, status=None)

    conn.execute("update pgflow.runs set status = 'waiting' where id = %s", (done,))
    conn.execute("insert into pgflow.steps (run_id, seq, name, kind, status, started_at,"
                 " finished_at) values (%s, 2, 'go', 'signal', 'waiting', now(), now())", (done,))
    conn.execute("insert into pgflow.signals (run_id, name, sent_at) values (%s, 'go', now())",
                 (done,))
    with pytest.raises(AssertionError, match=r"waits for signal 'go' at 2 while .* sits in its "
                                             "mailbox"):
        invariants.check(conn, status=None)
