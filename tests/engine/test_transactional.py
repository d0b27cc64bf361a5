"""Transactional steps: the step's writes and its checkpoint commit together, or neither does.

A real worker (in this process) on a real database; every step here inserts
into ``public.ledger`` on the connection it is handed, so the ledger shows
exactly which attempts committed. The crash and freeze cases, with real
processes: ``tests/processes/test_transactional.py``.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import pgflow
import pgflow.orm

_attempts: dict[str, int] = {}  # (run, step) -> attempts made, outside any transaction


def _attempt(key: str) -> int:
    _attempts[key] = _attempts.get(key, 0) + 1
    return _attempts[key]


@pytest.fixture
def ledger(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("create table public.ledger (id serial primary key, run_id text not null,"
                 " what text not null)")
    return conn


def entries(conn: psycopg.Connection[Any], run_id: Any) -> list[str]:
    return [row[0] for row in conn.execute(
        "select what from public.ledger where run_id = %s order by id", (str(run_id),))]


@pgflow.step(transactional=True)
def book(conn: psycopg.Connection[Any], run_id: str, what: str) -> int:
    return conn.execute("insert into public.ledger (run_id, what) values (%s, %s) returning id",
                        (run_id, what)).fetchone()[0]


@pgflow.step(transactional=True, retry=pgflow.Retry(max_attempts=3, initial_interval=0.01))
def book_then_fail_once(conn: psycopg.Connection[Any], run_id: str) -> str:
    conn.execute("insert into public.ledger (run_id, what) values (%s, %s)",
                 (run_id, f"attempt {_attempts.get(run_id, 0) + 1}"))
    if _attempt(run_id) == 1:
        raise ConnectionError("the first attempt fails after its insert")
    return "booked"


@pgflow.step(transactional=True)
async def book_async(conn: psycopg.AsyncConnection[Any], run_id: str, what: str) -> int:
    cur = await conn.execute(
        "insert into public.ledger (run_id, what) values (%s, %s) returning id", (run_id, what))
    row = await cur.fetchone()
    return row[0]


@pgflow.step(transactional=True)
def book_and_lose_the_lease(conn: psycopg.Connection[Any], run_id: str, dsn: str) -> str:
    """Writes, then the run is recovered under its feet (as if this worker had frozen)."""
    conn.execute("insert into public.ledger (run_id, what) values (%s, %s)",
                 (run_id, f"execution {_attempts.get(run_id + '/lease', 0) + 1}"))
    if _attempt(run_id + "/lease") == 1:
        with psycopg.connect(dsn, autocommit=True) as other:
            other.execute("update pgflow.runs set status = 'pending', lease_owner = null,"
                          " lease_token = lease_token + 1, available_at = pgflow.now()"
                          " where id = %s", (run_id,))
    return "booked"


@pgflow.workflow(name="tx_sync")
def sync_flow(ctx: pgflow.Context) -> list[int]:
    run_id = str(ctx.workflow_id)
    return [book(run_id, "one"), book(run_id, "two")]


@pgflow.workflow(name="tx_async")
async def async_flow(ctx: pgflow.Context) -> list[int]:
    run_id = str(ctx.workflow_id)
    return [await book_async(run_id, "async step"), await book(run_id, "sync step")]


@pgflow.workflow(name="tx_mixed")
def mixed_flow(ctx: pgflow.Context) -> int:
    return book_async(str(ctx.workflow_id), "async step in a def workflow")


@pgflow.workflow(name="tx_retry")
def retry_flow(ctx: pgflow.Context) -> str:
    return book_then_fail_once(str(ctx.workflow_id))


@pgflow.workflow(name="tx_fenced")
def fenced_flow(ctx: pgflow.Context, dsn: str) -> str:
    return book_and_lose_the_lease(str(ctx.workflow_id), dsn)


@pgflow.step
def refuse(run_id: str) -> None:
    raise ValueError("refused")


@pgflow.workflow(name="tx_saga")
def saga_flow(ctx: pgflow.Context) -> str:
    run_id = str(ctx.workflow_id)
    try:
        with ctx.saga() as saga:
            book(run_id, "reserve")
            saga.add(book, run_id, "release")  # the compensation is transactional too
            refuse(run_id)
    except pgflow.StepFailed:
        return "compensated"
    return "unreachable"


@pgflow.workflow(name="tx_child")
def child_flow(ctx: pgflow.Context, parent: str) -> int:
    return book(parent, "from the child")


@pgflow.workflow(name="tx_parent")
def parent_flow(ctx: pgflow.Context) -> list[Any]:
    run_id = str(ctx.workflow_id)
    from_child = ctx.call(child_flow, run_id)
    mapped = ctx.map(book_item, [[run_id, "item a"], [run_id, "item b"]])
    return [from_child, mapped]


@pgflow.step(transactional=True)
def book_item(conn: psycopg.Connection[Any], pair: list[str]) -> str:
    run_id, what = pair
    conn.execute("insert into public.ledger (run_id, what) values (%s, %s)", (run_id, what))
    return what


def test_a_transactional_steps_writes_and_checkpoint_commit_together(ledger, inprocess_worker):
    inprocess_worker.start([sync_flow])
    run_id = pgflow.start(ledger, sync_flow)
    ids = pgflow.result(ledger, run_id, timeout=60)
    assert entries(ledger, run_id) == ["one", "two"]
    assert ids == [row[0] for row in ledger.execute(
        "select id from public.ledger where run_id = %s order by id", (str(run_id),))]
    steps = pgflow.get(ledger, run_id).steps
    assert [(s.name, s.status, s.output) for s in steps] == [
        ("book", "completed", ids[0]), ("book", "completed", ids[1])]


def test_a_raising_step_rolls_its_writes_back_before_the_retry(ledger, inprocess_worker):
    inprocess_worker.start([retry_flow])
    run_id = pgflow.start(ledger, retry_flow)
    assert pgflow.result(ledger, run_id, timeout=60) == "booked"
    assert entries(ledger, run_id) == ["attempt 2"]  # the first attempt's insert is gone
    step = pgflow.get(ledger, run_id).steps[0]
    assert (step.status, step.attempts) == ("completed", 2)
    errors = ledger.execute("select error ->> 'type' from pgflow.step_attempts"
                            " where run_id = %s", (run_id,)).fetchall()
    assert errors == [("ConnectionError",)]


def test_async_steps_get_an_async_connection_in_either_kind_of_workflow(ledger,
                                                                       inprocess_worker):
    inprocess_worker.start([async_flow, mixed_flow])
    first = pgflow.start(ledger, async_flow)
    second = pgflow.start(ledger, mixed_flow)
    assert len(pgflow.result(ledger, first, timeout=60)) == 2
    assert isinstance(pgflow.result(ledger, second, timeout=60), int)
    assert entries(ledger, first) == ["async step", "sync step"]
    assert entries(ledger, second) == ["async step in a def workflow"]


def test_a_refused_checkpoint_rolls_the_writes_back(ledger, dsn, inprocess_worker):
    """The run is recovered while the step runs (its worker froze, say): the late
    checkpoint is refused (PF001), and the step's insert goes with it. The run is
    claimed again and its step commits once."""
    inprocess_worker.start([fenced_flow])
    run_id = pgflow.start(ledger, fenced_flow, dsn)
    assert pgflow.result(ledger, run_id, timeout=60) == "booked"
    assert entries(ledger, run_id) == ["execution 2"]
    assert _attempts[str(run_id) + "/lease"] == 2


def test_compensations_children_and_map_items_can_be_transactional(ledger, inprocess_worker):
    inprocess_worker.start([saga_flow, parent_flow, child_flow])
    saga_run = pgflow.start(ledger, saga_flow)
    parent_run = pgflow.start(ledger, parent_flow)
    assert pgflow.result(ledger, saga_run, timeout=60) == "compensated"
    assert entries(ledger, saga_run) == ["reserve", "release"]
    result = pgflow.result(ledger, parent_run, timeout=60)
    assert result[1] == ["item a", "item b"]
    assert sorted(entries(ledger, parent_run)) == ["from the child", "item a", "item b"]


def test_a_transactional_step_outside_a_workflow_is_a_plain_call(ledger):
    with ledger.transaction():
        booked = book(ledger, "no-run", "by hand")
    assert entries(ledger, "no-run") == ["by hand"]
    assert isinstance(booked, int)


def test_declaring_a_transactional_step_wrongly_is_one_clear_error():
    with pytest.raises(TypeError, match="must take the connection as its first"):
        pgflow.step(transactional=True)(lambda: None)
    with pytest.raises(TypeError, match="must take the connection as its first"):
        pgflow.step(transactional=True)(lambda *, conn: None)
    with pytest.raises(ValueError, match="cannot have a timeout"):
        pgflow.step(transactional=True, timeout=5)(lambda conn: None)
    with pytest.raises(TypeError, match="transactional must be True or False"):
        pgflow.step(transactional="yes")(lambda conn: None)  # type: ignore[call-overload]


def test_a_map_of_a_transactional_step_takes_its_inputs_without_the_connection():
    assert [p["name"] for p in book_item.signature.describe()] == ["pair"]


# -- SQLAlchemy on the step's connection (pgflow.orm) ----------------------------------

class _Base(DeclarativeBase):
    pass


class LedgerEntry(_Base):
    __tablename__ = "ledger"
    __table_args__ = {"schema": "public"}
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str]
    what: Mapped[str]


@pgflow.step(transactional=True, retry=pgflow.Retry(max_attempts=2, initial_interval=0.01))
def book_with_orm(conn: psycopg.Connection[Any], run_id: str) -> int:
    with pgflow.orm.session(conn) as session:
        entry = LedgerEntry(run_id=run_id, what=f"orm attempt {_attempts.get(run_id, 0) + 1}")
        session.add(entry)
        session.commit()  # only flushes: the step's transaction commits with its checkpoint
        if _attempt(run_id) == 1:
            raise ConnectionError("after the flush")
        return entry.id


@pgflow.workflow(name="tx_orm")
def orm_flow(ctx: pgflow.Context) -> int:
    return book_with_orm(str(ctx.workflow_id))


def test_a_sqlalchemy_session_on_the_steps_connection_commits_with_its_checkpoint(
        ledger, inprocess_worker):
    inprocess_worker.start([orm_flow])
    run_id = pgflow.start(ledger, orm_flow)
    entry_id = pgflow.result(ledger, run_id, timeout=60)
    assert entries(ledger, run_id) == ["orm attempt 2"]  # the first attempt's flush rolled back
    assert ledger.execute("select id from public.ledger where run_id = %s",
                          (str(run_id),)).fetchone()[0] == entry_id


def test_pgflow_orm_session_takes_a_psycopg_connection():
    with pytest.raises(TypeError, match="takes a transactional step's psycopg Connection"), \
            pgflow.orm.session("not a connection"):
        pass
