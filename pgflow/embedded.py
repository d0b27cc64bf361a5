"""The embedded default database: a pip-installed PostgreSQL under ``./.pgflow/``.

Used when no DSN is configured, so a new user can run the example and the
tests with nothing but Python. The server keeps running between commands
(like any local database) and is reused by the next one.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pgflow import errors

EMBEDDED_DIR = ".pgflow"


def embedded_dsn(root: str | os.PathLike[str] | None = None) -> str:
    """Start (or reuse) the embedded server and return its connection URL."""
    base = Path(root if root is not None else EMBEDDED_DIR).resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        try:
            import pgserver
        except ImportError:
            raise errors.PgflowError(
                "no database configured: pass --dsn or set PGFLOW_DSN or DATABASE_URL, "
                "or install the embedded server with: pip install 'pgflow[embedded]'") from None
        base.mkdir(parents=True, exist_ok=True)
        try:
            server = pgserver.get_server(base / "pgdata", cleanup_mode=None)
        except Exception as exc:
            raise errors.PgflowError(f"could not start the embedded PostgreSQL under {base}: "
                                     f"{exc}") from None
        return str(server.get_uri())


def stop_embedded(root: str | os.PathLike[str] | None = None) -> bool:
    """Stop the embedded server if it runs; returns whether it did."""
    pgdata = Path(root if root is not None else EMBEDDED_DIR).resolve() / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(pgdata, cleanup_mode=None)
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata,
                        user=server.system_user)
    return True
