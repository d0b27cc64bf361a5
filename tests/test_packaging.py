"""The built wheel carries the SQL and the migrations, and works from a plain install.

Builds the wheel, installs it into a fresh virtual environment, and runs
``pgflow migrate`` from outside the checkout, so nothing can be found in the
repository by accident.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest

from pgflow import schema
from tests.helpers import REPO

pytestmark = pytest.mark.slow

REQUIRED_IN_WHEEL = (
    "pgflow/_sql/0001_core.sql",
    "pgflow/_sql/0002_roles.sql",
    "pgflow/_sql/0002_roles.down.sql",
    "pgflow/_migrations/env.py",
    "pgflow/_migrations/versions/0001_core.py",
    "pgflow/_migrations/versions/0002_roles.py",
    "pgflow/py.typed",
)
# What pip or build print when the package index cannot be reached.
OFFLINE_HINTS = (
    "connection", "network", "name resolution", "max retries", "could not fetch",
    "no matching distribution", "could not find a version",
)


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


@pytest.mark.timeout(600)
def test_wheel_installs_and_migrates_outside_the_checkout(tmp_path: Path,
                                                          empty_dsn: str) -> None:
    dist = tmp_path / "dist"
    build = _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
                 cwd=REPO, timeout=240, what="building the wheel")
    _fail_or_skip_offline(build, "python -m build")
    wheels = sorted(dist.glob("pgflow-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}: {wheels}\n{build.stdout}"
    wheel = wheels[0]

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = [name for name in REQUIRED_IN_WHEEL if name not in names]
    assert not missing, f"{wheel.name} lacks {missing}; it has {sorted(names)}"
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)

    # A fresh environment with only the wheel (and its dependencies) in it.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    fresh = tmp_path / "fresh"
    venv = _run([sys.executable, "-m", "venv", str(fresh)], cwd=outside, timeout=120,
                what="python -m venv")
    assert venv.returncode == 0, venv.stderr
    python, cli = fresh / "bin" / "python", fresh / "bin" / "pgflow"
    install = _run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                    str(wheel)], cwd=outside, timeout=240, what="pip install")
    _fail_or_skip_offline(install, "pip install of the wheel")
    assert cli.exists(), install.stdout

    # The installed package finds its SQL and migrations inside itself, not in the repo.
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=outside, timeout=60, what="sysconfig").stdout.strip()
    site_packages = Path(site).resolve()
    probe = _run([str(python), "-c",
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
    migrate = _run([str(cli), "migrate", "--dsn", empty_dsn], cwd=outside, timeout=120,
                   what="pgflow migrate")
    assert migrate.returncode == 0, f"{migrate.stdout}\n{migrate.stderr}"
    assert migrate.stdout.strip() == f"pgflow schema is at revision {head}"
    assert "Traceback" not in migrate.stderr
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("select to_regclass('pgflow.runs') is not null").fetchone() == (True,)
        assert conn.execute("select version_num from pgflow.alembic_version").fetchall() == [(head,)]

    # The other commands see the schema as current (the installed copy knows the same head).
    listed = _run([str(cli), "list", "--dsn", empty_dsn], cwd=outside, timeout=60,
                  what="pgflow list")
    assert listed.returncode == 0, f"{listed.stdout}\n{listed.stderr}"
    assert listed.stdout.split() == ["ID", "WORKFLOW", "STATUS", "CREATED", "KEY"]
    # Nothing was created in the working directory (no embedded server started).
    assert list(outside.iterdir()) == []
