"""A transaction that locks a pending run's row wakes its queue again (revision 0013).

Claims skip locked rows (``FOR UPDATE SKIP LOCKED``). A transaction that locks a pending
run without taking it out of 'pending' hides it from every claim made meanwhile, so the
idle worker woken for the run finds nothing and waits. ``pgflow.watch`` (what
``result()`` calls right after a start), ``pgflow.cancel`` of a pending run that ran
before, and a child finishing under a pending parent each NOTIFY the run's queue, so that
their commit wakes the worker once more. Each test below shows the skipped claim first.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.support.sqlkit import Conn, listener, received, start

QUEUE = "default"


class IdleWorker:
    """A worker of this revision, guarding its queue's wake-ups as one about to wait does.

    It LISTENs and guards on ``listen``; it claims on ``claims`` (another backend: a
    session's own guard would make every NOTIFY of that session go out regardless).
    """

    def __init__(self, dsn: str) -> None:
        self.id = uuid.uuid4()
        self.claims: Conn = psycopg.connect(dsn, autocommit=True)
        self.claims.execute(
            "select pgflow.register_worker(%s, 'host', 1, %s, %s, true)",
            (self.id, [QUEUE], Jsonb([{"name": "wf", "version": "1", "queue": QUEUE},
                                      {"name": "child", "version": "1", "queue": QUEUE}])))
        self.listen: Conn = listener(dsn, guards=[QUEUE])

    def claim(self, name: str = "wf") -> list[tuple[uuid.UUID, int]]:
        """(run id, lease token) of the runs of ``name`` a claim takes now."""
        return [(r[0], r[1]) for r in self.claims.execute(
            "select run_id, lease_token from pgflow.claim_runs(%s, %s, %s, %s, 10)",
            (self.id, [QUEUE], [name], ["1"]))]

    def woken(self, conn: Conn) -> list[str]:
        """The pgflow_ready payloads committed since the last call."""
        return received(self.listen, conn, "pgflow_ready")

    def close(self) -> None:
        self.listen.close()
        self.claims.close()


@pytest.fixture
def idle(dsn: str, conn: Conn) -> Iterator[IdleWorker]:
    worker = IdleWorker(dsn)
    try:
        yield worker
    finally:
        worker.close()


@pytest.fixture
def other(dsn: str) -> Iterator[Conn]:
    """A client's connection whose transactions hold rows locked while the worker claims."""
    with psycopg.connect(dsn) as c:
        yield c


def test_watch_of_a_pending_run_wakes_the_worker_whose_claim_skipped_it(idle, conn, other):
    run_id = start(conn)
    assert idle.woken(conn) == [QUEUE]  # the start's NOTIFY, to a guarding worker
    with other.transaction():
        other.execute("select pgflow.watch(%s)", (run_id,))
        assert idle.claim() == []  # its row is locked: the claim woken for it skips it
        assert idle.woken(conn) == []
    assert idle.woken(conn) == [QUEUE]  # the watch's commit wakes it again
    assert [r for r, _ in idle.claim()] == [run_id]


def test_watch_of_a_running_or_watched_run_wakes_nobody(idle, conn, other):
    pending, running = start(conn), start(conn)
    other.execute("select pgflow.watch(%s)", (pending,))
    other.commit()
    assert idle.woken(conn) == [QUEUE, QUEUE, QUEUE]  # two starts, one watch
    other.execute("select pgflow.watch(%s)", (pending,))  # watched already: no update
    other.commit()
    claimed = dict(idle.claim())
    assert set(claimed) == {pending, running}
    other.execute("select pgflow.watch(%s)", (running,))  # running: claims do not want it
    other.commit()
    assert idle.woken(conn) == []


def test_cancel_of_a_pending_run_that_ran_before_wakes_the_worker_whose_claim_skipped_it(
        idle, conn, other):
    run_id = start(conn)
    [(_, token)] = idle.claim()
    idle.claims.execute("select pgflow.complete_step(%s, %s, 0, 's', 'step', 'null', %s)",
                        (run_id, token, "1 ms"))
    idle.claims.execute("select pgflow.release_run(%s, %s)", (run_id, token))  # pending again
    idle.woken(conn)
    with other.transaction():
        assert other.execute("select pgflow.cancel(%s)", (run_id,)).fetchone() == (True,)
        assert idle.claim() == []
    assert idle.woken(conn) == [QUEUE]
    assert [r for r, _ in idle.claim()] == [run_id]  # to raise Cancelled in its code
    assert conn.execute("select cancel_requested from pgflow.runs where id = %s",
                        (run_id,)).fetchone() == (True,)


def test_a_child_finishing_under_its_pending_parent_wakes_the_parents_queue(idle, conn, other):
    parent = start(conn)
    [(_, token)] = idle.claim()
    child = idle.claims.execute(
        "select pgflow.start_child(%s, %s, 0, 'child', '[]', null, %s, '1', null)",
        (parent, token, QUEUE)).fetchone()[0]
    idle.claims.execute("select pgflow.release_run(%s, %s)", (parent, token))  # pending again
    [(_, child_token)] = idle.claim("child")
    idle.woken(conn)
    other.execute("select pgflow.complete_run(%s, %s, '\"done\"')", (child, child_token))
    assert idle.claim() == []  # the child's transaction holds the parent's row
    assert idle.woken(conn) == []
    other.commit()
    assert idle.woken(conn) == [QUEUE]
    assert [r for r, _ in idle.claim()] == [parent]
