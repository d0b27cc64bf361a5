"""Starting runs inside the application's transaction, and reading them back."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import psycopg
import pytest

import pgflow
from pgflow import aio, queries
from tests.support.helpers import wait_for, wait_status


@pgflow.step
def greet(name: str) -> str:
    return f"hello {name}"


@pgflow.workflow(name="client_greeting")
def greeting(ctx: pgflow.Context, name: str) -> str:
    return greet(name)


@pgflow.step
def explode(reason: str) -> None:
    raise RuntimeError(reason)


@pgflow.workflow(name="client_explodes", retry=pgflow.Retry(max_attempts=1))
def explodes(ctx: pgflow.Context, reason: str) -> None:
    explode(reason)


def _orders_table(conn: psycopg.Connection) -> None:
    conn.execute("create table public.orders (id text primary key)")


def _runs(conn: psycopg.Connection) -> int:
    return conn.execute("select count(*) from pgflow.runs").fetchone()[0]


def test_run_started_in_a_rolled_back_transaction_never_exists(dsn, conn, inprocess_worker):
    _orders_table(conn)
    with psycopg.connect(dsn) as app:
        app.execute("insert into public.orders values ('o-1')")
        run_id = pgflow.start(app, greeting, "ana")
        app.rollback()
    inprocess_worker.start([greeting])
    # A run committed after it is done: the worker has looked at the queue since.
    assert pgflow.result(conn, pgflow.start(conn, greeting, "after"), timeout=60) == "hello after"
    assert _runs(conn) == 1  # that one only
    assert conn.execute("select count(*) from public.orders").fetchone()[0] == 0
    with pytest.raises(pgflow.RunNotFound):
        pgflow.get(conn, run_id)


def test_run_committed_with_a_business_row_runs(dsn, conn, inprocess_worker):
    _orders_table(conn)
    inprocess_worker.start([greeting])
    with psycopg.connect(dsn) as app:
        app.execute("insert into public.orders values ('o-2')")
        run_id = pgflow.start(app, greeting, "bo")
        # not visible, let alone running, before the commit
        assert _runs(conn) == 0
        app.commit()
        assert pgflow.result(app, run_id, timeout=60) == "hello bo"
    assert conn.execute("select count(*) from public.orders").fetchone()[0] == 1


def test_same_key_twice_is_one_run(conn):
    first = pgflow.start(conn, greeting, "cy", key="greet:cy")
    second = pgflow.start(conn, greeting, "cy", key="greet:cy")
    assert first == second
    assert _runs(conn) == 1


def test_concurrent_starts_with_one_key_make_one_run(dsn, conn):
    ids: list[uuid.UUID] = []
    barrier = threading.Barrier(4)

    def start_one() -> None:
        with psycopg.connect(dsn) as app:
            barrier.wait()
            ids.append(pgflow.start(app, greeting, "di", key="greet:di"))
            app.commit()

    threads = [threading.Thread(target=start_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert _runs(conn) == 1


def test_key_used_by_another_workflow_is_an_error(conn):
    pgflow.start(conn, greeting, "ed", key="shared-key")
    with pytest.raises(pgflow.KeyConflict, match="shared-key"):
        pgflow.start(conn, explodes, "x", key="shared-key")


def test_start_through_a_cursor_and_sqlalchemy(dsn, conn):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    with psycopg.connect(dsn) as app, app.cursor() as cur:
        pgflow.start(cur, greeting, "via-cursor")
        app.commit()
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    with engine.connect() as sa_conn:
        pgflow.start(sa_conn, greeting, "via-sa-connection")
        sa_conn.rollback()
    with engine.begin() as sa_conn:
        pgflow.start(sa_conn, greeting, "via-sa-begin")
    with Session(engine) as session:
        pgflow.start(session, greeting, "via-session")
        session.commit()
    engine.dispose()
    names = {row[0][0] for row in conn.execute("select input from pgflow.runs")}
    assert names == {"via-cursor", "via-sa-begin", "via-session"}


def test_start_by_name_needs_no_code(conn):
    conn.execute(
        "select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['q1'],"
        " '[{\"name\": \"remote_flow\", \"version\": \"7\", \"queue\": \"q1\"}]')")
    run_id = pgflow.start(conn, "remote_flow", order="o-9")
    run = pgflow.get(conn, run_id)
    assert (run.name, run.version, run.queue, run.input) == ("remote_flow", "7", "q1",
                                                            {"order": "o-9"})
    with pytest.raises(pgflow.WorkflowNotFound, match="nobody_knows"):
        pgflow.start(conn, "nobody_knows")
    with pytest.raises(TypeError, match="positional or keyword"):
        pgflow.start(conn, "remote_flow", 1, order="o-9")


def test_bad_inputs_are_rejected_before_anything_is_written(conn):
    with pytest.raises(pgflow.EncodingError, match="cannot be encoded"):
        pgflow.start(conn, greeting, object())
    with pytest.raises(TypeError, match="missing a required argument"):
        pgflow.start(conn, greeting)
    with pytest.raises(pgflow.EncodingError):
        pgflow.start(conn, greeting, float("nan"))
    with pytest.raises(ValueError, match="delay"):
        pgflow.start(conn, greeting, "x", delay=-1)
    with pytest.raises(TypeError, match="workflow must be"):
        pgflow.start(conn, 42)
    assert _runs(conn) == 0


def test_result_raises_for_failed_runs_and_times_out(dsn, conn, inprocess_worker):
    inprocess_worker.start([greeting, explodes])
    run_id = pgflow.start(conn, explodes, "boom")
    with pytest.raises(pgflow.WorkflowFailed) as info:
        pgflow.result(conn, run_id, timeout=60)
    assert "RuntimeError" in str(info.value) and "boom" in str(info.value)
    assert info.value.run_id == run_id
    run = pgflow.get(conn, run_id)
    assert run.error["type"].endswith("StepFailed")
    assert run.steps[0].error["type"] == "RuntimeError"
    assert "Traceback" in run.steps[0].error["traceback"]

    never = pgflow.start(conn, greeting, "later", delay=3600)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        pgflow.result(conn, never, timeout=0.5)
    # it waited its timeout, then gave up (long before the run's hour: a hang, not a speed)
    assert 0.5 <= time.monotonic() - started < 60
    with pytest.raises(pgflow.RunNotFound):
        pgflow.result(conn, uuid.uuid4(), timeout=1)


def test_result_inside_an_open_transaction_is_refused(dsn):
    with psycopg.connect(dsn) as app:
        run_id = pgflow.start(app, greeting, "tx")
        with pytest.raises(pgflow.PgflowError, match="outside a transaction"):
            pgflow.result(app, run_id, timeout=1)


def test_result_wakes_on_notify_not_polling(dsn, conn, inprocess_worker, monkeypatch):
    # No re-check within the test's time: only the NOTIFY can wake result().
    monkeypatch.setattr("pgflow.client.RECHECK_INTERVAL", 3600.0)
    run_id = pgflow.start(conn, greeting, "quick")
    waiter = conn.info.backend_pid

    def start_worker_once_result_waits() -> None:
        # result() has read the run unfinished (its last statement) and sits idle on LISTEN.
        with psycopg.connect(dsn, autocommit=True) as watch:
            wait_for(lambda: watch.execute(
                "select 1 from pg_stat_activity where pid = %s and state = 'idle'"
                " and starts_with(query, %s)", (waiter, queries.RUN_STATUS.split("%s")[0])
            ).fetchone(), timeout=60, what="result() waiting")
        inprocess_worker.start([greeting])

    starter = threading.Thread(target=start_worker_once_result_waits, daemon=True)
    starter.start()
    try:
        assert pgflow.result(conn, run_id, timeout=60) == "hello quick"
    finally:
        starter.join(60)


def test_async_client(dsn, inprocess_worker):
    inprocess_worker.start([greeting])

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            run_id = await aio.start(aconn, greeting, "async")
            await aconn.rollback()
            with pytest.raises(pgflow.RunNotFound):
                await aio.get(aconn, run_id)
            await aconn.commit()
            run_id = await aio.start(aconn, "client_greeting", "async2")
            await aconn.commit()
            assert await aio.result(aconn, run_id, timeout=60) == "hello async2"
            run = await aio.get(aconn, run_id)
            assert run.status == "completed" and [s.name for s in run.steps] == ["greet"]

    asyncio.run(main())


def test_started_from_a_trigger_it_runs(conn, inprocess_worker):
    conn.execute("""
        create table public.signups (email text primary key);
        create function public.on_signup() returns trigger language plpgsql as $$
        begin
            perform pgflow.start('client_greeting', jsonb_build_array(new.email),
                                 key => 'signup:' || new.email, version => '1');
            return new;
        end $$;
        create trigger signup_starts_greeting after insert on public.signups
            for each row execute function public.on_signup();
    """)
    inprocess_worker.start([greeting])
    conn.execute("insert into public.signups values ('fay@example.com')")
    run_id = conn.execute("select id from pgflow.runs where key = 'signup:fay@example.com'"
                          ).fetchone()[0]
    wait_status(conn, run_id, "completed", timeout=60)
    assert pgflow.get(conn, run_id).output == "hello fay@example.com"
