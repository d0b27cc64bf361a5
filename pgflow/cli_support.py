"""What every ``pgflow`` command shares: the options, one-line errors, the connection.

Every failure the user can cause ends as one line on stderr and exit code 1
(:func:`user_errors`); ``PGFLOW_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Annotated, Any

import psycopg
import typer

from pgflow import dsn as dsn_resolution
from pgflow import errors, schema

DsnOption = Annotated[str | None, typer.Option(
    "--dsn", help="Database URL or libpq string [default: $PGFLOW_DSN, $DATABASE_URL, "
                  "or the embedded server under ./.pgflow/]")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn every expected failure into one line on stderr and exit 1."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        if os.environ.get("PGFLOW_DEBUG"):
            raise
        typer.echo(f"pgflow: error: {describe(exc)}", err=True)
        raise typer.Exit(1) from None


# Revision 0002's roles, for a login that was refused (see README, Security).
ROLES_HINT = ("pgflow_worker runs workflows, pgflow_client starts and controls runs, "
              "pgflow_reader reads them")


def describe(exc: Exception) -> str:
    exc = getattr(exc, "orig", None) or exc  # SQLAlchemy (migrate) wraps the psycopg error
    if isinstance(exc, psycopg.OperationalError):
        return one_line(f"cannot connect to the database: {exc}")
    if isinstance(exc, psycopg.errors.UndefinedFunction | psycopg.errors.UndefinedTable):
        return "the pgflow schema is not installed: run `pgflow migrate` first"
    if isinstance(exc, psycopg.errors.InsufficientPrivilege) and "permission denied" in str(exc):
        return one_line(f"{exc}: this login lacks the pgflow role for it ({ROLES_HINT})")
    if isinstance(exc, (errors.PgflowError, ValueError, TypeError, LookupError)):
        return one_line(str(exc))
    return one_line(f"{type(exc).__name__}: {exc}")


def connect(dsn: str | None) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn_resolution.resolve(dsn), autocommit=True, connect_timeout=10)
    try:
        schema.check(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None


def columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
