"""Installing and checking the ``pgflow`` schema.

The SQL lives in ``sql/`` and the Alembic environment in ``migrations/`` at the
top of the repository; a wheel carries both inside the package (``_sql`` and
``_migrations``), so migrating works from a checkout and from a plain install.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import psycopg

from pgflow import errors

_PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(packaged: str, checkout: str) -> Path:
    inside = _PACKAGE_DIR / packaged
    if inside.is_dir():
        return inside
    beside = _PACKAGE_DIR.parent / checkout
    if beside.is_dir():
        return beside
    raise errors.PgflowError(f"pgflow is installed without its {checkout}/ folder")


def sql_dir() -> Path:
    return _resource_dir("_sql", "sql")


def migrations_dir() -> Path:
    return _resource_dir("_migrations", "migrations")


def read_sql(filename: str) -> str:
    return (sql_dir() / filename).read_text(encoding="utf-8")


def run_sql_file(filename: str) -> None:
    """Execute one file of ``sql/`` inside the running Alembic migration."""
    from alembic import op

    raw = op.get_bind().connection.driver_connection
    # No parameters: psycopg sends the text as is (several statements, `%` kept).
    raw.execute(read_sql(filename))


@cache
def head_revision() -> str:
    """The newest revision this installation of pgflow knows."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory(str(migrations_dir())).get_heads()
    if len(heads) != 1:
        raise errors.PgflowError(f"pgflow migrations have {len(heads)} heads: {heads}")
    return heads[0]


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    return config


def migrate(dsn: str, revision: str = "head") -> str:
    """Create or upgrade the schema to ``revision``; returns the revision reached.

    Safe to run from several processes at once (they serialize on an advisory
    lock) and idempotent.
    """
    from alembic import command

    with _sqlalchemy_engine(dsn).begin() as connection:
        command.upgrade(_alembic_config(connection), revision)
    return current_revision(dsn) or ""


def downgrade(dsn: str, revision: str = "base") -> None:
    from alembic import command

    with _sqlalchemy_engine(dsn).begin() as connection:
        command.downgrade(_alembic_config(connection), revision)


def current_revision(dsn: str) -> str | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return _revision(conn)


def _revision(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute("select to_regclass('pgflow.alembic_version') is not null").fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute("select version_num from pgflow.alembic_version").fetchone()
    return row[0] if row else None


def check(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`errors.SchemaNotMigrated` unless the schema is at this pgflow's head."""
    found = _revision(conn)
    wanted = head_revision()
    if found is None:
        raise errors.SchemaNotMigrated(
            f"the pgflow schema is not installed in database {conn.info.dbname!r}: "
            "run `pgflow migrate` first")
    if found != wanted:
        raise errors.SchemaNotMigrated(
            f"the pgflow schema in database {conn.info.dbname!r} is at revision {found}, "
            f"this pgflow needs {wanted}: run `pgflow migrate`")


def _sqlalchemy_engine(dsn: str) -> Any:
    # Alembic drives SQLAlchemy; hand it psycopg connections made from our DSN
    # so any libpq connection string (URL or key=value, sockets) works.
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn),
                         poolclass=NullPool)
