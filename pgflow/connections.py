"""Running pgflow's statements on whatever connection the application holds.

Accepted: a psycopg ``Connection`` or ``Cursor``, a SQLAlchemy ``Connection``
or ``Session`` (on psycopg or psycopg2), or any DB-API connection with the
``format`` paramstyle. The statement runs in that connection's current
transaction; nothing here commits or rolls back.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgflow import errors


def _is_sqlalchemy(obj: object, cls_name: str) -> bool:
    return any(c.__module__.startswith("sqlalchemy") and c.__name__ == cls_name
               for c in type(obj).__mro__)


def dbapi_connection(conn: Any) -> Any:
    """The driver-level connection behind ``conn`` (a SQLAlchemy wrapper, say)."""
    if _is_sqlalchemy(conn, "Session"):
        conn = conn.connection()
    if _is_sqlalchemy(conn, "Connection"):
        return conn.connection.driver_connection
    return conn


def _reraise_translated(exc: BaseException) -> None:
    """Raise the pgflow exception for an engine error; return for any other error."""
    translated = errors.from_database(exc)
    if translated is not exc:
        raise translated from None


def fetch(conn: Any, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Execute ``sql`` on ``conn`` in its current transaction and return all rows."""
    if isinstance(conn, psycopg.Cursor):
        cursor, owned = conn, False
    else:
        raw = dbapi_connection(conn)
        if not hasattr(raw, "cursor"):
            raise TypeError(f"expected a psycopg or SQLAlchemy connection, not {type(conn)!r}")
        cursor, owned = raw.cursor(), True
    try:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []
    except Exception as exc:
        _reraise_translated(exc)
        raise
    finally:
        if owned:
            cursor.close()


async def afetch(conn: Any, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """:func:`fetch` for ``psycopg.AsyncConnection`` / ``AsyncCursor``."""
    if isinstance(conn, psycopg.AsyncCursor):
        cursor, owned = conn, False
    elif isinstance(conn, psycopg.AsyncConnection):
        cursor, owned = conn.cursor(), True
    else:
        raise TypeError(f"expected a psycopg AsyncConnection or AsyncCursor, not {type(conn)!r}")
    try:
        await cursor.execute(sql, params)
        return list(await cursor.fetchall()) if cursor.description else []
    except psycopg.Error as exc:
        _reraise_translated(exc)
        raise
    finally:
        if owned:
            await cursor.close()
