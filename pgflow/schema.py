"""Installing and checking the ``pgflow`` schema.

The SQL lives in ``sql/`` and the Alembic environment in ``migrations/`` at the
top of the repository; a wheel carries both inside the package (``_sql`` and
``_migrations``), so migrating works from a checkout and from a plain install.
"""

from __future__ import annotations

import re
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


def read_sql(path: str) -> str:
    """A file of ``sql/`` by its path inside it, e.g. ``migrations/0001_core.sql``."""
    return (sql_dir() / path).read_text(encoding="utf-8")


def schema_files() -> list[Path]:
    """The current engine, one file a concern, in the order that creates it (``sql/schema/``).

    The migration chain (``sql/migrations/``) builds the same catalog; a test proves it.
    """
    return sorted((sql_dir() / "schema").glob("*.sql"))


def run_sql_file(filename: str) -> None:
    """Execute one migration file of ``sql/migrations/`` inside the running Alembic migration."""
    from alembic import op

    raw = op.get_bind().connection.driver_connection
    # No parameters: psycopg sends the text as is (several statements, `%` kept).
    raw.execute(read_sql(f"migrations/{filename}"))


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


# The oldest schema revision whose procedures this code calls. Raise it when the
# code starts to call something a later revision added (see sql/README.md,
# "Compatibility"); this code also runs on any newer revision that still
# accepts its workers (pgflow.min_worker_revision()).
MIN_REVISION = "0009_observability"

# The first revision whose workers guard their wake-ups (pgflow.guard_wakes): on an
# older schema a worker waits for NOTIFYs as before, and every start sends one.
GUARDED_WAKES_REVISION = "0012_quiet_starts"

# The first revision whose claim gives back the slots of runs whose code returned
# (claim_runs' p_ended): on an older schema a run's slots go back with its completion.
CODE_END_SLOTS_REVISION = "0014_slots_at_code_end"

BREAKING_MARK = "-- breaking:"  # the first line of a revision that needs workers stopped


def revision_number(revision: str) -> int:
    """The position of a revision in the chain, from its name (``0006_schema_compat``: 6)."""
    head, _, _ = revision.partition("_")
    if not head.isdigit():
        raise errors.PgflowError(f"unexpected pgflow schema revision {revision!r}")
    return int(head)


def supported_revisions() -> str:
    """The revisions this pgflow works with, as a worker says it."""
    return (f"{MIN_REVISION} to {head_revision()}, and later revisions that still accept "
            "its workers")


def check(conn: psycopg.Connection[Any]) -> str:
    """Raise unless this code can work with the database's schema; return its revision.

    Accepted: any revision from :data:`MIN_REVISION` to this pgflow's head, and a
    newer one (migrated by a newer pgflow) whose ``pgflow.min_worker_revision()``
    this pgflow knows. Older: :class:`errors.SchemaNotMigrated` (run ``pgflow
    migrate``); newer and incompatible: :class:`errors.SchemaTooNew`.
    """
    found = _revision(conn)
    head = head_revision()
    if found is None:
        raise errors.SchemaNotMigrated(
            f"the pgflow schema is not installed in database {conn.info.dbname!r}: "
            "run `pgflow migrate` first")
    if revision_number(found) < revision_number(MIN_REVISION):
        raise errors.SchemaNotMigrated(
            f"the pgflow schema in database {conn.info.dbname!r} is at revision {found}, "
            f"this pgflow works with {supported_revisions()}: run `pgflow migrate`")
    if revision_number(found) > revision_number(head):
        row = conn.execute("select pgflow.min_worker_revision()").fetchone()
        floor = row[0] if row else found
        if revision_number(floor) > revision_number(head):
            raise errors.SchemaTooNew(
                f"the pgflow schema in database {conn.info.dbname!r} is at revision {found}, "
                f"which needs pgflow code that knows revision {floor} or later; this pgflow "
                f"knows revisions up to {head}: upgrade pgflow here")
    return found


def breaking_notes(dsn: str) -> list[str]:
    """What the revisions still to apply say in a ``-- breaking:`` first line, one a revision."""
    current = current_revision(dsn)
    after = -1 if current is None else revision_number(current)
    notes = []
    for path in sorted((sql_dir() / "migrations").glob("[0-9]*.sql")):
        revision = path.name.removesuffix(".sql")
        if revision.endswith(".down") or revision_number(revision) <= after:
            continue
        first = path.read_text(encoding="utf-8").partition("\n")[0]
        if first.startswith(BREAKING_MARK):
            notes.append(f"revision {revision}: {first.removeprefix(BREAKING_MARK).strip()}")
    return notes


def _sqlalchemy_engine(dsn: str) -> Any:
    # Alembic drives SQLAlchemy; hand it psycopg connections made from our DSN
    # so any libpq connection string (URL or key=value, sockets) works.
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn),
                         poolclass=NullPool)


def procedure_query(conn: psycopg.Connection[Any], function: str, cte: str,
                    variables: dict[str, str]) -> str:
    """The statement behind CTE ``cte`` of procedure ``function``, as the database holds it.

    One source for the statements that the tests and the benchmark EXPLAIN (the
    claim's candidates, the scheduler's due timers): they read the installed
    procedure instead of keeping a copy. ``variables`` maps the procedure's
    parameters and locals (``p_limit``) to what replaces them (``%(limit)s``, ``$1``).
    """
    row = conn.execute("select prosrc from pg_catalog.pg_proc"
                       " where oid = %s::regproc", (function,)).fetchone()
    if row is None:
        raise errors.SchemaNotMigrated(f"{function} is not installed")
    source: str = row[0]
    start = re.search(rf"\b{re.escape(cte)} as materialized \(", source)
    if start is None:
        raise LookupError(f"{function} has no CTE {cte!r}")
    depth, end = 1, start.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(source[end], 0)
        end += 1
    body = source[start.end():end - 1]
    return re.sub(r"\b(" + "|".join(map(re.escape, variables)) + r")\b",
                  lambda m: variables[m.group(1)], body)
