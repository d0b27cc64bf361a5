"""Which database to use: ``--dsn``, else ``PGFLOW_DSN``, else ``DATABASE_URL``, else embedded."""

from __future__ import annotations

import os

from pgflow import embedded


def resolve(explicit: str | None = None) -> str:
    for candidate in (explicit, os.environ.get("PGFLOW_DSN"), os.environ.get("DATABASE_URL")):
        if candidate:
            return _normalize(candidate)
    return embedded.embedded_dsn()


def _normalize(dsn: str) -> str:
    # SQLAlchemy-style URLs name their driver; libpq does not know them.
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres+psycopg://"):
        if dsn.startswith(prefix):
            return "postgresql://" + dsn[len(prefix):]
    return dsn
