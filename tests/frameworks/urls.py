"""The test database's address as a SQLAlchemy URL (for engines, and for Alembic's DATABASE_URL)."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict


def sqlalchemy_url(dsn: str, driver: str = "psycopg") -> str:
    """``postgresql+DRIVER://...`` (``postgresql://`` without one) for a libpq DSN."""
    from sqlalchemy.engine import URL

    params = conninfo_to_dict(dsn)
    port = params.get("port")
    host = params.get("host")
    # A Unix socket directory (the embedded server's) goes in the query, as libpq takes it.
    socket = host is not None and str(host).startswith("/")
    return URL.create("postgresql" + (f"+{driver}" if driver else ""), username=params.get("user"),
                      password=params.get("password") or None,
                      host=None if socket else host, port=int(port) if port else None,
                      database=params.get("dbname"),
                      query={"host": str(host)} if socket else {},
                      ).render_as_string(hide_password=False)
