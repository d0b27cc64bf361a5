"""Running pgflow's statements on whatever connection the application holds.

Accepted by :func:`fetch` (the sync client): a psycopg ``Connection`` or
``Cursor``; a SQLAlchemy ``Connection`` or ``Session`` (on psycopg or
psycopg2); a Django database connection (``django.db.connection`` or
``connections[alias]``, PostgreSQL backend); or any DB-API connection with the
``format`` paramstyle. Accepted by :func:`afetch` (``pgflow.aio``): a psycopg
``AsyncConnection`` or ``AsyncCursor``, and a SQLAlchemy ``AsyncConnection`` or
``AsyncSession`` on ``postgresql+psycopg``.

The statement runs in that connection's current transaction (a SQLAlchemy
connection that has none begins one, as its own ``execute`` would; Django's
``atomic()`` block is the transaction, if one is open); nothing here commits or
rolls back. Neither Django nor SQLAlchemy is imported: they are recognised by
the module of the object's class.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.adapt import Loader
from psycopg.pq import Format
from psycopg.types.datetime import TimestamptzLoader
from psycopg.types.json import JsonbLoader, JsonLoader

from pgflow import errors

# What pgflow reads back, decoded the way psycopg does by default, whatever the
# application registered on its connection (Django loads jsonb as text, and
# timestamptz with its own time zone rule).
_DECODED: tuple[tuple[str, type[Loader]], ...] = (
    ("jsonb", JsonbLoader), ("json", JsonLoader), ("timestamptz", TimestamptzLoader))


def _psycopg_loader(name: str, python: type[Loader]) -> type[Loader]:
    """psycopg's own loader of ``name``: its C one where psycopg[binary] or [c] has it."""
    info = psycopg.adapters.types.get(name)
    found = psycopg.adapters.get_loader(info.oid, Format.TEXT) if info is not None else None
    if found is not None and found.__module__.split(".")[0] in ("psycopg", "psycopg_binary",
                                                                 "psycopg_c"):
        return found
    return python  # the application replaced psycopg's globally: not pgflow's to use


_DEFAULT_LOADERS = {name: _psycopg_loader(name, python) for name, python in _DECODED}


def _is_sqlalchemy(obj: object, cls_name: str) -> bool:
    return any(c.__module__.startswith("sqlalchemy") and c.__name__ == cls_name
               for c in type(obj).__mro__)


def _is_django(obj: object) -> bool:
    """A Django database connection: ``connections[alias]``, or the ``connection`` proxy."""
    return any(c.__module__.startswith("django.")
               and c.__name__ in ("BaseDatabaseWrapper", "ConnectionProxy")
               for c in type(obj).__mro__)


def _is_async(obj: object) -> bool:
    return (isinstance(obj, (psycopg.AsyncConnection, psycopg.AsyncCursor))
            or _is_sqlalchemy(obj, "AsyncConnection") or _is_sqlalchemy(obj, "AsyncSession"))


def _check_django(conn: Any) -> None:
    if conn.vendor != "postgresql":
        raise TypeError(f"pgflow needs a PostgreSQL database; Django connection "
                        f"{conn.alias!r} uses the {conn.vendor!r} backend")


def dbapi_connection(conn: Any) -> Any:
    """The driver-level connection behind ``conn`` (a SQLAlchemy or Django wrapper, say).

    A SQLAlchemy ``Connection`` without a transaction begins one, so that what
    runs on the driver connection is committed by the caller's ``commit()``.
    """
    if _is_async(conn):
        raise TypeError(f"{type(conn).__name__} is an asyncio connection: "
                        "use the pgflow.aio client with it")
    if _is_django(conn):
        _check_django(conn)
        conn.ensure_connection()
        return conn.connection
    if _is_sqlalchemy(conn, "Session"):
        conn = conn.connection()
    if _is_sqlalchemy(conn, "Connection"):
        if not conn.in_transaction():
            conn.begin()
        return conn.connection.driver_connection
    return conn


async def adbapi_connection(conn: Any) -> psycopg.AsyncConnection[Any]:
    """The psycopg ``AsyncConnection`` behind ``conn`` (a SQLAlchemy async wrapper, say)."""
    if _is_sqlalchemy(conn, "AsyncSession"):
        conn = await conn.connection()
    if _is_sqlalchemy(conn, "AsyncConnection"):
        if not conn.in_transaction():
            await conn.begin()
        raw = (await conn.get_raw_connection()).driver_connection
        if not isinstance(raw, psycopg.AsyncConnection):
            raise TypeError("pgflow.aio needs SQLAlchemy's psycopg async driver "
                            f"(postgresql+psycopg://), not {type(raw).__module__}.{type(raw).__name__}")
        return raw
    if isinstance(conn, psycopg.AsyncConnection):
        return conn
    if isinstance(conn, (psycopg.Connection, psycopg.Cursor)) or _is_django(conn) or (
            _is_sqlalchemy(conn, "Connection") or _is_sqlalchemy(conn, "Session")):
        raise TypeError(f"{type(conn).__name__} is not an asyncio connection: "
                        "use the sync client (pgflow.start, pgflow.get, ...) with it")
    raise TypeError("expected a psycopg AsyncConnection or AsyncCursor, or a SQLAlchemy "
                    f"AsyncConnection or AsyncSession, not {type(conn)!r}")


def _use_pgflow_loaders(cursor: Any) -> None:
    """Decode jsonb, json and timestamptz on this cursor of ours as psycopg does by default."""
    if not isinstance(cursor, (psycopg.Cursor, psycopg.AsyncCursor)):
        return  # psycopg2 and other drivers: theirs are the defaults
    adapters = cursor.adapters
    for name, default in _DEFAULT_LOADERS.items():
        # Compared with psycopg's own (the C one where there is one): registering
        # another on every cursor slowed each call and every row it read.
        info = adapters.types.get(name)
        if info is not None and adapters.get_loader(info.oid, Format.TEXT) is not default:
            adapters.register_loader(name, default)


def _reraise_translated(exc: BaseException) -> None:
    """Raise the pgflow exception for an engine error; return for any other error.

    A framework's wrapper of the driver's error (Django's ``DatabaseError``)
    carries the driver's error as its ``__cause__``.
    """
    for candidate in (exc, exc.__cause__):
        if candidate is None:
            continue
        translated = errors.from_database(candidate)
        if translated is not candidate:
            raise translated from None


def _django_fetch(conn: Any, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    # Django's own cursor: the statement takes part in atomic() (and in whatever
    # the application hooked on the connection: execute wrappers, query logging).
    _check_django(conn)
    with conn.cursor() as wrapper:
        _use_pgflow_loaders(wrapper.cursor)
        try:
            wrapper.execute(sql, params)
            return list(wrapper.fetchall()) if wrapper.description else []
        except Exception as exc:
            _reraise_translated(exc)
            raise


def fetch(conn: Any, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Execute ``sql`` on ``conn`` in its current transaction and return all rows."""
    if isinstance(conn, psycopg.Cursor):
        cursor, owned = conn, False
    elif isinstance(conn, psycopg.Connection):  # the common case: no wrapper to look for
        cursor, owned = conn.cursor(), True
        _use_pgflow_loaders(cursor)
    elif _is_django(conn):
        return _django_fetch(conn, sql, params)
    else:
        raw = dbapi_connection(conn)
        if not hasattr(raw, "cursor"):
            raise TypeError("expected a psycopg, SQLAlchemy, Django or DB-API connection, "
                            f"not {type(conn)!r}")
        cursor, owned = raw.cursor(), True
        _use_pgflow_loaders(cursor)
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
    """:func:`fetch` for asyncio connections (psycopg or SQLAlchemy)."""
    if isinstance(conn, psycopg.AsyncCursor):
        cursor, owned = conn, False
    else:
        cursor, owned = (await adbapi_connection(conn)).cursor(), True
        _use_pgflow_loaders(cursor)
    try:
        await cursor.execute(sql, params)
        return list(await cursor.fetchall()) if cursor.description else []
    except psycopg.Error as exc:
        _reraise_translated(exc)
        raise
    finally:
        if owned:
            await cursor.close()
