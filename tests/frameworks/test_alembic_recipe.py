"""The Alembic recipe (docs/alembic.md): an application's ``alembic upgrade head`` runs pgflow's revisions.

The application is ``examples/alembic_app``, copied to a temporary folder and
driven by the real ``alembic`` command (``python -m alembic``) on a database
without the pgflow schema.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgflow import schema
from tests.frameworks.urls import sqlalchemy_url

pytest.importorskip("sqlalchemy")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "alembic_app"
DOC = ROOT / "docs" / "alembic.md"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    copy = tmp_path / "app"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def alembic(app: Path, dsn: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # A plain postgresql:// URL, as most applications have: env.py picks the driver.
    env = {**os.environ, "DATABASE_URL": sqlalchemy_url(dsn, driver="")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "alembic", *args], cwd=app, env=env,
                          capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"alembic {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done


def versions(dsn: str) -> tuple[list[str], str | None]:
    """The application's revisions (public.alembic_version) and pgflow's."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        app_rows = conn.execute("select version_num from public.alembic_version"
                                " order by 1").fetchall()
        return [row[0] for row in app_rows], schema._revision(conn)


def table_exists(dsn: str, name: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("select to_regclass(%s) is not null", (name,)).fetchone()[0]


def column_names(dsn: str, table: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {row[0] for row in conn.execute(
            "select column_name from information_schema.columns"
            " where table_schema = 'public' and table_name = %s", (table,))}


def test_upgrade_head_migrates_the_app_and_pgflow_and_again_is_a_no_op(app, empty_dsn):
    alembic(app, empty_dsn, "upgrade", "head")
    assert versions(empty_dsn) == (["0002_signups"], schema.head_revision())
    assert column_names(empty_dsn, "customers") == {"id", "email", "signup_run_id"}
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert schema.check(conn) == schema.head_revision()
        assert conn.execute("select to_regclass('pgflow.alembic_version')::text").fetchone()[0] \
            == "pgflow.alembic_version"

    again = alembic(app, empty_dsn, "upgrade", "head")
    assert "Running upgrade" not in again.stderr, again.stderr
    assert versions(empty_dsn) == (["0002_signups"], schema.head_revision())


@pytest.mark.slow
def test_downgrades_and_read_only_commands_leave_pgflow_alone(app, empty_dsn):
    alembic(app, empty_dsn, "current")
    assert not table_exists(empty_dsn, "pgflow.alembic_version")  # current migrated nothing

    alembic(app, empty_dsn, "upgrade", "head")
    alembic(app, empty_dsn, "downgrade", "-1")
    assert versions(empty_dsn) == (["0001_customers"], schema.head_revision())
    assert column_names(empty_dsn, "customers") == {"id", "email"}
    alembic(app, empty_dsn, "downgrade", "base")
    assert versions(empty_dsn) == ([], schema.head_revision())
    assert not table_exists(empty_dsn, "public.customers")
    assert table_exists(empty_dsn, "pgflow.runs")


def test_a_failing_app_revision_rolls_pgflow_back_too(app, empty_dsn):
    (app / "migrations" / "versions" / "0003_broken.py").write_text(
        '"""A revision that fails."""\n\n'
        "from alembic import op\n\n"
        'revision = "0003_broken"\ndown_revision = "0002_signups"\n'
        "branch_labels = None\ndepends_on = None\n\n\n"
        "def upgrade() -> None:\n    op.execute(\"select 1/0\")\n\n\n"
        "def downgrade() -> None:\n    pass\n")
    failed = alembic(app, empty_dsn, "upgrade", "head", check=False)
    assert failed.returncode != 0
    assert "division by zero" in failed.stderr
    # One transaction: neither pgflow's schema nor the application's tables were left.
    assert not table_exists(empty_dsn, "pgflow.alembic_version")
    assert not table_exists(empty_dsn, "public.customers")


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_doc_shows_the_example_s_code_as_it_is():
    """Every Python snippet of docs/alembic.md is a verbatim part of the example's env.py."""
    env_py = (EXAMPLE / "migrations" / "env.py").read_text(encoding="utf-8")
    blocks = _python_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks
    for block in blocks:
        assert block in env_py, f"docs/alembic.md shows code that env.py does not have:\n{block}"
