"""Client calls on SQLAlchemy: sync ``Connection`` and ``Session``, async ones through ``pgflow.aio``.

Each call runs in the SQLAlchemy object's current transaction; one that has not
begun its transaction yet begins it, as its own ``execute`` would, so that the
caller's ``commit()`` commits the run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow import aio
from tests.frameworks.urls import sqlalchemy_url

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import text  # noqa: E402
from sqlalchemy.exc import DBAPIError  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402


@pgflow.step
def shout(word: str) -> str:
    return word.upper()


@pgflow.workflow(name="sqlalchemy_shout")
def shouting(ctx: pgflow.Context, word: str) -> str:
    return shout(word)


@pgflow.workflow(name="sqlalchemy_other")
def other(ctx: pgflow.Context) -> None:
    return None


class Boom(Exception):
    pass




def _inputs(conn: psycopg.Connection[Any]) -> set[str]:
    return {row[0][0] for row in conn.execute("select input from pgflow.runs")}


@pytest.fixture
def engine(dsn: str) -> Iterator[Any]:
    sync_engine = sqlalchemy.create_engine(sqlalchemy_url(dsn))
    yield sync_engine
    sync_engine.dispose()


# -- sync ---------------------------------------------------------------------

def test_connection_commits_or_rolls_back_the_run(engine, conn):
    with pytest.raises(Boom), engine.begin() as sa:
        pgflow.start(sa, shouting, "rolled-back")
        raise Boom
    with engine.begin() as sa:
        pgflow.start(sa, shouting, "begin")
    with engine.connect() as sa:  # no transaction begun yet: pgflow begins SQLAlchemy's
        pgflow.start(sa, shouting, "connect-commit")
        sa.commit()
    with engine.connect() as sa:
        sa.execute(text("create table public.orders (id int)"))
        sa.execute(text("insert into public.orders values (1)"))
        pgflow.start(sa, shouting, "with-a-row")
        sa.rollback()
    assert _inputs(conn) == {"begin", "connect-commit"}


def test_session_runs_the_call_in_its_transaction(engine, conn):
    with Session(engine) as session:
        run_id = pgflow.start(session, shouting, "session")
        assert pgflow.get(session, run_id).input == ["session"]
        session.rollback()
    with Session(engine) as session, session.begin():
        run_id = pgflow.start(session, shouting, "session-begin")
    with Session(engine) as session:
        pgflow.signal(session, run_id, "go", {"n": 1})
        assert pgflow.cancel(session, run_id) is True
        session.commit()
    assert _inputs(conn) == {"session-begin"}
    assert pgflow.get(conn, run_id).status in ("cancelling", "cancelled")


def test_sync_errors_are_pgflow_exceptions(engine):
    with engine.connect() as sa:
        with pytest.raises(pgflow.RunNotFound) as raised:
            pgflow.retry(sa, uuid.uuid4())
        assert not isinstance(raised.value, DBAPIError)
        sa.rollback()
        pgflow.start(sa, shouting, "x", key="shared")
        with pytest.raises(pgflow.KeyConflict, match="shared"):
            pgflow.start(sa, other, key="shared")


def test_an_async_connection_on_the_sync_client_is_one_clear_error(dsn):
    async def main() -> None:
        async_engine = create_async_engine(sqlalchemy_url(dsn))
        async with async_engine.connect() as sa:
            with pytest.raises(TypeError, match=r"use the pgflow\.aio client"):
                pgflow.start(sa, shouting, "x")
        await async_engine.dispose()

    asyncio.run(main())


# -- async --------------------------------------------------------------------

def test_async_connection_commits_or_rolls_back_the_run(dsn, conn):
    async def main() -> None:
        async_engine = create_async_engine(sqlalchemy_url(dsn))
        with pytest.raises(Boom):
            async with async_engine.begin() as sa:
                await aio.start(sa, shouting, "rolled-back")
                raise Boom
        async with async_engine.begin() as sa:
            run_id = await aio.start(sa, shouting, "begin")
            assert (await aio.get(sa, run_id)).input == ["begin"]
        async with async_engine.connect() as sa:
            await aio.start(sa, shouting, "connect-commit")
            await sa.commit()
        async with async_engine.connect() as sa:
            await aio.start(sa, shouting, "connect-rollback")
            await sa.rollback()
        await async_engine.dispose()

    asyncio.run(main())
    assert _inputs(conn) == {"begin", "connect-commit"}


def test_async_session_runs_the_call_in_its_transaction(dsn, conn):
    async def main() -> uuid.UUID:
        async_engine = create_async_engine(sqlalchemy_url(dsn))
        async with AsyncSession(async_engine) as session:
            await aio.start(session, shouting, "session-rollback")
            await session.rollback()
        async with AsyncSession(async_engine) as session, session.begin():
            run_id = await aio.start(session, shouting, "session")
        async with AsyncSession(async_engine) as session:
            await aio.signal(session, run_id, "go")
            info = await aio.set_queue(session, "sa-queue", concurrency=2)
            assert info.concurrency == 2
            assert await aio.cancel(session, run_id) is True
            await session.commit()
        await async_engine.dispose()
        return run_id

    run_id = asyncio.run(main())
    assert _inputs(conn) == {"session"}
    assert pgflow.get(conn, run_id).status in ("cancelling", "cancelled")


def test_async_result_and_errors(dsn, conn, inprocess_worker):
    inprocess_worker.start([shouting])

    async def main() -> None:
        async_engine = create_async_engine(sqlalchemy_url(dsn))
        async with async_engine.begin() as sa:
            run_id = await aio.start(sa, shouting, "done")
        async with async_engine.connect() as sa:
            assert await aio.result(sa, run_id, timeout=60) == "DONE"
        async with AsyncSession(async_engine) as session:
            with pytest.raises(pgflow.RunNotFound) as raised:
                await aio.retry(session, uuid.uuid4())
            assert not isinstance(raised.value, DBAPIError)
            await session.rollback()
            with pytest.raises(pgflow.RunStateError):
                await aio.retry(session, run_id)
        await async_engine.dispose()

    asyncio.run(main())


def test_sync_objects_on_the_async_client_are_one_clear_error(engine):
    async def main() -> None:
        with engine.connect() as sa, pytest.raises(TypeError, match="use the sync client"):
            await aio.start(sa, shouting, "x")
        with pytest.raises(TypeError, match="AsyncConnection or AsyncSession, not"):
            await aio.start(object(), shouting, "x")

    asyncio.run(main())

