"""Which transitions to ready NOTIFY (revision 0012): only those a worker may wait for.

A worker about to wait for a NOTIFY guards its queues (``pgflow.guard_wakes``: every
wake stripe of each queue in share mode, on its claim connection) and claims once more;
``pgflow._notify_ready`` NOTIFYs when it cannot take its own stripe exclusively, when
its own session guards, or while an older worker (one that never guards) is registered.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgflow import schema
from tests.support import pgcluster
from tests.support.sqlkit import Conn, listener, received, start

STRIPES = 8  # a queue's wake stripes (sql/schema/03_guards.sql)


def wake_locks(conn: Conn, pid: int) -> list[tuple[str, bool]]:
    """(mode, granted) of the wake stripe locks backend ``pid`` holds or waits for."""
    return [(r[0], r[1]) for r in conn.execute(
        "select mode, granted from pg_locks where locktype = 'advisory' and classid = 7366506"
        " and pid = %s", (pid,))]


def register(conn: Conn, guards_wakes: bool | None) -> uuid.UUID:
    """A worker of this revision (``guards_wakes``) or, with None, of an older one."""
    worker_id = uuid.uuid4()
    args = (worker_id, ["default"], Jsonb([]))
    if guards_wakes is None:
        conn.execute("select pgflow.register_worker(%s, 'h', 1, %s, %s)", args)
    else:
        conn.execute("select pgflow.register_worker(%s, 'h', 1, %s, %s, %s)",
                     (*args, guards_wakes))
    return worker_id


@pytest.fixture
def producers(dsn: str) -> Iterator[list[Conn]]:
    """Three autocommit connections (three backends: mostly different stripes)."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
    try:
        yield conns
    finally:
        for c in conns:
            c.close()


def test_a_start_no_worker_waits_for_sends_no_notify(dsn, conn, producers):
    with listener(dsn) as listen:  # listening alone is not waiting: it does not guard
        for producer in producers:
            start(producer, queue="a")
        assert received(listen, conn, "pgflow_ready") == []
    assert conn.execute("select count(*) from pgflow.runs where status = 'pending'"
                        ).fetchone() == (3,)


def test_a_guarding_worker_is_sent_every_start_of_its_queues_and_no_other(dsn, conn, producers):
    with listener(dsn, guards=["a", "b"]) as listen:
        assert len(wake_locks(conn, listen.info.backend_pid)) == 2 * STRIPES
        assert set(wake_locks(conn, listen.info.backend_pid)) == {("ShareLock", True)}
        for producer in producers:
            start(producer, queue="a")
        start(producers[0], queue="b")
        start(producers[1], queue="c")
        assert received(listen, conn, "pgflow_ready") == ["a", "a", "a", "b"]


def test_guarding_twice_takes_each_lock_once_and_unguard_gives_all_back(dsn, conn, producers):
    with listener(dsn, guards=["a"]) as listen:
        pid = listen.info.backend_pid
        assert listen.execute("select pgflow.guard_wakes(array['a'])").fetchone() == (True,)
        assert len(wake_locks(conn, pid)) == STRIPES
        notices: list[str] = []
        listen.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        listen.execute("select pgflow.unguard_wakes()")
        listen.execute("select pgflow.unguard_wakes()")  # nothing held: silent
        assert wake_locks(conn, pid) == [] and notices == []

        start(producers[0], queue="a")
        assert received(listen, conn, "pgflow_ready") == [], "unguarded, yet notified"


def test_a_stripe_an_open_start_holds_is_left_for_the_next_guard(dsn, conn, producers):
    tx = psycopg.connect(dsn)
    with tx, listener(dsn) as listen:
        run_id = start(tx, queue="a")  # holds its stripe of "a" until it ends
        pid = listen.info.backend_pid
        assert listen.execute("select pgflow.guard_wakes(array['a'])").fetchone() == (False,)
        assert len(wake_locks(conn, pid)) == STRIPES - 1  # the others are kept
        tx.commit()  # no NOTIFY: no worker was guarding when it took the stripe

        assert listen.execute("select pgflow.guard_wakes(array['a'])").fetchone() == (True,)
        assert len(wake_locks(conn, pid)) == STRIPES  # the missing one, once
        # What a worker does next, claim once more, sees the run the start committed.
        assert listen.execute("select status from pgflow.runs where id = %s",
                              (run_id,)).fetchone() == ("pending",)
        start(producers[0], queue="a")
        assert received(listen, conn, "pgflow_ready") == ["a"]
        listen.execute("select pgflow.unguard_wakes()")
        assert wake_locks(conn, pid) == []


def test_a_guarding_session_notifies_what_it_makes_ready_itself(dsn, conn):
    with listener(dsn, guards=["a"]) as listen:
        start(listen, queue="a")  # its own shared lock would not refuse its stripe
        assert received(listen, conn, "pgflow_ready") == ["a"]


def test_while_an_older_worker_is_registered_every_start_notifies(dsn, conn, producers):
    with listener(dsn) as listen:
        old = register(conn, guards_wakes=None)
        assert conn.execute("select guards_wakes from pgflow.workers where id = %s",
                            (old,)).fetchone() == (False,)
        register(conn, guards_wakes=True)
        start(producers[0], queue="a")
        assert received(listen, conn, "pgflow_ready") == ["a"]

        conn.execute("select pgflow.unregister_worker(%s)", (old,))
        start(producers[0], queue="a")
        assert received(listen, conn, "pgflow_ready") == []


def test_a_transaction_starting_many_runs_notifies_each_queue_once(dsn, conn):
    with listener(dsn, guards=["a", "b"]) as listen, psycopg.connect(dsn) as tx:
        for queue in ("a", "b", "a", "a", "b"):
            start(tx, queue=queue)
        tx.commit()
        assert sorted(received(listen, conn, "pgflow_ready")) == ["a", "b"]


def test_guard_waits_for_a_start_that_ends_within_its_wait(dsn, conn):
    tx = psycopg.connect(dsn)
    with tx, listener(dsn) as listen:
        run_id = start(tx, queue="a")
        ending = threading.Timer(0.3, tx.commit)
        ending.start()
        assert listen.execute("select pgflow.guard_wakes(array['a'], interval '60 s')"
                              ).fetchone() == (True,)
        ending.join()
        assert listen.execute("select status from pgflow.runs where id = %s",
                              (run_id,)).fetchone() == ("pending",)
        start(tx, queue="a")  # the same connection, the same stripe: now refused
        tx.commit()
        assert received(listen, conn, "pgflow_ready") == ["a"]
        assert listen.execute("show lock_timeout").fetchone() == ("0",)  # put back


@pytest.mark.slow
def test_a_guard_the_lock_table_cannot_hold_fails_and_keeps_only_what_it_held():
    """Session locks outlive the error that stops a guard half-way (out of shared memory):
    it gives back what that call took, so its setting still names every lock held."""
    options = pgcluster.SERVER_OPTIONS.replace("max_connections=100", "max_connections=10")
    try:
        cluster_cm = pgcluster.private_cluster(options + " -c max_locks_per_transaction=10")
        cluster = cluster_cm.__enter__()
    except pgcluster.Unavailable as exc:
        pytest.skip(f"no private PostgreSQL cluster possible: {exc}")
    try:
        schema.migrate(cluster.dsn)
        with psycopg.connect(cluster.dsn, autocommit=True) as worker, \
                psycopg.connect(cluster.dsn, autocommit=True) as watcher:
            pid = worker.info.backend_pid
            assert worker.execute("select pgflow.guard_wakes(array['a'])").fetchone() == (True,)
            many = [f"queue-{i}" for i in range(4000)]  # 32,000 locks
            with pytest.raises(psycopg.errors.OutOfMemory):
                worker.execute("select pgflow.guard_wakes(%s)", (many,))
            assert len(wake_locks(watcher, pid)) == STRIPES
            assert len(worker.execute("show pgflow.wake_guards").fetchone()[0].split(",")
                       ) == STRIPES
            worker.execute("select pgflow.unguard_wakes()")
            assert wake_locks(watcher, pid) == []
    finally:
        cluster_cm.__exit__(None, None, None)
