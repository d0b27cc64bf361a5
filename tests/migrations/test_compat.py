"""Upgrades in place: which code runs on which schema, and what a release may never change.

The rule (sql/README.md, "Compatibility"): released migrations are frozen; a
public or worker-facing procedure's signature never changes in place; a worker
accepts a range of revisions, and a newer revision that older workers cannot
run with says so (``pgflow.min_worker_revision()``, a ``-- breaking:`` first
line that ``pgflow migrate`` prints).
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import uuid
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

import pgflow
from pgflow import cli, schema
from tests.support.helpers import REPO, wait_for

RELEASES = REPO / "sql" / "migrations" / "RELEASES"


def releases() -> list[dict[str, str]]:
    """The released versions: version, their head revision, their commit."""
    rows = []
    for line in RELEASES.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            version, revision, commit = line.split()
            rows.append({"version": version, "revision": revision, "commit": commit})
    return rows


# -- a newer schema than the code --------------------------------------------------------------

FUTURE = "9001_future"
NON_BREAKING = f"""
    create function pgflow.future_feature() returns integer language sql as $$ select 1 $$;
    update pgflow.alembic_version set version_num = '{FUTURE}';
"""
FLOOR_RAISED = f"""
    create or replace function pgflow.min_worker_revision() returns text
    language sql immutable as $$ select '{FUTURE}'::text $$;
"""
BREAKING = NON_BREAKING + FLOOR_RAISED


def _migrated_by_a_newer_pgflow(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def test_the_code_accepts_its_range_of_revisions(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert schema.check(conn) == schema.head_revision()
    schema.downgrade(dsn, "0005_cancelled_steps")      # older than MIN_REVISION
    with psycopg.connect(dsn, autocommit=True) as conn, \
            pytest.raises(pgflow.SchemaNotMigrated, match="run `pgflow migrate`") as older:
        schema.check(conn)
    assert schema.MIN_REVISION in str(older.value)
    schema.migrate(dsn)
    _migrated_by_a_newer_pgflow(dsn, NON_BREAKING)     # newer, still accepts these workers
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert schema.check(conn) == FUTURE
    _migrated_by_a_newer_pgflow(dsn, FLOOR_RAISED)     # newer, and says it needs newer workers
    with psycopg.connect(dsn, autocommit=True) as conn, \
            pytest.raises(pgflow.SchemaTooNew, match="upgrade pgflow here"):
        schema.check(conn)


# -- the code of a release, against the newest schema -----------------------------------------

COMPAT_FLOWS = textwrap.dedent('''
    import pgflow

    @pgflow.step
    def double(n: int) -> int:
        return 2 * n

    @pgflow.workflow(name="compat_double_twice")
    def compat_double_twice(ctx: pgflow.Context, n: int) -> int:
        return double(double(n))
''')


@pytest.fixture(scope="module")
def released_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package of the oldest release, as ``git archive`` gives it, beside a workflow module."""
    oldest = releases()[0]
    archive = subprocess.run(["git", "archive", "--format=tar", oldest["commit"], "pgflow", "sql",
                              "migrations"], cwd=REPO, capture_output=True, check=False)
    assert archive.returncode == 0, (
        f"release {oldest['version']} ({oldest['commit']}) is not in this clone's history: "
        f"{archive.stderr.decode(errors='replace').strip()}")
    root = tmp_path_factory.mktemp(f"pgflow-{oldest['version']}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    (root / "compat_flows.py").write_text(COMPAT_FLOWS)
    return root


def _released_worker(code: Path, dsn: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    for name in ("PGFLOW_DSN", "DATABASE_URL"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "pgflow", "worker", "compat_flows", "--dsn", dsn],
                            cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_the_released_worker_is_the_released_code(released_code):
    probe = subprocess.run([sys.executable, "-c", "import pgflow; print(pgflow.__file__)"],
                           cwd=released_code, env={**os.environ, "PYTHONPATH": str(released_code)},
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == str(released_code / "pgflow" / "__init__.py")


@pytest.mark.parametrize("newer", [False, True], ids=["head", "head+future"])
def test_a_released_worker_runs_on_the_newest_schema(released_code, dsn, conn, newer):
    if newer:
        _migrated_by_a_newer_pgflow(dsn, NON_BREAKING)
    worker = _released_worker(released_code, dsn)
    try:
        wait_for(lambda: conn.execute("select count(*) from pgflow.workers").fetchone()[0] == 1
                 or worker.poll() is not None, what="the released worker registered")
        assert worker.poll() is None, worker.stdout.read() if worker.stdout else ""
        runs = [pgflow.start(conn, "compat_double_twice", n) for n in range(5)]
        assert [pgflow.result(conn, run_id, timeout=30) for run_id in runs] == [0, 4, 8, 12, 16]
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, out


def test_a_released_worker_refuses_a_schema_that_says_it_needs_newer_workers(released_code, dsn):
    _migrated_by_a_newer_pgflow(dsn, BREAKING)
    worker = _released_worker(released_code, dsn)
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 1
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgflow: error: "), out
    assert f"needs pgflow code that knows revision {FUTURE}" in lines[0]
    assert "upgrade pgflow here" in lines[0]


# -- what a release may never change -----------------------------------------------------------

def _public_signatures(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return dict(conn.execute(
            "select p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',"
            "       pg_get_function_result(p.oid)"
            " from pg_proc p where p.pronamespace = 'pgflow'::regnamespace"
            "   and p.proname not like '\\_%'").fetchall())


def test_no_released_procedure_signature_changed_in_place(server_dsn, dsn):
    """Every public or worker-facing procedure of every release is still there, the same."""
    head = _public_signatures(dsn)
    for release in releases():
        name = f"pgflow_release_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'create database "{name}"')
        try:
            released_dsn = psycopg.conninfo.make_conninfo(server_dsn, dbname=name)
            schema.migrate(released_dsn, release["revision"])
            released = _public_signatures(released_dsn)
        finally:
            with psycopg.connect(server_dsn, autocommit=True) as admin:
                admin.execute(f'drop database if exists "{name}" with (force)')
        assert len(released) > 30
        changed = {sig: (result, head.get(sig)) for sig, result in released.items()
                   if head.get(sig) != result}
        assert changed == {}, (f"procedures of release {release['version']} changed or dropped in "
                               "place (add a defaulted parameter or a new name instead)")


def test_released_migrations_are_frozen():
    """A released migration file is never edited: a change is a new revision."""
    manifest = REPO / "sql" / "migrations" / "RELEASED.sha256"
    edited = []
    for line in manifest.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = REPO / name
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            edited.append(name)
    assert edited == [], f"released migrations edited (write a new revision instead): {edited}"
    released = {line.split(maxsplit=1)[1] for line in manifest.read_text().splitlines()}
    last = releases()[-1]["revision"]
    for path in (REPO / "sql" / "migrations").glob("[0-9]*.sql"):
        if schema.revision_number(path.name) <= schema.revision_number(last):
            assert f"sql/migrations/{path.name}" in released, f"{path.name} is not in the manifest"


# -- a revision that needs workers stopped -------------------------------------------------------

def test_migrate_prints_a_breaking_revisions_note(empty_dsn, tmp_path, monkeypatch):
    sql_dir, migrations_dir = tmp_path / "sql", tmp_path / "migrations"
    subprocess.run(["cp", "-r", str(schema.sql_dir()), str(sql_dir)], check=True)
    subprocess.run(["cp", "-r", str(schema.migrations_dir()), str(migrations_dir)], check=True)
    head = schema.head_revision()
    (sql_dir / "migrations" / "9002_breaking.sql").write_text(
        "-- breaking: the claim now needs the new lease column; stop every worker first\n"
        "create function pgflow.breaking_probe() returns integer language sql as $$ select 1 $$;\n")
    (sql_dir / "migrations" / "9002_breaking.down.sql").write_text(
        "drop function pgflow.breaking_probe();\n")
    (migrations_dir / "versions" / "9002_breaking.py").write_text(textwrap.dedent(f'''
        from pgflow.schema import run_sql_file
        revision = "9002_breaking"
        down_revision = "{head}"
        branch_labels = None
        depends_on = None
        def upgrade() -> None:
            run_sql_file("9002_breaking.sql")
        def downgrade() -> None:
            run_sql_file("9002_breaking.down.sql")
    '''))
    monkeypatch.setattr(schema, "sql_dir", lambda: sql_dir)
    monkeypatch.setattr(schema, "migrations_dir", lambda: migrations_dir)
    schema.head_revision.cache_clear()
    try:
        result = CliRunner().invoke(cli.app, ["migrate", "--dsn", empty_dsn])
        assert result.exit_code == 0, result.output
        assert ("pgflow: stop every worker before this migration: revision 9002_breaking: the "
                "claim now needs the new lease column; stop every worker first") in result.stderr
        assert "pgflow schema is at revision 9002_breaking" in result.stdout
        again = CliRunner().invoke(cli.app, ["migrate", "--dsn", empty_dsn])
        assert again.exit_code == 0 and "stop every worker" not in again.stderr
    finally:
        schema.head_revision.cache_clear()

